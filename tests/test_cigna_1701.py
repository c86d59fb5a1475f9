"""Cigna 1701 through the hook: J3490 is shared, so the product comes from the order's NDC, RxNorm or name."""

from __future__ import annotations

from typing import Any

from builders import HCPCS, ICD10, NDC, RXNORM, SCT, UCUM, condition, hook_request, med_order, patient
from flask.testing import FlaskClient
from hookcalls import asked, decide


def j3490(extra: dict[str, str] | None = None, text: str | None = None, **kw: Any) -> dict[str, Any]:
    order = med_order(code="J3490", dose=None, **kw)
    if extra:
        order["medicationCodeableConcept"]["coding"].append(extra)
    if text:
        order["medicationCodeableConcept"]["text"] = text
    return order


def in_encounter(body: dict[str, Any], klass: str, **extra: Any) -> dict[str, Any]:
    """The request, given during an encounter of this class (prefetched as `encounter`)."""
    encounter = {
        "resourceType": "Encounter",
        "id": "enc-1",
        "status": "in-progress",
        "subject": {"reference": "Patient/pat-1"},
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": klass},
        **extra,
    }
    body["prefetch"]["encounter"] = encounter
    body["context"]["encounterId"] = "enc-1"
    return body


def test_an_unlisted_drug_under_j3490_falls_back_to_the_general_criteria(client: FlaskClient) -> None:
    _, info = decide(client, hook_request([j3490(text="Some compounded product")]))
    assert info["pa-needed"] == ["auth-needed"] and info["reason"][0]["text"].startswith("cigna-1701|2:")
    assert asked(client, info) == ["C1701-1A", "C1701-1B"]


def test_ketamine_for_depression_is_not_covered(client: FlaskClient) -> None:
    order = j3490(
        {"system": NDC, "code": "42023-0113-10"}, reasonCode=[{"coding": [{"system": ICD10, "code": "F33.2"}]}]
    )
    data, info = decide(client, hook_request([order]))
    assert info["covered"] == ["not-covered"] and "C1701-Ketalar-NC.2" in info["reason"][0]["text"]


def test_ketamine_with_depression_only_on_the_problem_list_is_asked_about(client: FlaskClient) -> None:
    order = j3490({"system": RXNORM, "code": "6130"})
    _, info = decide(client, hook_request([order], conditions=[condition("F33.2")]))
    assert info["pa-needed"] == ["auth-needed"]
    assert asked(client, info)[0] == "C1701-Ketalar-MNC"


def test_dsuvia_over_36_tablets_in_72_hours_is_reviewed(client: FlaskClient) -> None:
    order = j3490(
        {"system": RXNORM, "code": "2103192"},
        dispenseRequest={"quantity": {"value": 48, "unit": "tablet", "system": UCUM, "code": "{tbl}"}},
    )
    body = in_encounter(hook_request([order]), "EMER")
    data, info = decide(client, body)
    assert info["pa-needed"] == ["auth-needed"]
    assert "the dose also exceeds the limit" in info["reason"][0]["text"] and "48" in info["reason"][0]["text"]
    card = next(c for c in data["cards"] if c["source"]["topic"]["code"] == "therapy-alternatives-opt")
    assert card["suggestions"][0]["actions"][0]["resource"]["dispenseRequest"]["quantity"]["value"] == 36


def test_dsuvia_at_home_is_not_covered(client: FlaskClient) -> None:
    order = j3490({"system": RXNORM, "code": "2103192"})
    body = in_encounter(hook_request([order]), "HH")
    _, info = decide(client, body)
    assert info["covered"] == ["not-covered"] and "C1701-Dsuvia-2" in info["reason"][0]["text"]


def test_macrilen_for_a_bmi_over_40_is_not_covered(client: FlaskClient) -> None:
    from builders import observation

    order = j3490(
        {"system": NDC, "code": "58844-0130-01"}, reasonCode=[{"coding": [{"system": ICD10, "code": "E23.0"}]}]
    )
    _, info = decide(client, hook_request([order], observations=[observation("39156-5", 43, "kg/m2")]))
    assert info["covered"] == ["not-covered"] and "C1701-Macrilen-2" in info["reason"][0]["text"]


def test_regiocit_is_known_by_its_name_and_needs_a_critical_care_setting(client: FlaskClient) -> None:
    order = j3490(text="Regiocit replacement solution 5000 mL")
    crrt = {
        "resourceType": "Procedure",
        "id": "proc-crrt",
        "status": "in-progress",
        "subject": {"reference": "Patient/pat-1"},
        "code": {"coding": [{"system": SCT, "code": "714749008"}]},
    }
    icu = {
        "resourceType": "Location",
        "id": "loc-icu",
        "type": [
            {
                "coding": [
                    {"system": "https://www.cdc.gov/nhsn/cdaportal/terminology/codesystem/hsloc.html", "code": "1027-2"}
                ]
            }
        ],
    }
    from builders import bundle

    body = hook_request(
        [order], the_patient=patient("1970-05-05"), prefetch={"procedures": bundle(crrt), "locations": bundle(icu)}
    )
    body = in_encounter(body, "IMP", location=[{"location": {"reference": "Location/loc-icu"}}])
    _, info = decide(client, body)
    assert info["reason"][0]["text"].startswith("cigna-1701|2:")
    assert asked(client, info) == ["C1701-Regiocit-1.rca"]  # adult, CRRT and the ICU are on record


def test_isoproterenol_above_the_usual_rate_is_reviewed(client: FlaskClient) -> None:
    order = j3490(
        {"system": NDC, "code": "0548-9501-00"},
        dosageInstruction=[
            {"doseAndRate": [{"rateQuantity": {"value": 30, "unit": "mcg/min", "system": UCUM, "code": "ug/min"}}]}
        ],
    )
    _, info = decide(client, hook_request([order], conditions=[condition("I47.21")]))
    assert info["pa-needed"] == ["auth-needed"] and "C1701-Isuprel-9.dosing" in info["reason"][0]["text"]


def test_the_hcpcs_alone_does_not_pick_a_named_product(client: FlaskClient) -> None:
    order = med_order(code="J3490", dose=None)
    order["medicationCodeableConcept"] = {"coding": [{"system": HCPCS, "code": "J3490"}]}
    _, info = decide(client, hook_request([order]))
    assert asked(client, info) == ["C1701-1A", "C1701-1B"]


# --- review C7, C23, C24: what the record shows of the setting, CRRT and heart block --------------------------------

MR_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"


def _category(code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": MR_CATEGORY, "code": code}]}]


def _procedure(system: str, code: str, status: str) -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": f"proc-{code}",
        "status": status,
        "subject": {"reference": "Patient/pat-1"},
        "code": {"coding": [{"system": system, "code": code}]},
    }


def test_regiocit_with_an_inpatient_order_category_and_no_encounter_is_asked_not_denied(client: FlaskClient) -> None:
    from builders import bundle

    order = j3490(text="Regiocit replacement solution 5000 mL", category=_category("inpatient"))
    crrt = _procedure(SCT, "714749008", "in-progress")
    body = hook_request([order], the_patient=patient("1970-05-05"), prefetch={"procedures": bundle(crrt)})
    _, info = decide(client, body)
    assert info["pa-needed"] == ["auth-needed"]
    assert "C1701-Regiocit-2" in asked(client, info)


def test_dsuvia_with_an_outpatient_order_category_is_asked_not_denied(client: FlaskClient) -> None:
    order = j3490({"system": RXNORM, "code": "2103192"}, category=_category("outpatient"))
    _, info = decide(client, hook_request([order]))
    assert info["pa-needed"] == ["auth-needed"] and "C1701-Dsuvia-2" in asked(client, info)


def test_dsuvia_ordered_for_discharge_from_the_ed_is_not_covered(client: FlaskClient) -> None:
    order = j3490({"system": RXNORM, "code": "2103192"}, category=_category("discharge"))
    _, info = decide(client, in_encounter(hook_request([order]), "EMER"))
    assert info["covered"] == ["not-covered"] and "C1701-Dsuvia-2" in info["reason"][0]["text"]


def test_regiocit_with_only_a_past_cpt_90945_asks_whether_the_patient_is_on_crrt(client: FlaskClient) -> None:
    from builders import bundle

    from fhir_mappings.systems import CPT

    order = j3490(text="Regiocit replacement solution 5000 mL")
    dialysis = _procedure(CPT, "90945", "completed")
    body = hook_request([order], the_patient=patient("1970-05-05"), prefetch={"procedures": bundle(dialysis)})
    _, info = decide(client, in_encounter(body, "IMP"))
    assert info["pa-needed"] == ["auth-needed"] and asked(client, info)[0] == "C1701-Regiocit"


def test_a_left_bundle_branch_block_is_not_the_heart_block_of_isuprel_items_1_and_2(client: FlaskClient) -> None:
    order = j3490({"system": NDC, "code": "0548-9501-00"})
    _, info = decide(client, hook_request([order], conditions=[condition("I44.7")]))
    assert asked(client, info)[0] == "C1701-Isuprel-MNC"


def test_an_authorization_in_days_ends_on_the_last_of_them() -> None:
    """Dsuvia's approval lasts 72 hours: signed on the 23rd, valid through the 25th (the day of signing counts)."""
    from datetime import date
    from types import SimpleNamespace

    from cds.authorizations import valid_to as _valid_to

    assert _valid_to(date(2026, 11, 23), SimpleNamespace(authorization_days=3, authorization_months=None)) == date(
        2026, 11, 25
    )
    assert _valid_to(date(2026, 1, 31), SimpleNamespace(authorization_days=None, authorization_months=1)) == date(
        2026, 2, 28
    )


def test_regiocit_with_a_crrt_completed_months_ago_asks_whether_the_patient_is_on_it_now(client: FlaskClient) -> None:
    """Review C23: "patients being treated with CRRT": a CRRT completed in March is not treatment now; it only
    suggests it (asked, prefilled). One in progress proves it (test above)."""
    from builders import bundle

    old = {**_procedure(SCT, "714749008", "completed"), "performedDateTime": "2026-03-01T08:00:00Z"}
    order = j3490(text="Regiocit replacement solution 5000 mL")
    body = hook_request([order], the_patient=patient("1970-05-05"), prefetch={"procedures": bundle(old)})
    _, info = decide(client, in_encounter(body, "IMP"))
    assert info["pa-needed"] == ["auth-needed"] and asked(client, info)[0] == "C1701-Regiocit"
