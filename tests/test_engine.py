"""The engine's three-valued logic and the rules around indications, not-covered uses and answers."""

from __future__ import annotations

from datetime import date

import pytest

from fhir_mappings.extract import Range
from fhir_mappings.loader import Mappings
from policies.cases import StaticFacts, build_order
from policies.engine import Answers, Decision, Quantity, compare, evaluate
from policies.loader import PolicySet
from policies.model import State

TODAY = date(2026, 1, 15)


@pytest.mark.parametrize(
    "value, op, threshold, expected",
    [
        (Range.exact(5), ">=", 5, State.MET),
        (Range.exact(4.9), ">=", 5, State.NOT_MET),
        (Range.exact(5), ">", 5, State.NOT_MET),
        (Range.exact(5), "<=", 5, State.MET),
        (Range.exact(5), "<", 5, State.NOT_MET),
        (Range(None, 5, hi_open=True), ">=", 5, State.NOT_MET),
        (Range(None, 5), ">=", 5, State.UNKNOWN),
        (Range(None, 5, hi_open=True), "<", 5, State.MET),
        (Range(6, None), ">=", 5, State.MET),
        (Range(5, None, lo_open=True), ">", 5, State.MET),
        (Range(17, 18), ">=", 18, State.UNKNOWN),
        (Range(18, 19), ">=", 18, State.MET),
        (Range(16, 17), ">=", 18, State.NOT_MET),
        (Range(None, None), "<", 1, State.UNKNOWN),
    ],
)
def test_compare_is_three_valued(value: Range, op: str, threshold: float, expected: State) -> None:
    assert compare(value, op, threshold) is expected


def run(
    policies: PolicySet,
    mappings: Mappings,
    facts: dict[str, object],
    answers: dict[str, object] | None = None,
    policy: str = "cigna-ip0356",
    order: dict[str, object] | None = None,
):  # type: ignore[no-untyped-def]
    p = policies.policies[policy]
    base: dict[str, object] = {"prescriber.hematologist": True, "age_years": 40, "obs.body_weight": 70}
    return evaluate(
        p,
        p.products[0],
        mappings,
        StaticFacts(mappings, {**base, **facts}, TODAY),
        build_order(order or {"dose": [90, "ug/kg"], "every": [2, "h"], "days": 3}),
        TODAY,
        Answers(answers or {}, "QuestionnaireResponse/qr1"),
    )


def test_an_established_diagnosis_makes_the_others_not_apply(policies: PolicySet, mappings: Mappings) -> None:
    det = run(policies, mappings, {"dx.acquired_hemophilia": True})
    assert [r.indication.id for r in det.indications] == ["IP0356-3"] and det.selection is None


def test_with_no_diagnosis_every_indication_is_a_candidate(policies: PolicySet, mappings: Mappings) -> None:
    det = run(policies, mappings, {})
    assert len(det.indications) == 5 and det.selection is not None and det.decision is Decision.NEEDS_INFO


def test_answers_cite_the_questionnaire_response(policies: PolicySet, mappings: Mappings) -> None:
    det = run(
        policies, mappings, {"dx.acquired_hemophilia": True, "prescriber.hematologist": False}, {"IP0356-3B": True}
    )
    finding = next(f for f in det.chosen.findings if f.id == "IP0356-3B")  # type: ignore[union-attr]
    assert finding.state is State.MET and finding.evidence == ("QuestionnaireResponse/qr1#IP0356-3B",)


def test_a_quantity_answer_in_another_unit_is_converted(policies: PolicySet, mappings: Mappings) -> None:
    det = run(policies, mappings, {"dx.hemophilia_a": True}, {"IP0356-4A.i": Quantity(5, "BU")})
    assert det.decision is Decision.APPROVED


def test_a_quantity_answer_in_a_foreign_unit_stays_unknown(policies: PolicySet, mappings: Mappings) -> None:
    det = run(policies, mappings, {"dx.hemophilia_a": True}, {"IP0356-4A.i": Quantity(5, "kg")})
    finding = next(f for f in det.indications[0].findings[1].walk() if f.id == "IP0356-4A.i")
    assert finding.state is State.UNKNOWN and "cannot convert" in finding.note


def test_not_covered_use_does_not_override_an_established_indication(policies: PolicySet, mappings: Mappings) -> None:
    det = run(
        policies,
        mappings,
        {
            "dx.hemophilia_a": True,
            "lab.fviii_inhibitor_titer": 9,
            "dx.advanced_liver_disease": True,
            "dx.gi_or_variceal_bleeding": True,
        },
    )
    assert det.decision is Decision.APPROVED and det.not_covered == ()


def test_the_engine_never_imports_flask() -> None:
    import subprocess
    import sys

    code = (
        "import sys, policies.engine, policies.questions, fhir_mappings.extract; "
        "sys.exit(1 if any(m == 'flask' or m.startswith('flask.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_loaded_policies_are_immutable(policies: PolicySet) -> None:
    from dataclasses import FrozenInstanceError

    policy = policies.policies["cigna-ip0356"]
    with pytest.raises(FrozenInstanceError):
        policy.version = "2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policies.policies["x"] = policy  # type: ignore[index]
