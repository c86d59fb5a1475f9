"""FHIR resources to facts: what counts as evidence, what is unknown, and which reference backs each fact."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from builders import condition, med_order, observation, patient, practitioner, role

from fhir_mappings.extract import ClinicalData, FactFinder, Range
from fhir_mappings.loader import Mappings

TODAY = date(2026, 11, 23)
ALL = frozenset({"patient", "conditions", "observations", "practitioners", "medication_history"})


def facts(mappings: Mappings, order: dict[str, Any] | None = None, **data: Any) -> FactFinder:
    data.setdefault("available", ALL)
    return FactFinder(mappings, ClinicalData(today=TODAY, order=order or med_order(), **data))


def test_an_active_condition_is_proof(mappings: Mappings) -> None:
    f = facts(mappings, conditions=(condition("D68.311", "c1"),)).get("dx.acquired_hemophilia")
    assert f.value is True and f.evidence == ("Condition/c1",)


@pytest.mark.parametrize("status", ["resolved", "inactive", "remission"])
def test_an_inactive_condition_is_not_evidence(mappings: Mappings, status: str) -> None:
    f = facts(mappings, conditions=(condition("D68.311", status=status),)).get("dx.acquired_hemophilia")
    assert f.value is None and f.searched


def test_a_refuted_condition_is_evidence_of_absence(mappings: Mappings) -> None:
    f = facts(mappings, conditions=(condition("D66", "c9", verification="refuted"),)).get("dx.hemophilia_a")
    assert f.value is False and f.evidence == ("Condition/c9",)


def test_a_non_specific_code_is_partial(mappings: Mappings) -> None:
    f = facts(mappings, conditions=(condition("D68.2", "c2"),)).get("dx.factor_vii_deficiency")
    assert f.value is None and f.partial is True and f.evidence == ("Condition/c2",)


def test_the_order_reason_counts(mappings: Mappings) -> None:
    order = med_order(reasonCode=[{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "D67"}]}])
    f = facts(mappings, order).get("dx.hemophilia_b")
    assert f.value is True and f.evidence == ("MedicationRequest/mr-1#reasonCode",)


def test_conditions_not_available_are_not_searched(mappings: Mappings) -> None:
    f = facts(mappings, available=frozenset()).get("dx.hemophilia_a")
    assert f.value is None and not f.searched


def test_the_latest_final_lab_is_converted_to_the_input_unit(mappings: Mappings) -> None:
    older = observation("29463-7", 150, "[lb_av]", when="2026-01-01", oid="w-old")
    newer = observation("29463-7", 154, "[lb_av]", when="2026-11-01", oid="w-new")
    draft = observation("29463-7", 999, "kg", when="2026-11-20", oid="w-prelim", status="preliminary")
    f = facts(mappings, observations=(older, newer, draft)).get("obs.body_weight")
    assert f.value.lo == pytest.approx(69.853, rel=1e-3) and f.evidence == ("Observation/w-new",)
    assert f.observed == date(2026, 11, 1) and f.window_days == 180


def test_a_comparator_widens_the_value(mappings: Mappings) -> None:
    f = facts(mappings, observations=(observation("3204-5", 0.6, "[beth'U]/mL", comparator="<"),)).get(
        "lab.fviii_inhibitor_titer"
    )
    assert f.value == Range(None, 0.6, hi_open=True)


def test_a_unit_that_does_not_fit_makes_the_lab_unknown_not_wrong(mappings: Mappings) -> None:
    f = facts(mappings, observations=(observation("29463-7", 70, "cm"),)).get("obs.body_weight")
    assert f.value is None and "cannot convert" in f.note and f.evidence == ("Observation/obs-29463-7",)


def test_a_lab_without_a_unit_is_unknown(mappings: Mappings) -> None:
    obs = observation("3204-5", 7, "[beth'U]/mL")
    obs["valueQuantity"] = {"value": 7}
    f = facts(mappings, observations=(obs,)).get("lab.fviii_inhibitor_titer")
    assert f.value is None and "no unit" in f.note


def test_age_from_birth_date(mappings: Mappings) -> None:
    f = facts(mappings, patient=patient("2008-11-24")).get("age_years")
    assert f.value == Range.exact(17)
    assert facts(mappings, patient=patient("2008-11-23")).get("age_years").value == Range.exact(18)


def test_a_partial_birth_date_is_a_range_with_a_prefill(mappings: Mappings) -> None:
    f = facts(mappings, patient=patient("2008")).get("age_years")
    assert f.value == Range(17, 18) and f.partial == "2008"


def test_no_patient_means_unknown_age(mappings: Mappings) -> None:
    assert facts(mappings).get("age_years").value is None


def test_specialty_from_the_requesters_role(mappings: Mappings) -> None:
    f = facts(mappings, practitioner_roles=(role("207RH0003X", "r1"),), practitioners=(practitioner(),)).get(
        "prescriber.hematologist"
    )
    assert f.value is True and f.evidence == ("PractitionerRole/r1",)


def test_a_recorded_other_specialty_is_not_a_match(mappings: Mappings) -> None:
    f = facts(mappings, practitioner_roles=(role("207RX0202X", "r1"),)).get("prescriber.hematologist")
    assert f.value is False


def test_a_role_of_another_practitioner_does_not_count(mappings: Mappings) -> None:
    f = facts(mappings, practitioner_roles=(role("207RH0000X", "r2", practitioner="someone-else"),)).get(
        "prescriber.hematologist"
    )
    assert f.value is None


def test_qualification_on_the_practitioner_counts(mappings: Mappings) -> None:
    p = practitioner()
    p["qualification"] = [{"code": {"coding": [{"system": "http://nucc.org/provider-taxonomy", "code": "2080P0207X"}]}}]
    assert facts(mappings, practitioners=(p,)).get("prescriber.hematologist").value is True


def test_drug_identification_from_contained_medication(mappings: Mappings) -> None:
    order = med_order()
    del order["medicationCodeableConcept"]
    order["contained"] = [
        {
            "resourceType": "Medication",
            "id": "m",
            "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "2386870"}]},
        }
    ]
    order["medicationReference"] = {"reference": "#m"}
    finder = facts(mappings, order)
    assert finder.get("drug.sevenfact").value is True and finder.get("drug.novoseven_rt").value is False


def test_medication_history(mappings: Mappings) -> None:
    statement = {
        "resourceType": "MedicationStatement",
        "id": "ms1",
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "00169720101"}]},
    }
    not_taken = dict(statement, id="ms2", status="not-taken")
    assert facts(mappings, medication_history=(statement,)).get("history.novoseven_rt").evidence == (
        "MedicationStatement/ms1",
    )
    assert facts(mappings, medication_history=(not_taken,)).get("history.novoseven_rt").value is False
    assert facts(mappings, available=frozenset()).get("history.novoseven_rt").value is None


def test_a_prior_prescription_of_the_same_drug_is_a_continuation(mappings: Mappings) -> None:
    order = med_order(priorPrescription={"reference": "MedicationRequest/old"})
    assert facts(mappings, order).get("history.novoseven_rt").value is True
