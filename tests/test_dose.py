"""Dose figures from dosage, quantity and body weight; unknown rather than guessed; a proposal at the limit."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhir_mappings.loader import Mappings
from policies.cases import StaticFacts, build_order
from policies.dose import check
from policies.engine import NO_ANSWERS, Answers, Quantity
from policies.model import DoseRule, State

TODAY = date(2026, 1, 15)
RULE = DoseRule(
    "X-1.dosing", "per_kg", "Up to 900 mcg/kg per 28 days", {"amount": 900, "unit": "ug/kg", "per_days": 28}
)


def result(mappings: Mappings, order: dict[str, Any], weight: Any = 70, answers: Answers = NO_ANSWERS) -> Any:
    facts = StaticFacts(mappings, {"obs.body_weight": weight} if weight is not None else {}, TODAY)
    return check(RULE, build_order(order), facts, answers, TODAY)


@pytest.mark.parametrize(
    "order, expected",
    [
        ({"dose": [30, "ug/kg"], "every": [56, "h"]}, 360),  # three times a week, whole window
        ({"dose": [90, "ug/kg"], "every": [2, "h"], "days": 1}, 1080),  # bounded by boundsDuration
        ({"dose": [90, "ug/kg"], "every": [2, "h"], "count": 4}, 360),  # bounded by count
        ({"dose": [6.3, "mg"], "every": [1, "d"], "days": 3}, 270),  # a mass dose over 70 kg
        ({"dispense": [63, "mg"], "supply_days": 28}, 900),
        ({"dispense": [21, "mg"], "supply_days": 7, "refills": 3}, 1200),  # four fills within the window
        ({"dispense": [21, "mg"], "supply_days": 7, "refills": 1}, 600),  # only two fills allowed
        ({"dispense": [126, "mg"], "supply_days": 56}, 900),  # a supply longer than the window is prorated
    ],
)
def test_figures(mappings: Mappings, order: dict[str, Any], expected: float) -> None:
    r = result(mappings, order)
    assert r.computed == pytest.approx(expected)
    assert r.state is (State.MET if expected <= 900 else State.NOT_MET)


def test_the_larger_of_dosage_and_dispense_is_used(mappings: Mappings) -> None:
    r = result(mappings, {"dose": [30, "ug/kg"], "every": [56, "h"], "dispense": [70, "mg"], "supply_days": 28})
    assert r.computed == pytest.approx(1000) and r.state is State.NOT_MET


def test_a_mass_dose_without_weight_asks_for_it(mappings: Mappings) -> None:
    r = result(mappings, {"dispense": [63, "mg"]}, weight=None)
    assert r.state is State.UNKNOWN and r.ask == "weight"
    answered = result(
        mappings, {"dispense": [63, "mg"]}, weight=None, answers=Answers({"X-1.dosing": Quantity(70, "kg")})
    )
    assert answered.state is State.MET and answered.computed == pytest.approx(900)


def test_a_unit_we_cannot_convert_is_unknown_not_guessed(mappings: Mappings) -> None:
    r = result(mappings, {"dispense": [3, "{vial}"]})
    assert r.state is State.UNKNOWN and r.ask == "attest" and "convert" in r.note


def test_no_amount_at_all_asks_for_an_attestation(mappings: Mappings) -> None:
    r = result(mappings, {})
    assert r.state is State.UNKNOWN and r.ask == "attest"
    attested = result(mappings, {}, answers=Answers({"X-1.dosing": True}))
    assert attested.state is State.MET


def test_the_proposal_scales_each_amount_to_the_limit(mappings: Mappings) -> None:
    order = {"dose": [90, "ug/kg"], "every": [2, "h"], "days": 3, "dispense": [300, "mg"], "supply_days": 28}
    r = result(mappings, order)
    assert r.state is State.NOT_MET and r.computed == pytest.approx(300_000 / 70)
    dose = r.proposal["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"]
    quantity = r.proposal["dispenseRequest"]["quantity"]["value"]
    assert dose == 25 and quantity == 63  # each brought to the limit: 90 × 900/3240 and 300 × 900/4286, rounded down
    assert r.proposal["dosageInstruction"][0]["timing"] == build_order(order)["dosageInstruction"][0]["timing"]
