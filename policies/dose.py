"""Dose rules: whether the amount an order asks for is within the policy's limit, and a proposal at the limit.

Each rule kind is one function here, listed in :data:`DOSE_KINDS` with the parameters it takes (checked when
policies load). A rule ends ``met`` (within the limit), ``not-met`` (over it: review, with a proposal) or ``unknown``
(the figure cannot be computed: the rule then names what to ask).

``per_kg``: the amount per kilogram of body weight over a window of days. The figure is computed two ways, whichever
the order allows, and the larger is used:
- from the dosage: dose × administrations per day × days in the window (capped by ``repeat.count`` and
  ``boundsDuration``);
- from the dispense: ``dispenseRequest.quantity`` per fill × fills within the window (the fills allowed, spread over
  ``expectedSupplyDuration``; with no supply duration one fill is counted).
Mass amounts are divided by the latest body weight; per-kilogram amounts need none. A unit we cannot convert makes the
figure unknown, never a guess.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from fhir_mappings import units
from policies.model import DoseRule, State

if TYPE_CHECKING:
    from policies.engine import Answers, Facts

COVERAGE_INFO_URL = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
_PERIOD_DAYS = {"s": 1 / 86400, "min": 1 / 1440, "h": 1 / 24, "d": 1.0, "wk": 7.0, "mo": 30.0, "a": 365.0}


@dataclass(frozen=True)
class DoseResult:
    rule: DoseRule
    state: State
    note: str
    evidence: tuple[str, ...] = ()
    computed: float | None = None  # the order's figure, in the rule's unit
    proposal: Mapping[str, Any] | None = None  # the order brought within the limit (not-met only)
    ask: str | None = None  # unknown only: "weight" (a body weight answers it) or "attest" (yes / no)

    @property
    def id(self) -> str:
        return self.rule.id


@dataclass(frozen=True)
class DoseKind:
    params: Mapping[str, type | tuple[type, ...]]  # required parameters and their types
    check: Callable[[DoseRule, Mapping[str, Any], Facts, Answers, date], DoseResult]
    inputs: Callable[[DoseRule], tuple[str, ...]]  # the fact inputs the rule reads
    ask_text: Callable[[DoseRule], str]  # the question when the figure cannot be computed


def _days(q: Any) -> float | None:
    if isinstance(q, Mapping) and isinstance(q.get("value"), int | float):
        unit = q.get("code") or q.get("unit")
        if unit in _PERIOD_DAYS:
            return float(q["value"]) * _PERIOD_DAYS[unit]
        try:
            return float(q["value"]) * _PERIOD_DAYS[units.ucum(str(unit))]
        except (units.UnitError, KeyError):
            return None
    return None


def _dosage_figures(order: Mapping[str, Any], window: float) -> tuple[list[tuple[float, str, str]], list[str]]:
    figures: list[tuple[float, str, str]] = []
    problems: list[str] = []
    for di in order.get("dosageInstruction") or ():
        repeat = ((di.get("timing") or {}).get("repeat")) or {}
        for dr in di.get("doseAndRate") or ():
            dq = dr.get("doseQuantity") or (dr.get("doseRange") or {}).get("high")
            if not isinstance(dq, Mapping) or not isinstance(dq.get("value"), int | float):
                continue
            unit = units.quantity_unit(dq)
            if unit is None or not units.is_known(unit):
                problems.append(f"dose unit {unit!r} is not one we can convert")
                continue
            freq = repeat.get("frequencyMax") or repeat.get("frequency") or 1
            period, punit = repeat.get("period"), repeat.get("periodUnit")
            if not isinstance(period, int | float) or punit not in _PERIOD_DAYS or period <= 0:
                problems.append("the dosage has no timing period to compute an amount per day")
                continue
            per_day = float(dq["value"]) * float(freq) / (float(period) * _PERIOD_DAYS[punit])
            total = per_day * window
            bounds = _days(repeat.get("boundsDuration"))
            if bounds is not None:
                total = min(total, per_day * bounds)
            if isinstance(repeat.get("count"), int):
                total = min(total, float(dq["value"]) * (repeat.get("countMax") or repeat["count"]))
            figures.append((total, unit, f"{dq['value']:g} {unit} × {freq:g} every {period:g} {punit}"))
    return figures, problems


def _dispense_figure(order: Mapping[str, Any], window: float) -> tuple[tuple[float, str, str] | None, list[str]]:
    disp = order.get("dispenseRequest") or {}
    qty = disp.get("quantity")
    if not isinstance(qty, Mapping) or not isinstance(qty.get("value"), int | float):
        return None, []
    unit = units.quantity_unit(qty)
    if unit is None or not units.is_known(unit):
        return None, [f"dispense quantity unit {unit!r} is not one we can convert"]
    fills_allowed = 1 + int(disp.get("numberOfRepeatsAllowed") or 0)
    supply = _days(disp.get("expectedSupplyDuration"))
    if supply:
        fills = min(float(fills_allowed), max(1.0, window / supply))
        if supply > window:
            fills = window / supply
    else:
        fills = 1.0
    amount = float(qty["value"]) * fills
    how = f"dispense {qty['value']:g} {unit}" + (f" × {fills:g} fills" if fills != 1 else "")
    return (amount, unit, how), []


def _weight(rule: DoseRule, facts: Facts, answers: Answers, today: date) -> tuple[float | None, tuple[str, ...], str]:
    from policies.engine import Quantity  # the engine imports this module

    answer = answers.get(rule.id)
    if isinstance(answer, Quantity):
        try:
            return units.convert(answer.value, answer.unit, "kg"), answers.evidence(rule.id), ""
        except units.UnitError as exc:
            return None, (), f"the body weight answer: {exc}"
    fact = facts.get(str(rule.params.get("weight_input", "obs.body_weight")))
    if fact.value is None:
        return None, fact.evidence, fact.note or "no body weight on record"
    window = fact.window_days
    if window and fact.observed is not None and (today - fact.observed).days > window:
        return None, fact.evidence, f"the latest body weight ({fact.observed.isoformat()}) is older than {window} days"
    return fact.value.lo, fact.evidence, ""


def _check_per_kg(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    limit, unit, window = float(rule.params["amount"]), str(rule.params["unit"]), float(rule.params["per_days"])
    if answers.get(rule.id) is True:
        return DoseResult(
            rule, State.MET, "the prescriber attests the dose is within the limit", answers.evidence(rule.id)
        )
    figures, problems = _dosage_figures(order, window)
    dispensed, more = _dispense_figure(order, window)
    problems += more
    if dispensed:
        figures.append(dispensed)
    if not figures:
        note = "; ".join(problems) or "the order states neither a dose with timing nor a dispense quantity"
        return DoseResult(rule, State.UNKNOWN, note, ask="attest")
    kg, evidence, weight_note = _weight(rule, facts, answers, today)
    best: tuple[float, str, bool] | None = None  # (per kg in the rule's unit, how, whether the weight was used)
    needs_weight = False
    for amount, amount_unit, how in figures:
        used_weight = False
        try:
            per_kg = units.convert(amount, amount_unit, unit)
        except units.UnitError:
            try:
                micrograms = units.convert(amount, amount_unit, "ug")
            except units.UnitError as exc:
                problems.append(str(exc))
                continue
            if kg is None or kg <= 0:
                needs_weight = True
                continue
            per_kg, used_weight = units.convert(micrograms / kg, "ug/kg", unit), True
        if best is None or per_kg > best[0]:
            best = (per_kg, how, used_weight)
    if best is None:
        if needs_weight:
            return DoseResult(
                rule,
                State.UNKNOWN,
                f"body weight is needed to compute the dose per kg ({weight_note})",
                evidence,
                ask="weight",
            )
        return DoseResult(rule, State.UNKNOWN, "; ".join(problems), ask="attest")
    computed, how, used_weight = best
    if not used_weight:
        evidence = ()
    weight_text = f" at {kg:g} kg" if used_weight and kg is not None else ""
    note = f"{computed:,.0f} {unit} per {window:g} days ({how}{weight_text}); limit {limit:,.0f} {unit}"
    if computed <= limit * (1 + 1e-9):
        return DoseResult(rule, State.MET, note, evidence, computed)
    factor = limit / computed
    return DoseResult(rule, State.NOT_MET, note, evidence, computed, proposal=_scaled(order, factor, window))


def _scaled(order: Mapping[str, Any], factor: float, window: float) -> dict[str, Any]:
    """The order with its stated amounts scaled down by ``factor`` (rounded down); nothing else changed but the
    removal of coverage-information extensions, which spoke of the old amounts."""
    proposal = copy.deepcopy(dict(order))
    for di in proposal.get("dosageInstruction") or ():
        for dr in di.get("doseAndRate") or ():
            dq = dr.get("doseQuantity")
            if isinstance(dq, dict) and isinstance(dq.get("value"), int | float):
                dq["value"] = _floor(dq["value"] * factor)
    qty = (proposal.get("dispenseRequest") or {}).get("quantity")
    if isinstance(qty, dict) and isinstance(qty.get("value"), int | float):
        qty["value"] = _floor(qty["value"] * factor)
    if proposal.get("extension"):
        kept = [e for e in proposal["extension"] if e.get("url") != COVERAGE_INFO_URL]
        if kept:
            proposal["extension"] = kept
        else:
            del proposal["extension"]
    return proposal


def _floor(value: float) -> float | int:
    if value >= 10:
        return int(math.floor(value))
    return math.floor(value * 100) / 100


def _per_kg_text(rule: DoseRule) -> str:
    return (
        f"The requested dose is at most {float(rule.params['amount']):,.0f} {rule.params['unit']} "
        f"per {rule.params['per_days']} days"
    )


DOSE_KINDS: Mapping[str, DoseKind] = {
    "per_kg": DoseKind(
        params={"amount": (int, float), "unit": str, "per_days": int},
        check=_check_per_kg,
        inputs=lambda rule: (str(rule.params.get("weight_input", "obs.body_weight")),),
        ask_text=_per_kg_text,
    ),
}


def check(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    return DOSE_KINDS[rule.kind].check(rule, order, facts, answers, today)


def validate_params(rule_kind: str, params: Mapping[str, Any]) -> str | None:
    """A problem with a rule's parameters, or None. Used when policies load."""
    kind = DOSE_KINDS.get(rule_kind)
    if kind is None:
        return f"unknown dose kind {rule_kind!r}; known: {sorted(DOSE_KINDS)}"
    for name, typ in kind.params.items():
        value = params.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, typ):
            return f"'{name}' is required ({typ})"
        if isinstance(value, int | float) and value <= 0:
            return f"'{name}' must be positive"
    if rule_kind == "per_kg":
        try:
            units.convert(1.0, str(params["unit"]), "ug/kg")
        except units.UnitError as exc:
            return f"per_kg limits need a mass-per-kg unit ({exc})"
    return None
