"""order-sign end to end through the Flask app: the CRD decision table of issue 2, with full prefetch."""

from __future__ import annotations

import json
from typing import Any

import pytest
from builders import (
    COVERAGE_INFO,
    condition,
    coverage_info,
    hook_request,
    med_order,
    observation,
    role,
)
from conftest import BASE, post_hook
from flask.testing import FlaskClient
from hookcalls import check_response_shape


def actions(resp: Any) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    return body.get("systemActions", [])


def only_action(resp: Any) -> dict[str, Any]:
    acts = actions(resp)
    assert len(acts) == 1
    return acts[0]


def sign(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    resp = post_hook(client, body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    data = resp.get_json()
    check_response_shape(data)
    return data


ACQUIRED = [condition("D68.311")]


def test_all_criteria_met_is_satisfied_with_a_pa_id_that_is_stored(client: FlaskClient, app: Any) -> None:
    order = med_order()
    body = sign(client, hook_request([order], conditions=ACQUIRED))
    action = body["systemActions"][0]
    info = coverage_info(action["resource"])
    assert info["covered"] == ["covered"] and info["pa-needed"] == ["satisfied"]
    assert info["satisfied-pa-id"] == ["PA-TEST00001"]
    assert info["coverage"] == [{"reference": "Coverage/cov-1"}]
    assert info["billingCode"][0]["code"] == "J7189"
    assert "doc-needed" not in info and "questionnaire" not in info
    store = app.extensions["cds"].store
    pa = store.prior_auth("PA-TEST00001")
    assert pa is not None and pa.product == "novoseven-rt" and pa.valid_to.isoformat() == "2027-11-23"
    record = store.assertion(info["coverage-assertion-id"][0])
    assert record.policy == "cigna-ip0356|2" and record.decision == "approved"
    assert {c["id"]: c["state"] for c in record.trace["criteria"]}["IP0356-3A"] == "met"
    assert any(c["id"] == "IP0356-3" and "Condition/cond-D68311" in c["evidence"] for c in record.trace["criteria"])


def test_the_pa_is_honoured_on_a_later_call(client: FlaskClient) -> None:
    first = coverage_info(
        sign(client, hook_request([med_order()], conditions=ACQUIRED))["systemActions"][0]["resource"]
    )
    second = coverage_info(
        sign(client, hook_request([med_order(oid="mr-2")], conditions=ACQUIRED))["systemActions"][0]["resource"]
    )
    assert second["satisfied-pa-id"] == first["satisfied-pa-id"]
    assert second["coverage-assertion-id"] != first["coverage-assertion-id"]


def test_the_order_is_echoed_unchanged_except_for_the_extension(client: FlaskClient) -> None:
    order = med_order(
        status="active",
        note=[{"text": "re-sign after edit"}],
        extension=[{"url": "http://example.org/other", "valueString": "kept"}],
    )
    resource = sign(client, hook_request([order], conditions=ACQUIRED))["systemActions"][0]["resource"]
    assert resource["status"] == "active"
    others = [e for e in resource["extension"] if e["url"] != COVERAGE_INFO]
    assert others == order["extension"]
    assert {k: v for k, v in resource.items() if k != "extension"} == {
        k: v for k, v in order.items() if k != "extension"
    }


def test_undecided_criteria_give_auth_needed_with_a_questionnaire_for_exactly_those(client: FlaskClient) -> None:
    # acquired hemophilia, but the prescriber is an oncologist: 3B (or consultation) cannot be decided
    body = sign(client, hook_request([med_order()], conditions=ACQUIRED, roles=[role("207RX0202X")]))
    info = coverage_info(body["systemActions"][0]["resource"])
    assert info["covered"] == ["covered"] and info["pa-needed"] == ["auth-needed"]
    assert info["doc-needed"] == ["clinical"] and info["doc-purpose"] == ["withpa"]
    assert "IP0356-3B" in info["reason"][0]["text"]
    canonical = info["questionnaire"][0]
    url, version = canonical.split("|")
    assert url.startswith(f"{BASE}/fhir/Questionnaire/") and version == "2"  # the policy's version
    questionnaire = client.get(url.removeprefix(BASE)).get_json()
    asked = [i["linkId"] for i in questionnaire["item"] if i["type"] != "display" and i["linkId"] != "attestation"]
    assert asked == ["IP0356-3B"]
    item = next(i for i in questionnaire["item"] if i["linkId"] == "IP0356-3B")
    assert item["type"] == "boolean" and item["prefix"] == "IP0356-3B"
    instructions = [c for c in body["cards"] if c["source"]["topic"]["code"] == "coverage-info"]
    assert instructions and "IP0356-3B" in instructions[0]["detail"]
    # its one link is the clinician's form for this assertion (issue 8), nothing else
    assessed = coverage_info(body["systemActions"][0]["resource"])["coverage-assertion-id"][0]
    assert [link["url"].split("?")[0] for link in instructions[0]["links"]] == [f"{BASE}/dtr/{assessed}"]


def test_a_failed_criterion_is_not_covered_with_a_card_citing_it(client: FlaskClient) -> None:
    from builders import patient

    body = sign(client, hook_request([med_order()], conditions=ACQUIRED, the_patient=patient("2010-01-01")))
    info = coverage_info(body["systemActions"][0]["resource"])
    assert info["covered"] == ["not-covered"] and "pa-needed" not in info
    assert "IP0356-3A" in info["reason"][0]["text"]
    card = next(c for c in body["cards"] if c["source"]["topic"]["code"] == "coverage-info")
    assert "not covered" in card["summary"] and "IP0356-3A" in card["detail"]


def test_not_covered_use_proposes_the_covered_alternative(client: FlaskClient) -> None:
    # Sevenfact for acquired hemophilia: IP0355 names NovoSeven RT as the option
    order = med_order(code="J7212", oid="mr-sevenfact")
    body = sign(client, hook_request([order], conditions=ACQUIRED))
    info = coverage_info(body["systemActions"][0]["resource"])
    assert info["covered"] == ["not-covered"] and "IP0355-NC.1" in info["reason"][0]["text"]
    alt = next(c for c in body["cards"] if c["source"]["topic"]["code"] == "therapy-alternatives-opt")
    action = alt["suggestions"][0]["actions"][0]
    assert action["type"] == "update" and action["resource"]["id"] == "mr-sevenfact"
    codes = {c["code"] for c in action["resource"]["medicationCodeableConcept"]["coding"]}
    assert "J7189" in codes
    assert COVERAGE_INFO not in json.dumps(action["resource"])


def test_dose_over_the_limit_is_auth_needed_with_a_proposal_at_the_limit(client: FlaskClient) -> None:
    # 90 mcg/kg every 2 h for 14 days = 15,120 mcg/kg > 10,800
    body = sign(client, hook_request([med_order(days=14)], conditions=ACQUIRED))
    info = coverage_info(body["systemActions"][0]["resource"])
    assert info["covered"] == ["covered"] and info["pa-needed"] == ["auth-needed"]
    assert "15,120" in info["reason"][0]["text"] and "10,800" in info["reason"][0]["text"]
    card = next(c for c in body["cards"] if c["source"]["topic"]["code"] == "therapy-alternatives-opt")
    proposal = card["suggestions"][0]["actions"][0]["resource"]
    dose = proposal["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"]
    assert dose == 64  # 90 × 10,800 / 15,120 = 64.28, rounded down


def test_a_drug_without_a_policy_is_covered_without_auth(client: FlaskClient) -> None:
    order = med_order(code="105611", system="http://www.nlm.nih.gov/research/umls/rxnorm", dose=None)
    body = sign(client, hook_request([order]))
    info = coverage_info(body["systemActions"][0]["resource"])
    assert info == {**info, "covered": ["covered"], "pa-needed": ["no-auth"]}
    assert body["cards"] == []


def test_hemgenix_has_no_policy_for_cigna(client: FlaskClient) -> None:
    order = med_order(code="J1411", dose=None)
    info = coverage_info(sign(client, hook_request([order]))["systemActions"][0]["resource"])
    assert info["pa-needed"] == ["no-auth"]


def test_each_medication_request_gets_its_own_action_and_other_orders_are_left_alone(client: FlaskClient) -> None:
    service = {
        "resourceType": "ServiceRequest",
        "id": "sr-1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/pat-1"},
        "code": {"text": "CBC"},
    }
    orders = [med_order(oid="mr-a"), med_order(code="J7212", oid="mr-b"), service]
    body = sign(client, hook_request(orders, conditions=ACQUIRED, observations=[observation("29463-7", 70, "kg")]))
    ids = [a["resource"]["id"] for a in body["systemActions"]]
    assert ids == ["mr-a", "mr-b"]
    ids_assertions = {coverage_info(a["resource"])["coverage-assertion-id"][0] for a in body["systemActions"]}
    assert len(ids_assertions) == 2


def test_re_signing_an_order_that_already_carries_the_same_assertion_adds_no_action(client: FlaskClient) -> None:
    first = sign(client, hook_request([med_order()], conditions=ACQUIRED, roles=[role("207RX0202X")]))
    resent = first["systemActions"][0]["resource"]
    again = sign(client, hook_request([resent], conditions=ACQUIRED, roles=[role("207RX0202X")]))
    assert again["systemActions"] == []  # the key, for Inferno; no action for the unchanged order
    changed = dict(resent, dosageInstruction=med_order(days=14)["dosageInstruction"])
    third = sign(client, hook_request([changed], conditions=ACQUIRED, roles=[role("207RX0202X")]))
    assert len(third["systemActions"]) == 1
    exts = [e for e in third["systemActions"][0]["resource"]["extension"] if e["url"] == COVERAGE_INFO]
    assert len(exts) == 1, "the old assertion for the same Coverage is replaced, not duplicated"


@pytest.mark.parametrize(
    "option, topic, kwargs",
    [
        ("guideline", "guideline", {}),
        ("coverage-info", "coverage-info", {"roles": [role("207RX0202X")]}),
        ("therapy-alternatives-opt", "therapy-alternatives-opt", {"days": 14}),
    ],
)
def test_configuration_switches_card_types_off(
    client: FlaskClient, option: str, topic: str, kwargs: dict[str, Any]
) -> None:
    order = med_order(days=kwargs.pop("days", 3))
    with_cards = sign(client, hook_request([order], conditions=ACQUIRED, **kwargs))
    assert any(c["source"]["topic"]["code"] == topic for c in with_cards["cards"])
    without = sign(client, hook_request([order], conditions=ACQUIRED, configuration={option: False}, **kwargs))
    assert not any(c["source"]["topic"]["code"] == topic for c in without["cards"])


def test_coverage_info_false_suppresses_the_system_action(client: FlaskClient) -> None:
    body = sign(client, hook_request([med_order()], conditions=ACQUIRED, configuration={"coverage-info": False}))
    assert body["systemActions"] == []


def test_max_cards_keeps_the_most_important(client: FlaskClient) -> None:
    body = sign(client, hook_request([med_order(days=14)], conditions=ACQUIRED, configuration={"max-cards": 1}))
    assert len(body["cards"]) == 1 and body["cards"][0]["source"]["topic"]["code"] == "therapy-alternatives-opt"


def test_unsolicited_determ_false_issues_no_pa(client: FlaskClient, app: Any) -> None:
    body = sign(client, hook_request([med_order()], conditions=ACQUIRED, configuration={"unsolicited-determ": False}))
    info = coverage_info(body["systemActions"][0]["resource"])
    assert info["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in info
    assert app.extensions["cds"].store.prior_auth("PA-TEST00001") is None


def test_unknown_configuration_codes_are_ignored(client: FlaskClient) -> None:
    body = sign(client, hook_request([med_order()], conditions=ACQUIRED, configuration={"no-such-option": 3}))
    assert body["systemActions"]


def test_request_form_completion_card_carries_task_and_questionnaire(client: FlaskClient) -> None:
    req = hook_request(
        [med_order()], conditions=ACQUIRED, roles=[role("207RX0202X")], configuration={"request-form-completion": True}
    )
    body = sign(client, req)
    form = next(
        c
        for c in body["cards"]
        if c.get("suggestions") and c["suggestions"][0]["actions"][-1]["resource"]["resourceType"] == "Task"
    )
    questionnaire_action, task_action = form["suggestions"][0]["actions"]
    task = task_action["resource"]
    assert task["status"] == "ready" and task["intent"] == "order"
    assert task["code"]["coding"][0]["code"] == "complete-questionnaire"
    assert task["input"][0]["type"]["text"] == "questionnaire"
    info = coverage_info(body["systemActions"][0]["resource"])
    assert task["input"][0]["valueCanonical"] == info["questionnaire"][0]
    assert questionnaire_action["resource"]["resourceType"] == "Questionnaire"
    assert questionnaire_action["extension"]["davinci-crd.if-none-exist"].startswith("url=")
    default = sign(client, hook_request([med_order()], conditions=ACQUIRED, roles=[role("207RX0202X")]))
    assert not any(c.get("suggestions") for c in default["cards"]), "off by default: DTR is preferred (CRD §resp-59)"


def test_every_exchange_is_kept_for_audit(client: FlaskClient, app: Any) -> None:
    req = hook_request([med_order()], conditions=ACQUIRED)
    sign(client, req)
    rows = app.extensions["cds"].store.exchanges_for(req["hookInstance"])
    assert len(rows) == 1 and rows[0]["status"] == 200
    assert json.loads(rows[0]["request"])["hookInstance"] == req["hookInstance"]
    assert "systemActions" in json.loads(rows[0]["response"])


def test_no_patient_data_reaches_the_logs(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    req = hook_request([med_order()], conditions=ACQUIRED)
    sign(client, req)
    post_hook(client, {**req, "context": {"patientId": "pat-1"}})
    text = caplog.text
    for secret in ("Testpatient", "Casey", "1980-04-02", "MEMBER-001", "D68.311", "pat-1", "ehr-token"):
        assert secret not in text
    assert req["hookInstance"] in text


def test_continuation_asks_for_beneficial_response(client: FlaskClient) -> None:
    history = [
        {
            "resourceType": "MedicationStatement",
            "id": "ms-1",
            "status": "completed",
            "subject": {"reference": "Patient/pat-1"},
            "medicationCodeableConcept": {
                "coding": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "J7189"}]
            },
        }
    ]
    body = sign(client, hook_request([med_order()], conditions=ACQUIRED, history=history))
    info = coverage_info(body["systemActions"][0]["resource"])
    assert info["pa-needed"] == ["auth-needed"] and "IP0356-RA.1" in info["reason"][0]["text"]


def test_the_form_completion_card_does_not_create_a_questionnaire_the_ehr_holds(client: FlaskClient) -> None:
    """CRD §dev-20: the service asks the client's FHIR server for the Questionnaire first; held, it is not created."""
    from fake_ehr import FakeEHR

    def form_actions(fhir_server: str) -> list[dict[str, Any]]:
        req = hook_request(
            [med_order()],
            conditions=ACQUIRED,
            roles=[role("207RX0202X")],
            configuration={"request-form-completion": True},
            fhir_server=fhir_server,
        )
        body = sign(client, req)
        form = next(c for c in body["cards"] if c.get("suggestions"))
        return list(form["suggestions"][0]["actions"])

    with FakeEHR() as ehr:
        first = form_actions(ehr.base)
        assert [a["resource"]["resourceType"] for a in first] == ["Questionnaire", "Task"]
        assert any(path.startswith("/fhir/Questionnaire?url=") for path, _ in ehr.requests)
        ehr.add(first[0]["resource"])  # the EHR now holds it
        again = form_actions(ehr.base)
    assert [a["resource"]["resourceType"] for a in again] == ["Task"]


def test_a_long_summary_is_cut_under_140_characters() -> None:
    from cds.crd.cards import summary

    text = "NovoSeven RT: " + "a very long descriptive drug name " * 8
    assert len(summary(text)) == 138 and summary(text).endswith("…")
    assert summary("short") == "short"
