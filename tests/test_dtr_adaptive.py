"""Adaptive DTR forms (SDC ``$next-question``): the package carries the empty adaptive form, each call appends only
the items the answers so far require and keeps every answer, and the last answer completes the response with the
CRD coverage-information at its root (satisfied-pa-id when the answers meet the policy, DTR §spec-41)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from builders import condition, coverage, coverage_info, hook_request, med_order
from conftest import BASE, post_hook
from flask import Flask
from flask.testing import FlaskClient

from cds import constants

NEXT = "/fhir/Questionnaire/$next-question"
PACKAGE = "/fhir/Questionnaire/$questionnaire-package"
CRITERIA = f"{BASE}/fhir/CodeSystem/policy-criteria"
SMALL_DOSE = {"dose": 30, "every_hours": 24, "days": 3}  # 90 mcg/kg: within every indication's limit


@pytest.fixture
def adaptive_client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(dtr_adaptive=True).test_client()


def sign(client: FlaskClient, code: str = "D68.2", observations: Any = None, **dose: Any) -> dict[str, Any]:
    order = med_order(**(dose or SMALL_DOSE))
    resp = post_hook(client, hook_request([order], conditions=[condition(code)], observations=observations))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return coverage_info(resp.get_json()["systemActions"][0]["resource"])


def package(client: FlaskClient, info: dict[str, Any], *, canonical: str | None = None) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "coverage", "resource": coverage()},
        {"name": "context", "valueString": info["coverage-assertion-id"][0]},
    ]
    if canonical:
        params.append({"name": "questionnaire", "valueCanonical": canonical})
    resp = client.post(PACKAGE, json={"resourceType": "Parameters", "parameter": params})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    bundles = [p["resource"] for p in resp.get_json()["parameter"] if p["name"] == "packagebundle"]
    assert len(bundles) == 1
    found: dict[str, Any] = bundles[0]
    return found


def step(client: FlaskClient, qr: dict[str, Any], *, wrap: bool = False) -> dict[str, Any]:
    body = {"resourceType": "Parameters", "parameter": [{"name": "questionnaire-response", "resource": qr}]}
    resp = client.post(NEXT, json=body if wrap else qr)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    out: dict[str, Any] = resp.get_json()
    assert out["resourceType"] == "QuestionnaireResponse"
    return out


def form(qr: dict[str, Any]) -> dict[str, Any]:
    assert qr["questionnaire"] == f"#{qr['contained'][0]['id']}" and len(qr["contained"]) == 1
    contained: dict[str, Any] = qr["contained"][0]
    return contained


def links(qr: dict[str, Any]) -> list[str]:
    return [i["linkId"] for i in form(qr).get("item", [])]


def answer(qr: dict[str, Any], link: str, value: dict[str, Any]) -> dict[str, Any]:
    """The response with ``link`` answered (a clinician's answer: no information-origin, the server sets it)."""
    out = copy.deepcopy(qr)
    items = [i for i in out.get("item", []) if i["linkId"] != link]
    out["item"] = [*items, {"linkId": link, "answer": [value]}]
    return out


def answers(qr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["linkId"]: i["answer"][0] for i in qr.get("item", [])}


def source(ans: dict[str, Any]) -> str:
    origin = next(e for e in ans["extension"] if e["url"] == constants.DTR_INFORMATION_ORIGIN)
    return str(next(p["valueCode"] for p in origin["extension"] if p["url"] == "source"))


def outcome(qr: dict[str, Any]) -> dict[str, list[Any]]:
    ext = [e for e in qr["extension"] if e["url"] == constants.COVERAGE_INFO_URL]
    assert len(ext) == 1
    found: dict[str, list[Any]] = {}
    for sub in ext[0]["extension"]:
        found.setdefault(sub["url"], []).append(next(v for k, v in sub.items() if k.startswith("value")))
    return found


def check_appends(before: dict[str, Any], after: dict[str, Any]) -> None:
    """A step appends items and keeps every answer given so far."""
    assert links(after)[: len(links(before))] == links(before), "earlier items stay, in order"
    assert len(links(after)) > len(links(before)), "a step asks something new"
    for link, given in answers(before).items():
        assert {k: v for k, v in answers(after)[link].items() if k.startswith("value")} == {
            k: v for k, v in given.items() if k.startswith("value")
        }
    for item in form(after)["item"]:
        assert "enableWhen" not in item, "dtr-questionnaire-adapt items carry no enableWhen"


def check_form_extensions(qr: dict[str, Any]) -> None:
    contained = form(qr)
    assert constants.DTR_ADAPT_PROFILE in contained["meta"]["profile"]
    urls = [e["url"] for e in contained["extension"]]
    assert constants.CQF_LIBRARY in urls and constants.SDC_LAUNCH_CONTEXT in urls
    for item in contained.get("item", []):
        for ext in item.get("extension", []):
            if ext["url"] == constants.SDC_INITIAL_EXPRESSION:
                assert ext["valueExpression"]["language"] == "text/cql" and ext["valueExpression"]["expression"]


def complete_with_pa(client: FlaskClient) -> dict[str, Any]:
    """A NovoSeven order with D68.2 only (hematologist on record), run adaptively to the end with the PA issued."""
    info = sign(client)
    start = package(client, info)["entry"][1]["resource"]
    first = step(client, start)
    check_appends(start, first)
    assert "IP0356-MNC" in links(first) and not any(link.startswith("IP0356-1") for link in links(first))
    assert answers(first)["IP0356-MNC"]["valueCoding"]["code"] == "IP0356-1"
    assert source(answers(first)["IP0356-MNC"]) == "auto-server"
    second = step(client, first)  # the prefilled indication kept: it needs nothing more, the policy is met
    check_appends(first, second)
    new = links(second)[len(links(first)) :]
    assert new == ["clinical-done", "attestation", "issue-pa"]
    issue = form(second)["item"][-1]
    assert issue["type"] == "boolean" and issue["text"] == "Issue the prior authorization now?"
    assert form(second)["item"][-3]["type"] == "display"
    assert second["status"] == "in-progress" and constants.COVERAGE_INFO_URL not in str(second.get("extension"))
    signed = answer(answer(second, "attestation", {"valueBoolean": True}), "issue-pa", {"valueBoolean": True})
    done = step(client, signed)
    assert done["status"] == "completed"
    assert links(done) == links(second), "the last answer asks nothing new"
    assert source(answers(done)["IP0356-MNC"]) == "auto-server", "the untouched prefill stays auto-server"
    assert source(answers(done)["issue-pa"]) == "manual"
    check_form_extensions(done)
    return done


def test_the_package_carries_the_empty_adaptive_form(adaptive_client: FlaskClient) -> None:
    info = sign(adaptive_client)
    standard = info["questionnaire"][0]
    bundle = package(adaptive_client, info)
    q, qr = bundle["entry"][0]["resource"], bundle["entry"][1]["resource"]
    assert q["meta"]["profile"] == [constants.DTR_ADAPT_SEARCH_PROFILE] and "item" not in q
    assert {"url": constants.SDC_ADAPTIVE, "valueUrl": f"{BASE}/fhir"} in q["extension"]
    assert constants.CQF_LIBRARY in [e["url"] for e in q["extension"]]
    assert f"{q['url']}|{q['version']}" == standard.replace("|", "-adaptive|")
    assert q["derivedFrom"] == [standard]
    assert qr["meta"]["profile"] == [constants.DTR_QR_ADAPT_PROFILE] and qr["status"] == "in-progress"
    assert qr["identifier"]["value"] == info["coverage-assertion-id"][0] and qr["subject"]["reference"]
    assert form(qr)["derivedFrom"] == [standard] and "item" not in form(qr) and "item" not in qr
    assert {e["url"] for e in qr["extension"]} >= {constants.DTR_QR_COVERAGE, constants.DTR_QR_CONTEXT}
    assert [e["resource"]["resourceType"] for e in bundle["entry"][2:]].count("Library") >= 1


def test_asking_for_the_adaptive_canonical_gives_the_adaptive_package(client: FlaskClient) -> None:
    info = sign(client)
    assert package(client, info)["entry"][0]["resource"]["meta"]["profile"] == [constants.DTR_QUESTIONNAIRE_PROFILE]
    adaptive = info["questionnaire"][0].replace("|", "-adaptive|")
    q = package(client, info, canonical=adaptive)["entry"][0]["resource"]
    assert q["meta"]["profile"] == [constants.DTR_ADAPT_SEARCH_PROFILE]


def test_a_full_run_issues_the_pa_and_a_second_run_reuses_it(adaptive_client: FlaskClient) -> None:
    done = complete_with_pa(adaptive_client)
    found = outcome(done)
    assert found["covered"] == ["covered"] and found["pa-needed"] == ["satisfied"]
    pa_id = found["satisfied-pa-id"][0]
    again = outcome(complete_with_pa(adaptive_client))
    assert again["satisfied-pa-id"] == [pa_id], "the same order, the same patient: the PA is reused"
    assert again["coverage-assertion-id"] != found["coverage-assertion-id"]


def test_nothing_is_stored_before_the_last_answer(make_app: Callable[..., Flask]) -> None:
    app = make_app(dtr_adaptive=True)
    client = app.test_client()
    store = app.extensions["cds"].store
    info = sign(client)
    aid = info["coverage-assertion-id"][0]
    before = store.assertion(aid)
    qr = step(client, step(client, package(client, info)["entry"][1]["resource"]))
    assert store.assertion(aid) == before, "asking is free: the assertion is settled only by the last answer"
    done = step(client, answer(answer(qr, "attestation", {"valueBoolean": True}), "issue-pa", {"valueBoolean": True}))
    settled = store.assertion(aid)
    assert settled.satisfied_pa_id == outcome(done)["satisfied-pa-id"][0] and settled.questionnaire is None


def test_declining_the_pa_completes_without_issuing_it(adaptive_client: FlaskClient) -> None:
    info = sign(adaptive_client)
    qr = step(adaptive_client, step(adaptive_client, package(adaptive_client, info)["entry"][1]["resource"]))
    done = step(
        adaptive_client,
        answer(answer(qr, "attestation", {"valueBoolean": True}), "issue-pa", {"valueBoolean": False}),
    )
    found = outcome(done)
    assert done["status"] == "completed" and found["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in found


def test_a_run_ending_not_covered_cites_the_failed_criterion(adaptive_client: FlaskClient) -> None:
    info = sign(adaptive_client)
    first = step(adaptive_client, package(adaptive_client, info)["entry"][1]["resource"])
    choice = {"valueCoding": {"system": CRITERIA, "code": "IP0356-2"}}
    chosen = answer(first, "IP0356-MNC", choice)
    second = step(adaptive_client, chosen)
    check_appends(chosen, second)
    new = links(second)[len(links(first)) :]
    assert "IP0356-2A" in new and all(link.startswith("IP0356-2") for link in new), new
    assert source(answers(second)["IP0356-MNC"]) == "override"
    check_form_extensions(second)
    refused = answer(second, "IP0356-2A", {"valueBoolean": False})
    third = step(adaptive_client, refused)
    check_appends(refused, third)
    assert links(third)[len(links(second)) :] == ["clinical-done", "attestation"], "no PA question: not met"
    done = step(adaptive_client, answer(third, "attestation", {"valueBoolean": True}))
    found = outcome(done)
    assert done["status"] == "completed" and found["covered"] == ["not-covered"]
    assert "IP0356-2A" in str(found["reason"]) and "satisfied-pa-id" not in found


def test_a_run_pended_for_review(adaptive_client: FlaskClient) -> None:
    info = sign(adaptive_client, dose=90, every_hours=2, days=3)  # 3,240 mcg/kg: over indication 1's limit
    qr = step(adaptive_client, step(adaptive_client, package(adaptive_client, info)["entry"][1]["resource"]))
    assert links(qr)[-2:] == ["clinical-done", "attestation"]
    done = step(adaptive_client, answer(qr, "attestation", {"valueBoolean": True}), wrap=True)
    found = outcome(done)
    assert done["status"] == "completed" and found["pa-needed"] == ["auth-needed"]
    assert "clinical review" in str(found["reason"]) and "satisfied-pa-id" not in found


def test_prepopulated_items_carry_their_cql(adaptive_client: FlaskClient) -> None:
    """A mass dose without a body weight on record: the weight item comes with its CQL initialExpression and unit,
    and an answer in another unit is converted (the standard form's rules)."""
    info = sign(adaptive_client, "D68.311", observations=[], dose=5, dose_unit="mg", every_hours=24, days=3)
    first = step(adaptive_client, package(adaptive_client, info)["entry"][1]["resource"])
    check_form_extensions(first)
    weight = next(i for i in form(first)["item"] if i["linkId"] == "IP0356-3.dosing")
    expressions = [e for e in weight["extension"] if e["url"] == constants.SDC_INITIAL_EXPRESSION]
    assert expressions and expressions[0]["valueExpression"]["language"] == "text/cql"
    pounds = {"valueQuantity": {"value": 154, "unit": "[lb_av]", "system": constants.UCUM, "code": "[lb_av]"}}
    second = step(adaptive_client, answer(first, "IP0356-3.dosing", pounds))
    assert links(second)[-3:] == ["clinical-done", "attestation", "issue-pa"]
    kilos = {"valueQuantity": {"value": 70, "unit": "kg", "system": constants.UCUM, "code": "kg"}}
    not_a_weight = {"valueQuantity": {"value": 70, "unit": "mL", "system": constants.UCUM, "code": "mL"}}
    assert adaptive_client.post(NEXT, json=answer(first, "IP0356-3.dosing", not_a_weight)).status_code == 400
    assert step(adaptive_client, answer(first, "IP0356-3.dosing", kilos))["status"] == "in-progress"


def test_the_parameters_form_is_accepted(adaptive_client: FlaskClient) -> None:
    start = package(adaptive_client, sign(adaptive_client))["entry"][1]["resource"]
    assert step(adaptive_client, start, wrap=True) == step(adaptive_client, start)


def test_invalid_responses_are_400_operation_outcomes(adaptive_client: FlaskClient) -> None:
    start = package(adaptive_client, sign(adaptive_client))["entry"][1]["resource"]
    first = step(adaptive_client, start)
    no_form = {k: v for k, v in start.items() if k != "contained"}
    unknown = {**start, "identifier": {**start["identifier"], "value": "no-such-assertion"}}
    stray = answer(first, "IP0356-2A", {"valueBoolean": True})
    bad_type = answer(first, "IP0356-MNC", {"valueString": "IP0356-1"})
    bad_code = answer(first, "IP0356-MNC", {"valueCoding": {"system": CRITERIA, "code": "IP0356-9"}})
    tampered = copy.deepcopy(first)
    tampered["contained"][0]["item"].append({"linkId": "made-up", "type": "boolean"})
    cases: list[tuple[Any, int]] = [
        ({"resourceType": "Patient", "id": "x"}, 400),
        (no_form, 400),
        ({"resourceType": "Parameters", "parameter": []}, 400),
        (stray, 400),
        (bad_type, 400),
        (bad_code, 400),
        (tampered, 400),
        ({**first, "item": "nonsense"}, 400),
        (unknown, 404),
        ([1, 2], 400),
    ]
    for body, status in cases:
        resp = adaptive_client.post(NEXT, json=body)
        assert resp.status_code == status, (body, resp.get_data(as_text=True))
        assert resp.get_json()["resourceType"] == "OperationOutcome"
    signed = step(adaptive_client, first)
    unsigned = answer(answer(signed, "attestation", {"valueBoolean": False}), "issue-pa", {"valueBoolean": True})
    assert adaptive_client.post(NEXT, json=unsigned).status_code == 400
    missing = answer(signed, "issue-pa", {"valueBoolean": True})
    assert adaptive_client.post(NEXT, json=missing).status_code == 400
