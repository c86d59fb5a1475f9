"""Decisions a clinical pharmacist would sign (issue 7), over the hook with FHIR data: a laboratory result that
confirms what a family diagnosis code leaves open, the order's own reason as the indication requested, and only the
documentation that indication needs."""

from __future__ import annotations

from typing import Any

from builders import LOINC, condition, coverage_info, hook_request, med_order, observation, role
from conftest import BASE, post_hook
from flask.testing import FlaskClient
from hookcalls import asked, decide

FVII_PRESCRIPTION = {"dose": 30, "every_hours": 56, "days": None}  # 30 mcg/kg three times a week: 360 per 28 days
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


def fvii(value: float, *, flag: str | None = None, low: float | None = None, loinc: str = "3198-9") -> dict[str, Any]:
    """A factor VII activity result, with the lab's interpretation flag or its reference range."""
    obs = observation(loinc, value, "%", oid=f"obs-fvii-{loinc}")
    if flag:
        obs["interpretation"] = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": flag}]}
        ]
    if low is not None:
        obs["referenceRange"] = [
            {"low": {"value": low, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}
        ]
    return obs


def weight_and(*more: dict[str, Any]) -> list[dict[str, Any]]:
    return [observation("29463-7", 70, "kg"), *more]


def reason(code: str) -> dict[str, Any]:
    return {"reasonCode": [{"coding": [{"system": ICD10, "code": code}]}]}


def reasons_text(info: dict[str, Any]) -> str:
    return " ".join(r["text"] for r in info.get("reason", []))


# --- 1. labs confirm diagnoses ------------------------------------------------------------------------------------
def test_the_prefetch_asks_for_factor_vii_activity(client: FlaskClient) -> None:
    services = client.get("/cds-services").get_json()["services"]
    observations = next(s for s in services if s["id"] == "order-sign")["prefetch"]["observations"]
    assert f"{LOINC}|3198-9" in observations and f"{LOINC}|3197-1" in observations


def test_d68_2_with_a_low_factor_vii_flag_is_congenital_fvii_deficiency_and_approved(client: FlaskClient) -> None:
    """The tester's case: D68.2 on record and on the order, factor VII far below normal, hematologist, within
    900 mcg/kg per 28 days: approved at once, nothing asked."""
    order = med_order(**FVII_PRESCRIPTION, **reason("D68.2"))
    body = hook_request([order], conditions=[condition("D68.2")], observations=weight_and(fvii(3, flag="LL")))
    _, info = decide(client, body)
    assert info["pa-needed"] == ["satisfied"] and info["satisfied-pa-id"]
    assert "IP0356-1 " in reasons_text(info)


def test_a_result_under_the_reference_range_low_confirms_it_too(client: FlaskClient) -> None:
    body = hook_request(
        [med_order(**FVII_PRESCRIPTION)], conditions=[condition("D68.2")], observations=weight_and(fvii(9, low=65))
    )
    _, info = decide(client, body)
    assert info["pa-needed"] == ["satisfied"]


def test_a_units_per_volume_result_counts_as_well(client: FlaskClient) -> None:
    obs = observation("3197-1", 0.04, "[IU]/mL", oid="obs-fvii-iu")
    obs["interpretation"] = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "L"}]}
    ]
    body = hook_request([med_order(**FVII_PRESCRIPTION)], conditions=[condition("D68.2")], observations=weight_and(obs))
    _, info = decide(client, body)
    assert info["pa-needed"] == ["satisfied"]


def test_a_normal_factor_vii_leaves_the_indication_to_the_form_and_asks_nothing_else(client: FlaskClient) -> None:
    body = hook_request(
        [med_order(**FVII_PRESCRIPTION)], conditions=[condition("D68.2")], observations=weight_and(fvii(90, flag="N"))
    )
    _, info = decide(client, body)
    assert info["pa-needed"] == ["auth-needed"]
    assert asked(client, info) == ["IP0356-MNC"]


def test_liver_disease_on_record_keeps_a_low_factor_vii_from_confirming(client: FlaskClient) -> None:
    body = hook_request(
        [med_order(**FVII_PRESCRIPTION)],
        conditions=[condition("D68.2"), condition("K74.60")],
        observations=weight_and(fvii(20, flag="L")),
    )
    _, info = decide(client, body)
    assert info["pa-needed"] == ["auth-needed"]


# --- 2. the order's reason is the indication requested --------------------------------------------------------------
def test_a_sevenfact_order_for_congenital_fvii_deficiency_is_not_covered_with_novoseven_proposed(
    client: FlaskClient,
) -> None:
    order = med_order(code="J7212", **FVII_PRESCRIPTION, **reason("D68.2"))
    body = hook_request([order], conditions=[condition("D68.2")], observations=weight_and(fvii(3, flag="LL")))
    data, info = decide(client, body)
    assert info["covered"] == ["not-covered"]
    assert "IP0355-NC.2" in reasons_text(info)
    alternatives = [c for c in data["cards"] if c["source"]["topic"]["code"] == "therapy-alternatives-opt"]
    assert alternatives and "NovoSeven RT" in alternatives[0]["detail"]


def test_a_sevenfact_order_whose_reason_is_d68_2_alone_is_any_other_use_without_questions(client: FlaskClient) -> None:
    """The tester's case: no inhibitor questions for an order whose stated reason is not hemophilia A or B."""
    order = med_order(code="J7212", **reason("D68.2"))
    data, info = decide(client, hook_request([order], conditions=[condition("D68.2")]))
    assert info["covered"] == ["not-covered"] and "questionnaire" not in info
    text = reasons_text(info)
    assert "IP0355-NC" in text and "not one of the IP0355 indications" in text
    assert not [c for c in data["cards"] if c["source"]["topic"]["code"] == "therapy-alternatives-opt"]


def test_a_reason_by_reference_to_a_condition_counts(client: FlaskClient) -> None:
    order = med_order(code="J7212", reasonReference=[{"reference": "Condition/cond-D682"}])
    _, info = decide(client, hook_request([order], conditions=[condition("D68.2")]))
    assert info["covered"] == ["not-covered"]


def test_a_reason_naming_one_indication_asks_only_its_documentation(client: FlaskClient) -> None:
    """Hemophilia A and acquired hemophilia both on record; the order is for hemophilia A: its inhibitor items only."""
    order = med_order(**reason("D66"))
    body = hook_request([order], conditions=[condition("D66"), condition("D68.311")], roles=[role("207RH0000X")])
    _, info = decide(client, body)
    assert asked(client, info) == ["IP0356-4A.i", "IP0356-4A.ii", "IP0356-4A.iii"]


def test_a_reason_naming_only_a_bleed_leaves_the_record_to_decide(client: FlaskClient) -> None:
    order = med_order(**reason("K92.2"))
    body = hook_request([order], conditions=[condition("D68.311")])
    _, info = decide(client, body)
    assert info["pa-needed"] == ["satisfied"]


def test_no_stated_reason_decides_from_the_record_as_before(client: FlaskClient) -> None:
    _, info = decide(client, hook_request([med_order()], conditions=[condition("D68.311")]))
    assert info["pa-needed"] == ["satisfied"]


def test_the_questionnaire_canonical_for_the_d68_2_reason_asks_the_diagnosis_alone(client: FlaskClient) -> None:
    order = med_order(**FVII_PRESCRIPTION, **reason("D68.2"))
    _, info = decide(client, hook_request([order], conditions=[condition("D68.2"), condition("D66")]))
    assert info["questionnaire"][0].startswith(f"{BASE}/fhir/Questionnaire/")
    assert asked(client, info) == ["IP0356-1"]


# --- impossible orders of products without dose rules ----------------------------------------------------------------
def test_a_zero_dose_of_a_drug_without_dose_rules_is_not_approved(client: FlaskClient) -> None:
    """PHARMACY-109 has no dose rule; an order of 0 units is still not something to authorize."""
    from builders import coverage

    order = med_order(code="J1411", dose=0, dose_unit="{kit}", every_hours=24, days=1)
    body = hook_request([order], the_coverage=coverage("ny-pharmacy-109"), conditions=[condition("D67")])
    _, info = decide(client, body)
    assert info.get("pa-needed") != ["satisfied"] and "satisfied-pa-id" not in info
    assert "not a positive amount" in reasons_text(info)


# --- several drafts of one drug in one call ---------------------------------------------------------------------
def test_two_drafts_each_within_the_limit_but_over_it_together_are_not_approved(client: FlaskClient) -> None:
    """Two NovoSeven RT drafts of 7 days each (7,560 mcg/kg each, 15,120 together) against IP0356-3's 10,800 per
    28 days: neither is approved; the reason says the orders were read together."""
    orders = [med_order(oid="mr-a", days=7), med_order(oid="mr-b", days=7)]
    resp = post_hook(client, hook_request(orders, conditions=[condition("D68.311")]))
    assert resp.status_code == 200
    infos = [coverage_info(a["resource"]) for a in resp.get_json()["systemActions"]]
    assert len(infos) == 2
    for info in infos:
        assert info["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in info
        assert "orders of this call together" in reasons_text(info)
        assert "15,120 mcg/kg" in reasons_text(info) and "ug/kg" not in reasons_text(info)  # the seeds' units


def test_two_drafts_within_the_limit_together_share_one_authorization(client: FlaskClient) -> None:
    orders = [med_order(oid="mr-a", days=2), med_order(oid="mr-b", days=2)]  # 2,160 + 2,160 mcg/kg
    resp = post_hook(client, hook_request(orders, conditions=[condition("D68.311")]))
    infos = [coverage_info(a["resource"]) for a in resp.get_json()["systemActions"]]
    assert [i["pa-needed"] for i in infos] == [["satisfied"], ["satisfied"]]
    assert infos[0]["satisfied-pa-id"] == infos[1]["satisfied-pa-id"]
