"""Dose rules: is the amount an order asks for within the policy's limit? If not, a proposal within it.

Each rule kind is one function, listed in :data:`DOSE_KINDS` with the parameters it takes (checked when policies load)
and the inputs it reads. A rule ends ``met`` (within), ``not-met`` (over: the request goes to review, often with a
proposal) or ``unknown`` (the figure cannot be computed; ``ask`` says what would settle it). Amounts are read by
:mod:`policies.amounts`; a unit we cannot convert makes the figure unknown, never a guess. So does an amount no order
can mean (a dose, quantity, rate or body weight of zero or less, a frequency or period of zero or less): the rule is
left undecided with a note naming it, and no answer to the rule's question settles it (:func:`check`).

- ``per_kg``: amount per kilogram of body weight over a window of days (IP0356, IP0355).
- ``count_per_window``: counted units (tablets) over a window of hours; mass doses convert by the unit's strength.
  With ``per_authorization: true`` the amount is the whole authorization: the course may not run longer than the
  window, and every fill the order allows counts (Dsuvia, review C22).
- ``units_per_dose``: billable units (kits) one approval covers, refills included (BCBSKS Hemgenix: one kit).
- ``weight_band``: the kit NDC must be the one the policy's table gives for the patient's weight.
- ``usual_rate``: an infusion rate above the usual dose is reviewed (no maximum is established), optionally only for
  an age range. When the age does not place the patient in or out of the range, the rule is met only if the rate is
  within it whatever the age; otherwise the date of birth is asked (``ask="birthdate"``, linkId
  :func:`birthdate_link`), never the weight first, and the rule is not applied to a patient it may not be for.

As-needed (PRN) dosages are not extrapolated over the window: see :mod:`policies.amounts` (review C6).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import date
from typing import TYPE_CHECKING, Any

from cds.constants import COVERAGE_INFO_URL
from fhir_mappings import systems, units
from fhir_mappings.extract import Range, age_range, codings
from policies import amounts
from policies.model import DoseRule, State

if TYPE_CHECKING:
    from policies.engine import Answers, Facts

WEIGHT = "obs.body_weight"
AGE = "age_years"


@dataclass(frozen=True)
class DoseResult:
    rule: DoseRule
    state: State
    note: str
    evidence: tuple[str, ...] = ()
    computed: float | None = None  # the order's figure, in the rule's unit
    proposal: Mapping[str, Any] | None = None  # the order brought within the rule
    proposal_label: str = "Reduce the dose to the policy limit"
    # unknown only: "weight" (a body weight answers it), "birthdate" (the date of birth places the patient in or out
    # of the rule's age range; asked under birthdate_link(rule id)) or "attest" (yes / no)
    ask: str | None = None
    impossible: bool = False  # unknown because the order or the weight states an amount no order can mean

    @property
    def id(self) -> str:
        return self.rule.id


@dataclass(frozen=True)
class DoseKind:
    params: Mapping[str, type | tuple[type, ...]]  # required parameters and their types
    check: Callable[[DoseRule, Mapping[str, Any], Facts, Answers, date], DoseResult]
    inputs: Callable[[DoseRule], tuple[str, ...]]  # the fact inputs the rule reads
    ask_text: Callable[[DoseRule], str]  # the yes/no question when the figure cannot be computed
    validate: Callable[[Mapping[str, Any]], str | None] = lambda params: None


# --- shared ---


@dataclass(frozen=True)
class _Weight:
    kg: float | None  # None: not known (``note`` says why), or not a positive amount (``impossible``)
    evidence: tuple[str, ...]
    note: str = ""
    impossible: bool = False


def _weight(rule: DoseRule, facts: Facts, answers: Answers, today: date) -> _Weight:
    """The body weight in kg: answered for this rule, or the latest on record within its window."""
    from policies.engine import Quantity  # the engine imports this module

    answer = answers.get(rule.id)
    if isinstance(answer, Quantity):
        try:
            kg, evidence, where = units.convert(answer.value, answer.unit, "kg"), answers.evidence(rule.id), "answer"
        except units.UnitError as exc:
            return _Weight(None, (), f"the body weight answer: {exc}")
    else:
        fact = facts.get(WEIGHT)
        if fact.value is None:
            return _Weight(None, fact.evidence, fact.note or "no body weight on record")
        window = fact.window_days
        if window and fact.observed is not None and (today - fact.observed).days > window:
            note = f"the latest body weight ({fact.observed.isoformat()}) is older than {window} days"
            return _Weight(None, fact.evidence, note)
        kg, evidence, where = fact.value.lo, fact.evidence, "on record"
    if kg is not None and (kg <= 0 or not math.isfinite(kg)):
        return _Weight(None, evidence, f"the body weight {where} is not a positive amount ({kg:g} kg)", True)
    return _Weight(kg, evidence)


def _impossible(
    rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date
) -> DoseResult | None:
    """Undecided when the order states an amount no order can mean, or the rule reads a body weight that is not
    positive: such a figure is never compared with the limit.

    Why not "within the limit" (0 is below every maximum) and not a refusal: a dose of 0 or -90 mcg/kg, a dispense
    quantity of 0, a frequency of 0 or a weight of 0 kg is an error in the order or the chart, not a request a
    pharmacist can approve or deny on the criteria. The rule stays unknown, so the answer is "authorization needed"
    with the reason naming the amount: the prescriber corrects the order and signs again, or the request goes to
    review with the order as written. No question is asked for it (no answer could settle it: this is checked
    before answers); the reason and the card name the amount to correct. A positive body weight
    answered for the rule does replace an impossible one on record."""
    problems = amounts.impossible(order)
    if problems:
        return DoseResult(rule, State.UNKNOWN, "; ".join(problems), impossible=True)
    if WEIGHT in DOSE_KINDS[rule.kind].inputs(rule):
        weight = _weight(rule, facts, answers, today)
        if weight.impossible:
            return DoseResult(rule, State.UNKNOWN, weight.note, weight.evidence, ask="weight", impossible=True)
    return None


def _attested(rule: DoseRule, answers: Answers) -> DoseResult | None:
    answer = answers.get(rule.id)
    if isinstance(answer, bool):
        state = State.MET if answer else State.NOT_MET
        return DoseResult(
            rule, state, "attested by the prescriber" if answer else "not attested", answers.evidence(rule.id)
        )
    return None


def num(value: float) -> str:
    """A figure for people: 15,120 and 64 and 0.75, never 1.512e+04."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value != int(value) else f"{int(value)}"


def _floor(value: float) -> float | int:
    return int(math.floor(value)) if value >= 10 else math.floor(value * 100) / 100


def without_coverage_info(order: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the order for a proposal; its coverage-information extensions spoke of the old order."""
    proposal = copy.deepcopy(dict(order))
    kept = [e for e in proposal.get("extension") or () if e.get("url") != COVERAGE_INFO_URL]
    if kept:
        proposal["extension"] = kept
    else:
        proposal.pop("extension", None)
    return proposal


def _scaled(order: Mapping[str, Any], dose_factor: float, dispense_factor: float) -> dict[str, Any]:
    """The order with its dose and dispense amounts scaled down (rounded down); nothing else changed."""
    proposal = without_coverage_info(order)
    for di in proposal.get("dosageInstruction") or ():
        for dr in di.get("doseAndRate") or ():
            dq = dr.get("doseQuantity")
            if isinstance(dq, dict) and isinstance(dq.get("value"), int | float) and dose_factor < 1:
                dq["value"] = _floor(dq["value"] * dose_factor)
    qty = (proposal.get("dispenseRequest") or {}).get("quantity")
    if isinstance(qty, dict) and isinstance(qty.get("value"), int | float) and dispense_factor < 1:
        qty["value"] = _floor(qty["value"] * dispense_factor)
    return proposal


def _limit_check(
    rule: DoseRule,
    order: Mapping[str, Any],
    limit: float,
    unit: str,
    window_days: float,
    per_window: str,
    to_rule_unit: Callable[[float, str], float | None],
    evidence: tuple[str, ...],
    context: Callable[[], str],
    unitless: str | None = None,
    convert: amounts.Convert = units.convert,
    every_fill: bool = False,
) -> DoseResult:
    """The common shape of a limit over a window: figures from dosage and dispense in the rule's unit (the converter
    returns None when it needs the body weight, raises UnitError when the units do not fit), the larger decides;
    over the limit proposes the order scaled to it. ``convert`` reads a maxDosePerPeriod in another unit than the
    dose (a tablet's strength); ``every_fill`` counts every fill the order allows (a limit per authorization).

    An as-needed dosage with no maximum gives no figure (:func:`policies.amounts.dosage_figures`): the dispense
    decides, and the note says the dosage was not counted; with neither, the rule is unknown and asked."""
    dosage, problems = amounts.dosage_figures(order, window_days, convert)
    dispensed, more = amounts.dispense_figure(order, window_days, unitless=unitless, every_fill=every_fill)
    problems += more
    figures = [("dose", f) for f in dosage] + ([("dispense", dispensed)] if dispensed else [])
    if not figures:
        note = "; ".join(problems) or "the order states neither a dose with timing nor a dispense quantity"
        return DoseResult(rule, State.UNKNOWN, note, ask="attest")
    converted: list[tuple[str, float, str]] = []
    needs_weight = False
    for where, (amount, amount_unit, how) in figures:
        try:
            value = to_rule_unit(amount, amount_unit)
        except units.UnitError as exc:
            problems.append(str(exc))
            continue
        if value is None:
            needs_weight = True
            continue
        converted.append((where, value, how))
    if not converted:
        if needs_weight:
            return DoseResult(
                rule, State.UNKNOWN, f"body weight is needed for the dose per kg ({context()})", evidence, ask="weight"
            )
        return DoseResult(rule, State.UNKNOWN, "; ".join(problems), ask="attest")
    where, computed, how = max(converted, key=lambda c: c[1])
    note = f"{num(computed)} {unit} per {per_window} ({how}{context()}); limit {num(limit)} {unit}"
    if where == "dispense" and amounts.PRN_UNCOUNTED in problems:
        note += f"; {amounts.PRN_UNCOUNTED}"
    if computed <= limit * (1 + 1e-9):
        return DoseResult(rule, State.MET, note, evidence, computed)
    factors = {w: min(1.0, limit / v) for w, v, _ in converted}
    proposal = _scaled(order, factors.get("dose", 1.0), factors.get("dispense", 1.0))
    return DoseResult(rule, State.NOT_MET, note, evidence, computed, proposal)


# --- per_kg ---


def _check_per_kg(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    unit = str(rule.params["unit"])
    weight = _weight(rule, facts, answers, today)
    kg, evidence, weight_note = weight.kg, weight.evidence, weight.note
    used_weight: list[bool] = []

    def per_kg(amount: float, amount_unit: str) -> float | None:
        if units.dimension(amount_unit) == units.dimension(unit):
            return units.convert(amount, amount_unit, unit)
        micrograms = units.convert(amount, amount_unit, "ug")  # a mass, or UnitError
        if kg is None or kg <= 0:
            return None
        used_weight.append(True)
        return units.convert(micrograms / kg, "ug/kg", unit)

    def context() -> str:
        if kg is None:
            return weight_note
        return f" at {kg:g} kg" if used_weight else ""

    days = float(rule.params["per_days"])
    result = _limit_check(
        rule, order, float(rule.params["amount"]), unit, days, f"{days:g} days", per_kg, evidence, context
    )
    if not used_weight and result.state is not State.UNKNOWN:
        return DoseResult(result.rule, result.state, result.note, (), result.computed, result.proposal)
    return result


def _validate_per_kg(params: Mapping[str, Any]) -> str | None:
    try:
        units.convert(1.0, str(params["unit"]), "ug/kg")
    except units.UnitError as exc:
        return f"per_kg limits need a mass-per-kg unit ({exc})"
    return None


# --- count_per_window ---


def _strength_convert(strength: Any, counted_unit: str) -> amounts.Convert:
    """UCUM conversion that also knows the strength of one counted unit ("30 ug": a tablet is 30 mcg), so that a
    mass dose counts as tablets and "12 tablets per 24 h" caps a dose written in mcg."""

    def convert(amount: float, from_unit: str, to_unit: str) -> float:
        try:
            return units.convert(amount, from_unit, to_unit)
        except units.UnitError:
            if not strength:
                raise
            value, s_unit = str(strength).split(" ", 1)
            counted = units.dimension(counted_unit)
            if units.dimension(from_unit) == counted:  # counted units to a mass
                return units.convert(units.convert(amount, from_unit, counted_unit) * float(value), s_unit, to_unit)
            if units.dimension(to_unit) == counted:  # a mass to counted units
                return units.convert(units.convert(amount, from_unit, s_unit) / float(value), counted_unit, to_unit)
            raise

    return convert


def _course_days(order: Mapping[str, Any]) -> tuple[float, str] | None:
    """The longest course the order states: a dosage's boundsDuration, or the dispense's expected supply duration."""
    found: list[tuple[float, str]] = []
    for di in order.get("dosageInstruction") or ():
        repeat = ((di.get("timing") or {}).get("repeat")) or {}
        bounds = amounts.days(repeat.get("boundsDuration"))
        if bounds is not None:
            found.append((bounds, "the dosage duration"))
    supply = amounts.days((order.get("dispenseRequest") or {}).get("expectedSupplyDuration"))
    if supply is not None:
        found.append((supply, "the expected supply duration"))
    return max(found) if found else None


def _bounded_course(order: Mapping[str, Any], hours: float) -> dict[str, Any]:
    """The order with its course limited to ``hours`` (boundsDuration and expected supply duration)."""
    proposal = without_coverage_info(order)
    limit = {"value": hours, "unit": "h", "system": systems.UCUM, "code": "h"}
    for di in proposal.get("dosageInstruction") or ():
        repeat = di.setdefault("timing", {}).setdefault("repeat", {})
        bounds = amounts.days(repeat.get("boundsDuration"))
        if bounds is not None and bounds > hours / 24:
            repeat["boundsDuration"] = dict(limit)
    disp = proposal.get("dispenseRequest")
    if isinstance(disp, dict):
        supply = amounts.days(disp.get("expectedSupplyDuration"))
        if supply is not None and supply > hours / 24:
            disp["expectedSupplyDuration"] = dict(limit)
    return proposal


def _check_count(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    unit = units.ucum(str(rule.params["unit"]))
    strength = rule.params.get("strength")  # e.g. "30 ug": the drug in one counted unit
    convert = _strength_convert(strength, unit)

    def counted(amount: float, amount_unit: str) -> float | None:
        return convert(amount, amount_unit, unit)  # or UnitError

    hours = float(rule.params["per_hours"])
    limit = float(rule.params["amount"])
    if not rule.params.get("per_authorization"):
        return _limit_check(
            rule, order, limit, unit, hours / 24, f"{hours:g} hours", counted, (), lambda: "", convert=convert
        )

    # the amount is the whole authorization (Dsuvia "Authorization is limited to 36 tablets per 72 hours", review
    # C22): a course longer than the window is over it, and every fill counts
    def whole(o: Mapping[str, Any]) -> DoseResult:
        window = f"{hours:g} hours"
        return _limit_check(
            rule, o, limit, unit, hours / 24, window, counted, (), lambda: "", convert=convert, every_fill=True
        )

    course = _course_days(order)
    if course is not None and course[0] > hours / 24 * (1 + 1e-9):
        bounded = _bounded_course(order, hours)
        within = whole(bounded)
        proposal = within.proposal if within.proposal is not None else bounded
        return DoseResult(
            rule,
            State.NOT_MET,
            f"a course of {course[0] * 24:g} hours ({course[1]}); the authorization covers {hours:g} hours",
            proposal=proposal,
            proposal_label=f"Limit the course to {hours:g} hours",
        )
    return whole(order)


def _validate_count(params: Mapping[str, Any]) -> str | None:
    try:
        units.ucum(str(params["unit"]))
        if params.get("strength") is not None:
            value, s_unit = str(params["strength"]).split(" ", 1)
            float(value)
            units.ucum(s_unit)
    except (units.UnitError, ValueError) as exc:
        return f"count_per_window: {exc} (strength is written like '30 ug')"
    if not isinstance(params.get("per_authorization", False), bool):
        return "count_per_window: per_authorization is true or false"
    return None


# --- units_per_dose ---


def _check_units(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    unit = units.ucum(str(rule.params["unit"]))
    limit = float(rule.params["amount"])
    dispensed, problems = amounts.dispense_figure(order, 1e9, unitless=unit)  # every fill the order allows
    if dispensed is None:
        return DoseResult(rule, State.UNKNOWN, "; ".join(problems) or "the order states no quantity", ask="attest")
    amount, amount_unit, how = dispensed
    try:
        count = units.convert(amount, amount_unit, unit)
    except units.UnitError:
        return DoseResult(rule, State.UNKNOWN, f"the quantity is in {amount_unit}, not {unit}", ask="attest")
    note = f"{count:g} {unit} requested ({how}); limit {limit:g} {unit} per approval"
    if count <= limit:
        return DoseResult(rule, State.MET, note, computed=count)
    proposal = without_coverage_info(order)
    disp = proposal.setdefault("dispenseRequest", {})
    disp["quantity"] = {"value": limit, "unit": str(rule.params["unit"]), "system": systems.UCUM, "code": unit}
    disp.pop("numberOfRepeatsAllowed", None)
    return DoseResult(
        rule,
        State.NOT_MET,
        note,
        computed=count,
        proposal=proposal,
        proposal_label=f"Request {limit:g} {rule.params['unit']} for one dose",
    )


# --- weight_band ---


def _vials(kg: float, params: Mapping[str, Any]) -> int:
    """Vials for a body weight: ceil(weight × mL per kg / mL per vial)."""
    return math.ceil(kg * float(params["ml_per_kg"]) / float(params["ml_per_vial"]) - 1e-9)


def _check_band(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    weight = _weight(rule, facts, answers, today)
    kg, evidence, weight_note = weight.kg, weight.evidence, weight.note
    if kg is None:
        return DoseResult(
            rule, State.UNKNOWN, f"the kit depends on the body weight ({weight_note})", evidence, ask="weight"
        )
    vials = _vials(kg, rule.params)
    table = {int(row["vials"]): row for row in rule.params["table"]}
    row = table.get(vials)
    if row is None:
        return DoseResult(
            rule, State.NOT_MET, f"{kg:g} kg needs {vials} vials; no kit in the table has that many", evidence
        )
    wanted = systems.ndc_keys(str(row["ndc"]))[0]
    ordered = [
        c
        for c in codings(order.get("medicationCodeableConcept"))
        if systems.canonical_system(c.get("system")) == systems.NDC
    ]
    keys = {k for c in ordered for k in systems.ndc_keys(str(c.get("code", "")))}
    note = f"{kg:g} kg: {vials} vials, kit {wanted} (weight {row['min_kg']}–{row['max_kg']} kg)"
    if not ordered:
        return DoseResult(rule, State.MET, f"{note}; the order names no kit", evidence)
    if wanted in keys:
        return DoseResult(rule, State.MET, note, evidence)
    proposal = without_coverage_info(order)
    concept = proposal.setdefault("medicationCodeableConcept", {"coding": []})
    concept["coding"] = [
        c for c in concept.get("coding") or () if systems.canonical_system(c.get("system")) != systems.NDC
    ]
    concept["coding"].append({"system": systems.NDC, "code": wanted, "display": f"{vials}-vial kit"})
    return DoseResult(
        rule,
        State.NOT_MET,
        f"{note}; the order names {', '.join(sorted(keys))}",
        evidence,
        proposal=proposal,
        proposal_label=f"Order the {vials}-vial kit ({wanted}) for {kg:g} kg",
    )


def _validate_band(params: Mapping[str, Any]) -> str | None:
    table = params.get("table")
    if not isinstance(table, list) or not table:
        return "weight_band needs a table of {vials, min_kg, max_kg, ndc} rows"
    seen = set()
    for i, row in enumerate(table):
        if not isinstance(row, dict) or not {"vials", "min_kg", "max_kg", "ndc"} <= set(row):
            return f"table[{i}] needs vials, min_kg, max_kg and ndc"
        if len(systems.ndc_keys(str(row["ndc"]))) != 1:
            return f"table[{i}]: write the NDC as 5-4-2"
        expected = _vials(float(row["max_kg"]), params)
        if expected != row["vials"]:
            return f"table[{i}]: {row['max_kg']} kg needs {expected} vials, the row says {row['vials']}"
        if row["vials"] in seen:
            return f"table[{i}]: {row['vials']} vials appear twice"
        seen.add(row["vials"])
    return None


# --- usual_rate ---


def birthdate_link(rule_id: str) -> str:
    """The linkId of the date-of-birth question an age-banded rule asks: ``<indication>.birthdate``, the part of the
    rule id before its first '.', so that the adult and the pediatric rule of one indication ask it once
    (``C1701-Isuprel-1.dosing`` and ``C1701-Isuprel-1.dosing-pediatric`` both ask ``C1701-Isuprel-1.birthdate``)."""
    return f"{rule_id.split('.', 1)[0]}.birthdate"


def _placed(age: Range | None, low: float, high: float) -> bool | None:
    """Is every age the range allows in [low, high) (True), none of them (False), or some (None)?"""
    if age is None or age.lo is None or age.hi is None:
        return None
    if age.hi < low or age.lo >= high:
        return False
    if age.lo >= low and age.hi < high:
        return True
    return None


def _age_band(rule: DoseRule, facts: Facts, answers: Answers, today: date) -> tuple[bool | None, str, tuple[str, ...]]:
    """Whether the patient is in the rule's age range: from the record (Patient.birthDate), else from the date of
    birth answered under :func:`birthdate_link`. A record and an answer that place the patient differently leave it
    undecided (neither wins, as for criteria)."""
    ages = rule.params["ages"]
    low, high = float(ages[0]), float(ages[1])
    fact = facts.get(AGE)
    recorded = fact.value if isinstance(fact.value, Range) else None
    on_record = _placed(recorded, low, high)
    record_note = f"age {recorded.describe()} on record" if recorded is not None else fact.note or "no age on record"
    link = birthdate_link(rule.id)
    answer = answers.get(link)
    if answer is None:
        return on_record, record_note, fact.evidence
    if isinstance(answer, date):
        answer = answer.isoformat()
    try:
        answered = age_range(answer, today) if isinstance(answer, str) else None
    except ValueError:
        answered = None
    if answered is None:
        return on_record, f"{record_note}; the date of birth answer is not a date", fact.evidence
    by_answer = _placed(answered, low, high)
    evidence = fact.evidence + answers.evidence(link)
    if on_record is not None and by_answer is not None and on_record != by_answer:
        return None, f"the answered date of birth ({answer}) contradicts the record ({record_note})", evidence
    if on_record is not None:
        return on_record, record_note, fact.evidence
    return by_answer, f"age {answered.describe()} (date of birth answered)", evidence


def _check_rate(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    """An infusion rate against the usual dose, for the rule's age range when it has one (Isuprel adult ≥ 18 in
    mcg/min, pediatric < 18 in mcg/kg/min; review C11).

    Which range applies is an age fact, so an unknown age never applies the adult rule to a possible child or the
    reverse: the rule is met only when the rate is within it whatever the age (then the age does not matter), and
    otherwise the date of birth is asked before anything else (a weight would be asked of an adult for nothing)."""
    ages = rule.params.get("ages")
    if not ages:
        return _rate(rule, order, facts, answers, today)
    band, age_note, age_evidence = _age_band(rule, facts, answers, today)
    if band is False:
        return DoseResult(
            rule, State.MET, f"applies to ages {ages[0]}–{ages[1]}; not to this patient ({age_note})", age_evidence
        )
    result = _rate(rule, order, facts, answers, today)
    if band is True:
        return result
    if result.state is State.MET:
        return replace(result, note=f"{result.note}, whatever the patient's age ({age_note})")
    if result.state is State.UNKNOWN and result.ask == "attest":
        return result  # no rate to read: the rate question settles the rule at any age
    return DoseResult(
        rule,
        State.UNKNOWN,
        f"the usual dose for ages {ages[0]}–{ages[1]} applies only to a patient of that age, and the age is not "
        f"settled ({age_note}): the date of birth is needed",
        age_evidence,
        ask="birthdate",
    )


def _rate(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    unit = units.ucum(str(rule.params["unit"]))
    limit = float(rule.params["max"])
    rates, problems = amounts.rate_figures(order)
    if not rates:
        note = "; ".join(problems) or "the order states no infusion rate"
        return DoseResult(rule, State.UNKNOWN, note, ask="attest")
    weight = _weight(rule, facts, answers, today)
    kg, evidence, weight_note = weight.kg, weight.evidence, weight.note
    best: float | None = None
    for value, rate_unit in rates:
        try:
            converted = units.convert(value, rate_unit, unit)
        except units.UnitError:
            if kg is None:
                return DoseResult(
                    rule,
                    State.UNKNOWN,
                    f"body weight is needed to compare the rate ({weight_note})",
                    evidence,
                    ask="weight",
                )
            per_kg = rate_unit.endswith("/kg/min") or rate_unit.endswith("/kg/h")
            try:
                converted = units.convert(
                    value * kg if per_kg else value / kg,
                    rate_unit.replace("/kg", "") if per_kg else rate_unit.replace("/", "/kg/", 1),
                    unit,
                )
            except units.UnitError:
                problems.append(f"rate in {rate_unit} cannot be compared with {unit}")
                continue
        best = converted if best is None else max(best, converted)
    if best is None:
        return DoseResult(rule, State.UNKNOWN, "; ".join(problems), ask="attest")
    note = f"{best:g} {unit}; usual dose up to {limit:g} {unit}"
    if best <= limit * (1 + 1e-9):
        return DoseResult(rule, State.MET, note, computed=best)
    return DoseResult(rule, State.NOT_MET, note + " (above the usual dose: reviewed)", computed=best)


def _validate_rate(params: Mapping[str, Any]) -> str | None:
    try:
        dim = units.dimension(str(params["unit"]))
    except units.UnitError as exc:
        return str(exc)
    if dim not in ("mass_rate", "dose_rate_per_kg"):
        return "usual_rate needs a rate unit (ug/min or ug/kg/min)"
    ages = params.get("ages")
    if ages is not None and (not isinstance(ages, list) or len(ages) != 2):
        return "ages is [from, below] in years"
    return None


# --- registry ---


DOSE_KINDS: Mapping[str, DoseKind] = {
    "per_kg": DoseKind(
        {"amount": (int, float), "unit": str, "per_days": int},
        _check_per_kg,
        lambda rule: (WEIGHT,),
        lambda r: f"The requested dose is within: {r.text}",
        _validate_per_kg,
    ),
    "count_per_window": DoseKind(
        {"amount": (int, float), "unit": str, "per_hours": (int, float)},
        _check_count,
        lambda rule: (),
        lambda r: f"The requested quantity is within: {r.text}",
        _validate_count,
    ),
    "units_per_dose": DoseKind(
        {"amount": (int, float), "unit": str},
        _check_units,
        lambda rule: (),
        lambda r: f"The request is for at most: {r.text}",
    ),
    "weight_band": DoseKind(
        {"ml_per_kg": (int, float), "ml_per_vial": (int, float), "table": list},
        _check_band,
        lambda rule: (WEIGHT,),
        lambda r: f"The kit matches the patient's weight: {r.text}",
        _validate_band,
    ),
    "usual_rate": DoseKind(
        {"max": (int, float), "unit": str},
        _check_rate,
        lambda rule: (WEIGHT, AGE),
        lambda r: f"The infusion rate is within the usual dose: {r.text}",
        _validate_rate,
    ),
}


def check(rule: DoseRule, order: Mapping[str, Any], facts: Facts, answers: Answers, today: date) -> DoseResult:
    """The rule's result; a yes/no answer to the rule (asked when the figure could not be computed) settles it, unless
    the order or the weight states an impossible amount (:func:`_impossible`)."""
    return (
        _impossible(rule, order, facts, answers, today)
        or _attested(rule, answers)
        or DOSE_KINDS[rule.kind].check(rule, order, facts, answers, today)
    )


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
    return kind.validate(params)
