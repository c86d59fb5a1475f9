"""Questionnaires for exactly the missing items: one item per undecided criterion, linkId = criterion id, answer types
fitting the criterion, valid FHIR, served where the canonical points; the draft response carries the prefill."""

from __future__ import annotations

from typing import Any

from builders import condition, coverage_info, hook_request, med_order, observation, patient, role
from conftest import BASE, post_hook
from fhir.resources.R4B.questionnaire import Questionnaire
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
from flask.testing import FlaskClient


def questionnaire_for(client: FlaskClient, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    resp = post_hook(client, body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    info = coverage_info(resp.get_json()["systemActions"][0]["resource"])
    url, version = info["questionnaire"][0].split("|")
    got = client.get(url.removeprefix(BASE))
    assert got.status_code == 200 and got.mimetype == "application/fhir+json"
    q = got.get_json()
    assert q["url"] == url and q["version"] == version
    Questionnaire.model_validate(q)
    return q, info


def items(q: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The questions (not the display items, not the closing attestation)."""
    return {i["linkId"]: i for i in q["item"] if i["type"] != "display" and i["linkId"] != "attestation"}


def enabled(q: dict[str, Any], answers: dict[str, str]) -> list[str]:
    """The questions a form shows for these coded answers (enableWhen on a choice, the only kind the forms use)."""
    return [
        link
        for link, item in items(q).items()
        if all(answers.get(w["question"]) == w["answerCoding"]["code"] for w in item.get("enableWhen", ()))
    ]


def test_the_indication_is_a_choice_and_criteria_follow_it(client: FlaskClient) -> None:
    q, _ = questionnaire_for(client, hook_request([med_order()], conditions=[]))  # no diagnosis on record
    found = items(q)
    choice = found["IP0356-MNC"]
    assert choice["type"] == "choice"
    assert [o["valueCoding"]["code"] for o in choice["answerOption"]] == [
        "IP0356-1",
        "IP0356-2",
        "IP0356-3",
        "IP0356-4",
        "IP0356-5",
        "IP0356-NC",
    ]
    refractory = found["IP0356-2A"]
    assert refractory["type"] == "boolean"
    assert refractory["enableWhen"] == [
        {
            "question": "IP0356-MNC",
            "operator": "=",
            "answerCoding": {"system": f"{BASE}/fhir/CodeSystem/policy-criteria", "code": "IP0356-2"},
        }
    ]


def test_a_non_specific_code_asks_only_the_indication_it_suggests(client: FlaskClient) -> None:
    """D68.2 suggests congenital factor VII deficiency: the choice is prefilled with it, and the other indications'
    criteria (Glanzmann's 2A, the inhibitor items) stay behind their own choice (the hematologist is on record, so
    indication 1 asks nothing more); the card counts that one answer."""
    body = hook_request([med_order()], conditions=[condition("D68.2")])
    q, _ = questionnaire_for(client, body)
    assert enabled(q, {"IP0356-MNC": "IP0356-1"}) == ["IP0356-MNC"]
    assert "IP0356-2A" in enabled(q, {"IP0356-MNC": "IP0356-2"}), "choosing another indication shows its criteria"
    cards = post_hook(client, body).get_json()["cards"]
    assert any("needs 1 answer " in c["summary"] for c in cards), [c["summary"] for c in cards]


def test_a_quantity_item_carries_its_ucum_unit(client: FlaskClient) -> None:
    q, _ = questionnaire_for(client, hook_request([med_order()], conditions=[condition("D66")]))
    titer = items(q)["IP0356-4A.i"]
    assert titer["type"] == "quantity"
    assert titer["extension"][0]["valueCoding"] == {
        "system": "http://unitsofmeasure.org",
        "code": "[beth'U]/mL",
        "display": "[beth'U]/mL",
    }
    assert list(items(q)) == ["IP0356-4A.i", "IP0356-4A.ii", "IP0356-4A.iii"]


def test_a_missing_birth_date_is_asked_as_a_date(client: FlaskClient) -> None:
    q, _ = questionnaire_for(
        client, hook_request([med_order()], conditions=[condition("D68.311")], the_patient=patient(birth=None))
    )
    assert items(q)["IP0356-3A"]["type"] == "date"


def test_a_mass_dose_without_weight_asks_for_the_weight(client: FlaskClient) -> None:
    order = med_order(dose=5, dose_unit="mg", every_hours=24, days=3)
    q, _ = questionnaire_for(client, hook_request([order], conditions=[condition("D68.311")], observations=[]))
    weight = items(q)["IP0356-3.dosing"]
    assert weight["type"] == "quantity" and weight["extension"][0]["valueCoding"]["code"] == "kg"


def test_the_same_open_criteria_give_the_same_questionnaire(client: FlaskClient) -> None:
    body = hook_request([med_order()], conditions=[condition("D68.311")], roles=[role("207RX0202X")])
    q1, i1 = questionnaire_for(client, body)
    q2, i2 = questionnaire_for(
        client, hook_request([med_order()], conditions=[condition("D68.311")], roles=[role("207RX0202X")])
    )
    assert q1 == q2 and i1["questionnaire"] == i2["questionnaire"]
    assert i1["coverage-assertion-id"] != i2["coverage-assertion-id"]
    assert "Testpatient" not in str(q1) and "pat-1" not in str(q1), "a Questionnaire carries no patient data"


def test_partial_evidence_prefills_the_draft_response(client: FlaskClient, app: Any) -> None:
    q, info = questionnaire_for(client, hook_request([med_order()], conditions=[condition("D68.2")]))
    draft = app.extensions["cds"].store.assertion(info["coverage-assertion-id"][0]).draft_response
    QuestionnaireResponse.model_validate(draft)
    assert draft["questionnaire"] == info["questionnaire"][0] and draft["status"] == "in-progress"
    answer = draft["item"][0]
    assert answer["linkId"] == "IP0356-MNC"
    assert answer["answer"][0]["valueCoding"]["code"] == "IP0356-1"
    assert answer["answer"][0]["extension"][0]["extension"][0]["valueCode"] == "auto-server"


def test_a_body_weight_older_than_its_window_counts_as_missing(client: FlaskClient) -> None:
    order = med_order(dose=5, dose_unit="mg", every_hours=24, days=3)
    stale = observation("29463-7", 70, "kg", when="2025-01-01")
    q, _ = questionnaire_for(client, hook_request([order], conditions=[condition("D68.311")], observations=[stale]))
    assert list(items(q)) == ["IP0356-3.dosing"]
    fresh = observation("29463-7", 70, "kg", when="2026-10-01")
    resp = post_hook(client, hook_request([order], conditions=[condition("D68.311")], observations=[fresh]))
    assert coverage_info(resp.get_json()["systemActions"][0]["resource"])["pa-needed"] == ["satisfied"]
