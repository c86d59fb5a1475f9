"""Decisions a hostile tester got wrong: a prior authorization reused across patients, policy versions and
Coverages (or issued twice by racing signs), and an impossible dose approved."""

from __future__ import annotations

import json
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from builders import condition, coverage, coverage_info, hook_request, med_order, observation, patient
from conftest import BASE, FIXED_NOW, ROOT, TEST_ISS, ClientKey, post_hook
from flask import Flask
from hookcalls import decide

from fhir_mappings.loader import Mappings
from policies.cases import StaticFacts, build_order
from policies.dose import check
from policies.engine import NO_ANSWERS, Answers, Quantity
from policies.model import DoseRule, State

ACQUIRED = [condition("D68.311")]


@pytest.fixture
def app_on(make_app: Callable[..., Flask]) -> Callable[..., Flask]:
    """Apps on one data directory (one SQLite store), each with its own PA id prefix so that they never collide."""

    def build(prefix: str, **config: Any) -> Flask:
        return make_app(pa_prefix=prefix, new_id=lambda: str(uuid.uuid4()), **config)

    return build


def signed(app: Flask, body: dict[str, Any]) -> dict[str, Any]:
    return decide(app.test_client(), body)[1]


def for_patient(body: dict[str, Any], pid: str) -> dict[str, Any]:
    """The same request about another patient (context.patientId, the Patient, every subject and the beneficiary)."""
    return json.loads(json.dumps(body).replace('"pat-1"', f'"{pid}"').replace("Patient/pat-1", f"Patient/{pid}"))


# --- 1. the reuse key of a prior authorization ----------------------------------------------------------------------


def test_two_members_of_one_family_coverage_each_get_their_own_pa(app_on: Callable[..., Flask]) -> None:
    app = app_on("A")
    first = signed(app, hook_request([med_order()], conditions=ACQUIRED))
    # a dependent on the same subscriberId (MEMBER-001), the same Coverage id: another patient for the EHR
    other = for_patient(
        hook_request(
            [med_order(oid="mr-2")],
            conditions=ACQUIRED,
            the_patient=patient(pid="pat-1"),
            the_coverage=coverage(dependent="02"),
        ),
        "pat-2",
    )
    assert other["context"]["patientId"] == "pat-2"
    assert other["prefetch"]["coverage"]["entry"][0]["resource"]["beneficiary"] == {"reference": "Patient/pat-2"}
    second = signed(app, other)
    assert first["pa-needed"] == second["pa-needed"] == ["satisfied"]
    assert first["satisfied-pa-id"] != second["satisfied-pa-id"]
    store = app.extensions["cds"].store
    a, b = (store.prior_auth(x["satisfied-pa-id"][0]) for x in (first, second))
    assert a is not None and b is not None and a.patient_key != b.patient_key


def test_the_patient_key_is_a_hash_that_names_no_one(app_on: Callable[..., Flask]) -> None:
    app = app_on("A")
    info = signed(app, hook_request([med_order()], conditions=ACQUIRED))
    pa = app.extensions["cds"].store.prior_auth(info["satisfied-pa-id"][0])
    assert pa is not None and len(pa.patient_key) == 40 and int(pa.patient_key, 16) >= 0
    for identifier in ("MEMBER-001", "pat-1", "cov-1"):
        assert identifier not in pa.patient_key


def test_a_new_policy_version_does_not_reuse_the_pa(app_on: Callable[..., Flask], tmp_path: Path) -> None:
    before = signed(app_on("A"), hook_request([med_order()], conditions=ACQUIRED))
    revised = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", revised)
    text = (revised / "cigna-ip0356" / "policy.yaml").read_text()
    current = re.search(r'\nversion: "(\d+)"\n', text)
    assert current
    bumped = f'\nversion: "{int(current.group(1)) + 1}"\n'
    (revised / "cigna-ip0356" / "policy.yaml").write_text(text.replace(current.group(0), bumped))
    app = app_on("B", policy_dir=str(revised))  # the same store, the policy at the next version
    after = signed(app, hook_request([med_order(oid="mr-2")], conditions=ACQUIRED))
    assert after["pa-needed"] == ["satisfied"] and after["satisfied-pa-id"] != before["satisfied-pa-id"]
    store = app.extensions["cds"].store
    old, new = int(current.group(1)), int(current.group(1)) + 1
    assert store.prior_auth(before["satisfied-pa-id"][0]).policy == f"cigna-ip0356|{old}"  # type: ignore[union-attr]
    assert store.prior_auth(after["satisfied-pa-id"][0]).policy == f"cigna-ip0356|{new}"  # type: ignore[union-attr]
    again = signed(app, hook_request([med_order(oid="mr-3")], conditions=ACQUIRED))
    assert again["satisfied-pa-id"] == after["satisfied-pa-id"]  # and the new version's is reused under it


def test_another_coverage_does_not_reuse_the_pa(app_on: Callable[..., Flask]) -> None:
    app = app_on("A")
    first = signed(app, hook_request([med_order()], conditions=ACQUIRED))
    second = signed(app, hook_request([med_order(oid="mr-2")], conditions=ACQUIRED, the_coverage=coverage(cid="cov-2")))
    assert second["pa-needed"] == ["satisfied"] and second["satisfied-pa-id"] != first["satisfied-pa-id"]
    assert second["coverage"] == [{"reference": "Coverage/cov-2"}]


def test_the_same_patient_drug_policy_and_coverage_reuse_the_pa(app_on: Callable[..., Flask]) -> None:
    app = app_on("A")
    first = signed(app, hook_request([med_order()], conditions=ACQUIRED))
    again = signed(app, hook_request([med_order()], conditions=ACQUIRED))  # a re-sign, new hookInstance
    other_order = signed(app, hook_request([med_order(oid="mr-2")], conditions=ACQUIRED))
    assert first["satisfied-pa-id"] == again["satisfied-pa-id"] == other_order["satisfied-pa-id"] == ["PA-A00001"]
    assert first["coverage-assertion-id"] != again["coverage-assertion-id"]


def test_one_patient_id_at_two_ehrs_is_two_patients(make_app: Callable[..., Flask], client_key: ClientKey) -> None:
    other_ehr = ClientKey("other-es384")
    app = make_app(
        auth_required=True,
        clients=[
            {"iss": TEST_ISS, "jwks": client_key.jwks},
            {"iss": "https://other-ehr.test/cds-client", "jwks": other_ehr.jwks},
        ],
    )
    aud = f"{BASE}/cds-services/order-sign"
    got = []
    for key, iss in ((client_key, TEST_ISS), (other_ehr, "https://other-ehr.test/cds-client"), (client_key, TEST_ISS)):
        resp = post_hook(
            app.test_client(),
            hook_request([med_order()], conditions=ACQUIRED),
            headers={"Authorization": f"Bearer {key.token(aud, iss=iss)}"},
        )
        assert resp.status_code == 200, resp.get_data(as_text=True)
        got.append(coverage_info(resp.get_json()["systemActions"][0]["resource"])["satisfied-pa-id"])
    assert got[0] != got[1] and got[2] == got[0]  # "pat-1" names someone else at the other EHR


def test_racing_first_signs_of_one_order_share_one_pa(app_on: Callable[..., Flask]) -> None:
    app = app_on("A")
    body = hook_request([med_order()], conditions=ACQUIRED)
    start = threading.Barrier(20)
    answers: list[Any] = []
    errors: list[BaseException] = []

    def sign() -> None:
        client = app.test_client()
        call = {**body, "hookInstance": str(uuid.uuid4())}
        try:
            start.wait()
            resp = post_hook(client, call)
            answers.append((resp.status_code, resp.get_json()))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sign) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(answers) == 20
    assert {status for status, _ in answers} == {200}
    ids = {
        ext["valueString"]
        for _, data in answers
        for e in data["systemActions"][0]["resource"]["extension"]
        for ext in e.get("extension", [])
        if ext["url"] == "satisfied-pa-id"
    }
    assert len(ids) == 1
    store = app.extensions["cds"].store
    pa = store.prior_auth(ids.pop())
    assert pa is not None
    assert [p.pa_id for p in store._active(pa.payer_id, pa.patient_key, pa.product, pa.policy)] == [pa.pa_id]


# --- 2. an impossible dose is never approved ------------------------------------------------------------------------


@pytest.mark.parametrize("dose", [0, -90])
def test_a_dose_that_is_not_positive_is_not_approved(app_on: Callable[..., Flask], dose: float) -> None:
    data, info = decide(app_on("A").test_client(), hook_request([med_order(dose=dose)], conditions=ACQUIRED))
    assert info["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in info
    assert info["covered"] == ["covered"]
    reason = info["reason"][0]["text"]
    assert f"the ordered dose is not a positive amount ({dose} mcg/kg)" in reason, reason
    assert "IP0356-3.dosing" in reason
    assert info.get("doc-needed") == ["clinical"]  # documentation / review, never an authorization


def test_a_body_weight_of_0_kg_is_not_approved(app_on: Callable[..., Flask]) -> None:
    # 90 mcg/kg is within the limit whatever the weight; a chart that says 0 kg is still no basis for approval
    body = hook_request([med_order()], conditions=ACQUIRED, observations=[observation("29463-7", 0, "kg")])
    _, info = decide(app_on("A").test_client(), body)
    assert info["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in info
    assert "the body weight on record is not a positive amount (0 kg)" in info["reason"][0]["text"]


def test_a_mass_dose_with_a_body_weight_of_0_kg_is_not_approved(app_on: Callable[..., Flask]) -> None:
    order = med_order(dose=6.3, dose_unit="mg", every_hours=24)
    body = hook_request([order], conditions=ACQUIRED, observations=[observation("29463-7", 0, "kg")])
    _, info = decide(app_on("A").test_client(), body)
    assert info["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in info
    assert "(0 kg)" in info["reason"][0]["text"]


def test_order_select_names_the_impossible_dose_too(app_on: Callable[..., Flask]) -> None:
    body = hook_request([med_order(dose=0)], conditions=ACQUIRED, hook="order-select")
    _, info = decide(app_on("A").test_client(), body, "order-select")
    assert info["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in info
    assert "the ordered dose is not a positive amount (0 mcg/kg)" in info["reason"][0]["text"]


RULE = DoseRule(
    "X-1.dosing", "per_kg", "Up to 900 mcg/kg per 28 days", {"amount": 900, "unit": "ug/kg", "per_days": 28}
)


def dose_result(
    mappings: Mappings, order: dict[str, Any], weight: Any = 70, answers: Answers = NO_ANSWERS, rule: DoseRule = RULE
) -> Any:
    facts = StaticFacts(mappings, {"obs.body_weight": weight} if weight is not None else {}, FIXED_NOW.date())
    return check(rule, order, facts, answers, FIXED_NOW.date())


@pytest.mark.parametrize(
    "order, said",
    [
        ({"dose": [0, "ug/kg"], "every": [2, "h"]}, "the ordered dose is not a positive amount (0 ug/kg)"),
        # a possible dispense does not make a negative dose possible (before: the dispense figure decided)
        ({"dose": [-90, "ug/kg"], "every": [2, "h"], "dispense": [6, "mg"]}, "(-90 ug/kg)"),
        ({"dispense": [0, "mg"], "supply_days": 28}, "the dispense quantity is not a positive amount (0 mg)"),
        ({"dispense": [-63, "mg"]}, "the dispense quantity is not a positive amount (-63 mg)"),
        ({"dose": [90, "ug/kg"], "every": [0, "h"]}, "the dosage timing is not possible (period 0 h)"),
        ({"dose": [90, "ug/kg"], "every": [-2, "h"]}, "the dosage timing is not possible (period -2 h)"),
        ({"dispense": [21, "mg"], "supply_days": 0}, "the expected supply duration is not a positive amount (0 d)"),
        ({"dispense": [21, "mg"], "supply_days": 7, "refills": -4}, "the number of refills is not possible (-4)"),
    ],
)
def test_impossible_amounts_leave_the_rule_undecided(mappings: Mappings, order: dict[str, Any], said: str) -> None:
    r = dose_result(mappings, build_order(order))
    assert r.state is State.UNKNOWN and r.impossible and said in r.note, r.note


def test_a_frequency_of_0_is_not_read_as_once(mappings: Mappings) -> None:
    order = build_order({"dose": [90, "ug/kg"], "every": [2, "h"]})
    order["dosageInstruction"][0]["timing"]["repeat"]["frequency"] = 0  # was read as `frequency or 1`
    r = dose_result(mappings, order)
    assert r.state is State.UNKNOWN and "frequency 0" in r.note


@pytest.mark.parametrize(
    "rate", [{"rateQuantity": {"value": 0, "unit": "ug/min", "code": "ug/min", "system": "http://unitsofmeasure.org"}}]
)
def test_a_rate_of_0_is_undecided(mappings: Mappings, rate: dict[str, Any]) -> None:
    rule = DoseRule("X-2.dosing", "usual_rate", "Usual dose up to 10 mcg/min", {"max": 10, "unit": "ug/min"})
    order = build_order({"fhir": {"dosageInstruction": [{"doseAndRate": [rate]}]}})
    r = dose_result(mappings, order, rule=rule)
    assert r.state is State.UNKNOWN and "the ordered rate is not a positive amount (0 ug/min)" in r.note


def test_an_answer_cannot_approve_an_impossible_order(mappings: Mappings) -> None:
    order = build_order({"dose": [0, "ug/kg"], "every": [2, "h"]})
    r = dose_result(mappings, order, answers=Answers({"X-1.dosing": True}))
    assert r.state is State.UNKNOWN and r.impossible


def test_a_positive_weight_answered_replaces_an_impossible_one_on_record(mappings: Mappings) -> None:
    order = build_order({"dispense": [63, "mg"], "supply_days": 28})
    on_record = dose_result(mappings, order, weight=0)
    assert on_record.state is State.UNKNOWN and on_record.ask == "weight" and "(0 kg)" in on_record.note
    answered = dose_result(mappings, order, weight=0, answers=Answers({"X-1.dosing": Quantity(70, "kg")}))
    assert answered.state is State.MET and answered.computed == pytest.approx(900)
    zero = dose_result(mappings, order, weight=None, answers=Answers({"X-1.dosing": Quantity(0, "kg")}))
    assert zero.state is State.UNKNOWN and "the body weight answer is not a positive amount (0 kg)" in zero.note


def test_a_possible_order_is_unchanged(mappings: Mappings) -> None:
    r = dose_result(mappings, build_order({"dose": [30, "ug/kg"], "every": [56, "h"]}))
    assert r.state is State.MET and not r.impossible and r.computed == pytest.approx(360)
