"""PHARMACY-109 (ph109-gene-therapy) and BCBSKS Hemgenix (bcbsks-hemgenix): the facts the pharmacist's review
changed (C1 baseline factor level, C2 administrations only, C3 / C5 / C18 / C19 / C21 code rows, C4 / C15 earlier
inhibitor titers), from FHIR resources through the engine."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from builders import condition, med_order, observation, patient

from fhir_mappings.extract import ClinicalData, FactFinder
from fhir_mappings.loader import Mappings
from policies.engine import Answers, evaluate
from policies.loader import PolicySet
from policies.model import State

TODAY = date(2026, 11, 23)
ALL = frozenset({"patient", "conditions", "observations", "practitioners", "medication_history"})
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"


def facts(mappings: Mappings, order: dict[str, Any] | None = None, **data: Any) -> FactFinder:
    data.setdefault("available", ALL)
    return FactFinder(mappings, ClinicalData(today=TODAY, order=order or med_order(code="J1411"), **data))


def given(kind: str, status: str, rid: str, code: str = "J1411", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": kind,
        "id": rid,
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": HCPCS, "code": code}]},
        **extra,
    }


# --- C1: the lowest factor level at any date -------------------------------------------------------------------------


def test_the_lowest_factor_ix_result_is_read_not_the_latest_trough(mappings: Mappings) -> None:
    baseline = observation("3187-2", 1, "%", when="2010-01-01", oid="fix-2010")
    trough = observation("3187-2", 15, "%", when="2026-10-15", oid="fix-trough")
    f = facts(mappings, observations=(baseline, trough)).get("lab.fix_activity")
    assert f.value.hi == 1 and f.evidence == ("Observation/fix-2010",)


def test_a_less_than_result_is_lower_than_the_same_number(mappings: Mappings) -> None:
    lt = observation("3209-4", 1, "%", when="2012-03-01", oid="f8-lt", comparator="<")
    one = observation("3209-4", 1, "%", when="2011-03-01", oid="f8-one")
    trough = observation("3209-4", 12, "%", when="2026-10-20", oid="f8-trough")
    f = facts(mappings, observations=(one, trough, lt)).get("lab.fviii_activity")
    assert f.evidence == ("Observation/f8-lt",) and f.value.hi_open


def ph109_hemgenix(policies: PolicySet, mappings: Mappings, answers: dict[str, Any] | None = None, **data: Any) -> Any:
    policy = policies.policies["ph109-gene-therapy"]
    product = next(p for p in policy.products if p.id == "hemgenix")
    order = med_order(code="J1411", dose=None)
    data.setdefault("patient", patient("1980-01-01"))
    f = facts(mappings, order, **data)
    return evaluate(policy, product, mappings, f, order, TODAY, Answers(answers or {}))


def states(det: Any) -> dict[str, State]:
    return {x.id: x.state for finding in det.findings() for x in finding.walk() if x.id}


def test_ph109_h3_met_by_the_2010_result_despite_a_15_percent_trough(policies: PolicySet, mappings: Mappings) -> None:
    det = ph109_hemgenix(
        policies,
        mappings,
        conditions=(condition("D67"),),
        observations=(
            observation("3187-2", 1, "%", when="2010-01-01", oid="fix-2010"),
            observation("3187-2", 15, "%", when="2026-10-15", oid="fix-trough"),
        ),
        medication_history=(given("MedicationStatement", "active", "ms-idelvion", code="J7202"),),
    )
    h3 = next(x for f in det.findings() for x in f.walk() if x.id == "PH109-H3")
    assert h3.state is State.MET and h3.evidence == ("Observation/fix-2010",)


def test_ph109_h3_a_trough_alone_is_open_not_failed(policies: PolicySet, mappings: Mappings) -> None:
    det = ph109_hemgenix(
        policies,
        mappings,
        conditions=(condition("D67"),),
        observations=(observation("3187-2", 15, "%", when="2026-10-15"),),
    )
    assert states(det)["PH109-H3"] is State.UNKNOWN and states(det)["PH109-H3.lab"] is State.NOT_MET


# --- C2: an earlier order is not an administration ------------------------------------------------------------------


def test_an_earlier_order_only_suggests_gene_therapy_was_given(mappings: Mappings) -> None:
    earlier = given("MedicationRequest", "active", "hem-earlier", authoredOn="2026-11-02")
    f = facts(mappings, medication_history=(earlier,)).get("history.gene_therapy")
    assert f.value is None and f.partial is True and f.evidence == ("MedicationRequest/hem-earlier",)
    assert "2026-11-02" in f.note


@pytest.mark.parametrize(
    ("kind", "status"),
    [("MedicationAdministration", "completed"), ("MedicationAdministration", "in-progress"),
     ("MedicationStatement", "completed"), ("MedicationStatement", "active")],
)  # fmt: skip
def test_an_administration_proves_gene_therapy_was_given(mappings: Mappings, kind: str, status: str) -> None:
    earlier = given("MedicationRequest", "active", "hem-earlier")
    done = given(kind, status, "hem-given")
    f = facts(mappings, medication_history=(earlier, done)).get("history.gene_therapy")
    assert f.value is True and f.evidence == (f"{kind}/hem-given",)


@pytest.mark.parametrize(
    ("kind", "status"), [("MedicationStatement", "intended"), ("MedicationAdministration", "not-done")]
)
def test_intended_or_not_done_is_not_an_administration(mappings: Mappings, kind: str, status: str) -> None:
    f = facts(mappings, medication_history=(given(kind, status, "x"),)).get("history.hemgenix")
    assert f.value is False


def test_a_prior_prescription_only_suggests_hemgenix_was_given(mappings: Mappings) -> None:
    order = med_order(code="J1411", priorPrescription={"reference": "MedicationRequest/old"})
    f = facts(mappings, order).get("history.hemgenix")
    assert f.value is None and f.partial is True


def test_ph109_h7_and_bcbsks_iii3_with_an_earlier_order(policies: PolicySet, mappings: Mappings) -> None:
    earlier = given("MedicationRequest", "active", "hem-earlier", authoredOn="2026-11-02")
    det = ph109_hemgenix(policies, mappings, conditions=(condition("D67"),), medication_history=(earlier,))
    assert states(det)["PH109-H7"] is State.UNKNOWN
    administered = given("MedicationAdministration", "completed", "hem-given")
    det = ph109_hemgenix(policies, mappings, conditions=(condition("D67"),), medication_history=(earlier, administered))
    assert states(det)["PH109-H7"] is State.NOT_MET and det.decision.value == "not-covered"

    policy = policies.policies["bcbsks-hemgenix"]
    product = policy.products[0]
    order = med_order(code="J1411", dose=None)
    for history, iii3, continuation in (
        ((earlier,), State.UNKNOWN, False),
        ((earlier, administered), State.NOT_MET, True),
    ):
        f = facts(mappings, order, conditions=(condition("D67"),), medication_history=history)
        det = evaluate(policy, product, mappings, f, order, TODAY, Answers({}))
        assert states(det)["KS-III.3"] is iii3 and det.continuation is continuation


# --- C4 / C15: earlier inhibitor titers ---


def test_the_previous_and_the_highest_inhibitor_titers(mappings: Mappings) -> None:
    obs = (
        observation("3185-6", 1.2, "[beth'U]/mL", when="2019-05-01", oid="t-2019"),
        observation("3185-6", 0.8, "[beth'U]/mL", when="2026-10-15", oid="t-oct"),
        observation("3185-6", 0.2, "[beth'U]/mL", when="2026-11-01", oid="t-nov"),
    )
    f = facts(mappings, observations=obs)
    assert f.get("lab.fix_inhibitor_titer").evidence == ("Observation/t-nov",)
    assert f.get("lab.fix_inhibitor_titer_previous").evidence == ("Observation/t-oct",)
    assert f.get("lab.fix_inhibitor_titer_peak").evidence == ("Observation/t-2019",)
    assert facts(mappings, observations=obs[2:]).get("lab.fix_inhibitor_titer_previous").value is None


# --- code rows (C3, C5, C18, C19, C21) ---


@pytest.mark.parametrize("code", ["D69.6", "D69.3", "D69.0", "D69.2", "D69.59", "D66"])
def test_not_another_coagulation_disorder_for_hemgenix(mappings: Mappings, code: str) -> None:
    f = facts(mappings, conditions=(condition(code),)).get("dx.coag_disorder_not_hem_b")
    assert f.value is None and f.partial is None and f.searched


@pytest.mark.parametrize(("code", "proof"), [("D69.1", True), ("D68.01", True), ("D69.9", None), ("D65", None)])
def test_other_coagulation_disorders_for_hemgenix(mappings: Mappings, code: str, proof: bool | None) -> None:
    f = facts(mappings, conditions=(condition(code),)).get("dx.coag_disorder_not_hem_b")
    assert f.value is proof and (proof or f.partial is True)


def test_hemophilia_b_is_not_an_exclusion_row_for_roctavian(mappings: Mappings) -> None:
    assert facts(mappings, conditions=(condition("D67"),)).get("dx.coag_disorder_not_hem_a").value is None


def test_a_hepatitis_code_is_a_prompt_not_proof_of_active_infection(mappings: Mappings) -> None:
    f = facts(mappings, conditions=(condition("B18.2"),)).get("dx.active_hepatitis")
    assert f.value is None and f.partial is True


@pytest.mark.parametrize(
    ("code", "proof"), [("S06.5X0A", True), ("I60.9", True), ("S06.360A", True), ("S06.370A", None)]
)
def test_intracranial_hemorrhages(mappings: Mappings, code: str, proof: bool | None) -> None:
    f = facts(mappings, conditions=(condition(code),)).get("dx.life_threatening_bleed")
    assert f.value is proof and (proof or f.partial is True)


@pytest.mark.parametrize(("code", "proof"), [("K74.3", True), ("K71.7", True), ("K76.6", None)])
def test_cirrhosis_codes(mappings: Mappings, code: str, proof: bool | None) -> None:
    f = facts(mappings, conditions=(condition(code),)).get("dx.advanced_liver_disease")
    assert f.value is proof and (proof or f.partial is True)


def test_a_quantitative_hcv_rna_reported_not_detected(mappings: Mappings) -> None:
    viral_load = dict(observation("11011-4", 15, "[IU]/mL", when="2026-10-24", comparator="<"))
    viral_load["interpretation"] = [{"coding": [{"code": "ND"}]}]
    assert facts(mappings, observations=(viral_load,)).get("lab.hcv_rna").value == "negative"


def test_coded_inhibitors(mappings: Mappings) -> None:
    assert facts(mappings, conditions=(condition("D68.318"),)).get("dx.factor_inhibitor").value is True


def test_a_quantified_hcv_viral_load_is_detected(mappings: Mappings) -> None:
    """Review C21: a quantitative HCV RNA (11011-4) with an amount is a detected one; "<15 IU/mL" alone is not read
    (below quantitation may still be detected), unless the lab flags or words it."""
    quantified = observation("11011-4", 52000, "[IU]/mL", oid="obs-vl")
    assert facts(mappings, observations=(quantified,)).get("lab.hcv_rna").value == "positive"
    below = observation("11011-4", 15, "[IU]/mL", oid="obs-vl", comparator="<")
    assert facts(mappings, observations=(below,)).get("lab.hcv_rna").value is None
    flagged = {**below, "valueString": "not detected"}
    flagged.pop("valueQuantity")
    assert facts(mappings, observations=(flagged,)).get("lab.hcv_rna").value == "negative"


def test_factor_ix_taken_as_needed_is_not_routine_prophylaxis(mappings: Mappings) -> None:
    """Review C17: a current factor IX order "as needed" (on demand) only suggests prophylaxis; a scheduled one
    shows it."""
    scheduled = med_order(code="J7202", oid="mr-fix", status="active")
    on_demand = med_order(code="J7202", oid="mr-fix", status="active")
    on_demand["dosageInstruction"][0]["asNeededBoolean"] = True
    assert facts(mappings, medication_history=(scheduled,)).get("history.fix_prophylaxis").value is True
    fact = facts(mappings, medication_history=(on_demand,)).get("history.fix_prophylaxis")
    assert fact.value is None and fact.partial and "as needed" in fact.note


def test_an_immunoassay_index_is_read_by_its_flag_not_as_a_detected_amount(mappings: Mappings) -> None:
    """HBsAg reported as an S/CO index with the v3 flag N (non-reactive) is negative, not "a quantity, so detected"."""
    index = observation("5196-1", 0.21, "{s_co_ratio}", oid="obs-hbsag")
    index["interpretation"] = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "N"}]}
    ]
    assert facts(mappings, observations=(index,)).get("lab.hbsag").value == "negative"
    index.pop("interpretation")
    assert facts(mappings, observations=(index,)).get("lab.hbsag").value is None
