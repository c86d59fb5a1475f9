"""The amounts a MedicationRequest asks for, read from its dosage, its dispense request and its infusion rates.

Each figure is ``(amount, unit, how)``: the amount over a window of days, the unit it is in (UCUM), and a short text
saying how it was computed. Problems (a unit we cannot convert, a dosage without timing) are returned beside the
figures so that a caller can say why a figure is missing; nothing here guesses.

As-needed (PRN) dosages are not extrapolated over the window (review C6). IP0356: "maximum doses in this policy
allow for prophylactic dosing plus three days of acute episodes or perioperative management per 28 days"; IP0355:
"... three days of acute bleeding per 28 days". A PRN order's frequency is the shortest interval allowed between
doses, not the use: "90 mcg/kg every 2 hours as needed" is not 336 doses in 28 days. So a PRN dosage counts only what
the order itself bounds: its ``maxDosePerPeriod`` (per day, over the window, and within ``boundsDuration`` /
``count``), or its ``count`` of administrations. With neither, the dosage gives no figure (a problem says so), the
dispense quantity decides, and with no dispense either the rule is left undecided and asked. Scheduled dosing is
unchanged: with no ``boundsDuration``, ``count`` or supply duration it continues for the whole window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from fhir_mappings import units
from fhir_mappings.extract import as_needed

PERIOD_DAYS = {"s": 1 / 86400, "min": 1 / 1440, "h": 1 / 24, "d": 1.0, "wk": 7.0, "mo": 30.0, "a": 365.0}
Figure = tuple[float, str, str]


def days(q: Any) -> float | None:
    """A duration Quantity in days, or None."""
    if isinstance(q, Mapping) and isinstance(q.get("value"), int | float):
        unit = q.get("code") or q.get("unit")
        try:
            return float(q["value"]) * PERIOD_DAYS[units.ucum(str(unit))]
        except (units.UnitError, KeyError):
            return None
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _not_positive(value: Any) -> bool:
    """A number no real amount, rate, period or count can be: zero, negative, or not finite."""
    number = _number(value)
    return number is not None and (number <= 0 or not math.isfinite(number))


def _shown(q: Mapping[str, Any]) -> str:
    """A quantity as the order writes it: "0 ug/kg", "-90 mg"."""
    number = _number(q.get("value"))
    unit = q.get("unit") or q.get("code")
    value = f"{number:g}" if number is not None else str(q.get("value"))
    return f"{value} {unit}" if isinstance(unit, str) and unit else value


_TIMING = (
    ("frequency", None),
    ("frequencyMax", None),
    ("period", "periodUnit"),
    ("periodMax", "periodUnit"),
    ("count", None),
    ("countMax", None),
    ("duration", "durationUnit"),
)


def impossible(order: Mapping[str, Any]) -> list[str]:
    """What the order states that no order can mean, each said plainly with the amount: a dose, dose range, rate,
    dispense quantity, maximum dose, supply or dosage duration that is zero or less; a frequency, period or count of
    zero or less; a negative number of refills.

    Such a figure is never computed with (a dose of 0 is not "within the limit"): the rule that reads the order stays
    undecided and names the amount (:func:`policies.dose.check`)."""
    found: list[str] = []

    def amount(q: Any, what: str) -> None:
        if isinstance(q, Mapping) and _not_positive(q.get("value")):
            found.append(f"{what} is not a positive amount ({_shown(q)})")

    for di in order.get("dosageInstruction") or ():
        if not isinstance(di, Mapping):
            continue
        repeat = (di.get("timing") or {}).get("repeat") if isinstance(di.get("timing"), Mapping) else None
        if isinstance(repeat, Mapping):
            for name, unit in _TIMING:
                if _not_positive(repeat.get(name)):
                    shown = _shown({"value": repeat.get(name), "unit": repeat.get(unit) if unit else None})
                    found.append(f"the dosage timing is not possible ({name} {shown})")
            amount(repeat.get("boundsDuration"), "the dosage duration")
        ratio = di.get("maxDosePerPeriod")
        if isinstance(ratio, Mapping):
            amount(ratio.get("numerator"), "the maximum dose per period")
            amount(ratio.get("denominator"), "the period of the maximum dose")
        for dr in di.get("doseAndRate") or ():
            if not isinstance(dr, Mapping):
                continue
            amount(dr.get("doseQuantity"), "the ordered dose")
            dose_range = dr.get("doseRange")
            if isinstance(dose_range, Mapping):
                amount(dose_range.get("high"), "the ordered dose (upper end of the range)")
                low = dose_range.get("low")
                if isinstance(low, Mapping) and (_number(low.get("value")) or 0.0) < 0:
                    found.append(f"the ordered dose (lower end of the range) is negative ({_shown(low)})")
            amount(dr.get("rateQuantity"), "the ordered rate")
            rate_range = dr.get("rateRange")
            if isinstance(rate_range, Mapping):
                amount(rate_range.get("high"), "the ordered rate (upper end of the range)")
            rate_ratio = dr.get("rateRatio")
            if isinstance(rate_ratio, Mapping):
                amount(rate_ratio.get("numerator"), "the ordered rate")
                amount(rate_ratio.get("denominator"), "the time of the ordered rate")
    disp = order.get("dispenseRequest")
    if isinstance(disp, Mapping):
        amount(disp.get("quantity"), "the dispense quantity")
        amount(disp.get("expectedSupplyDuration"), "the expected supply duration")
        refills = _number(disp.get("numberOfRepeatsAllowed"))
        if refills is not None and (refills < 0 or not math.isfinite(refills)):
            found.append(f"the number of refills is not possible ({disp.get('numberOfRepeatsAllowed')})")
    return found


def _known_unit(q: Any) -> str | None:
    if not isinstance(q, Mapping) or not isinstance(q.get("value"), int | float) or isinstance(q.get("value"), bool):
        return None
    unit = units.quantity_unit(q)
    return units.ucum(unit) if unit and units.is_known(unit) else None


Convert = Callable[[float, str, str], float]  # (amount, from unit, to unit); raises units.UnitError
PRN_UNCOUNTED = (
    "the dosage is as needed with no maximum dose per period or count, so it is not counted over the whole window"
)


def _max_per_day(di: Mapping[str, Any], unit: str, convert: Convert = units.convert) -> float | None:
    """The dosage's maxDosePerPeriod as an amount per day in ``unit``, when it can be read (``convert`` may know
    more than UCUM, e.g. a tablet's strength: "12 tablets per 24 h" against a dose in mcg)."""
    ratio = di.get("maxDosePerPeriod")
    if not isinstance(ratio, Mapping):
        return None
    numerator, denominator = ratio.get("numerator"), ratio.get("denominator")
    num_unit, period = _known_unit(numerator), days(denominator)
    if num_unit is None or not period:
        return None
    try:
        return convert(float(numerator["value"]), num_unit, unit) / period  # type: ignore[index]
    except units.UnitError:
        return None


def dosage_figures(
    order: Mapping[str, Any], window: float, convert: Convert = units.convert
) -> tuple[list[Figure], list[str]]:
    """Dose × administrations per day × days in the window, capped by maxDosePerPeriod, boundsDuration and count.

    An as-needed dosage is never extrapolated from its frequency (see the module text): it counts its
    maxDosePerPeriod, or its count of administrations, or nothing."""
    figures: list[Figure] = []
    problems: list[str] = []
    for di in order.get("dosageInstruction") or ():
        repeat = ((di.get("timing") or {}).get("repeat")) or {}
        prn = as_needed(di)
        for dr in di.get("doseAndRate") or ():
            dq = dr.get("doseQuantity") or (dr.get("doseRange") or {}).get("high")
            if not isinstance(dq, Mapping) or not isinstance(dq.get("value"), int | float):
                continue
            unit = _known_unit(dq)
            if unit is None:
                problems.append(f"dose unit {units.quantity_unit(dq)!r} is not one we can convert")
                continue
            dose = float(dq["value"])
            count = repeat.get("countMax") or repeat.get("count")
            count = count if isinstance(count, int) and not isinstance(count, bool) else None
            freq = repeat.get("frequencyMax") or repeat.get("frequency") or 1
            period, punit = repeat.get("period"), repeat.get("periodUnit")
            per_day: float | None = None
            how = f"{dose:g} {unit}"
            if isinstance(period, int | float) and punit in PERIOD_DAYS and period > 0:
                per_day = dose * float(freq) / (float(period) * PERIOD_DAYS[str(punit)])
                how = f"{how} × {freq:g} every {period:g} {punit}"
            cap = _max_per_day(di, unit, convert)
            if prn:
                how = f"{how} as needed"
                if cap is not None:
                    # the frequency is the shortest interval allowed, so it bounds the use as well
                    if per_day is None or cap < per_day:
                        per_day, how = cap, f"{how}, at most {cap:g} {unit} a day"
                elif count is not None:
                    figures.append((dose * count, unit, f"{how}, at most {count} doses"))
                    continue
                else:
                    problems.append(PRN_UNCOUNTED)
                    continue
            elif per_day is not None and cap is not None and cap < per_day:
                per_day, how = cap, f"{how}, at most {cap:g} {unit} a day"
            if per_day is None:
                problems.append("the dosage has no timing period to compute an amount per day")
                continue
            total = per_day * window
            bounds = days(repeat.get("boundsDuration"))
            if bounds is not None:
                total = min(total, per_day * bounds)
            if count is not None:
                total = min(total, dose * count)
            figures.append((total, unit, how))
    return figures, problems


def dispense_figure(
    order: Mapping[str, Any], window: float, *, unitless: str | None = None, every_fill: bool = False
) -> tuple[Figure | None, list[str]]:
    """Quantity per fill × fills in the window (fills allowed, spread over expectedSupplyDuration; one fill when no
    supply duration is given). ``unitless`` names the unit of a quantity sent without one (e.g. billing units).
    ``every_fill``: the quantity of every fill the order allows, whatever the window (a limit per authorization)."""
    disp = order.get("dispenseRequest") or {}
    qty = disp.get("quantity")
    if not isinstance(qty, Mapping) or not isinstance(qty.get("value"), int | float):
        return None, []
    unit = _known_unit(qty) or (unitless if not (qty.get("unit") or qty.get("code")) else None)
    if unit is None:
        return None, [f"dispense quantity unit {units.quantity_unit(qty)!r} is not one we can convert"]
    fills_allowed = 1 + int(disp.get("numberOfRepeatsAllowed") or 0)
    supply = days(disp.get("expectedSupplyDuration"))
    if every_fill:
        fills = float(fills_allowed)
    elif supply:
        fills = window / supply if supply > window else min(float(fills_allowed), max(1.0, window / supply))
    else:
        fills = 1.0
    how = f"dispense {qty['value']:g} {unit}" + (f" × {fills:g} fills" if fills != 1 else "")
    return (float(qty["value"]) * fills, unit, how), []


def rate_figures(order: Mapping[str, Any]) -> tuple[list[tuple[float, str]], list[str]]:
    """Infusion rates (rateQuantity, rateRatio, rateRange high) as (value, unit), e.g. (5, "ug/min")."""
    out: list[tuple[float, str]] = []
    problems: list[str] = []
    for di in order.get("dosageInstruction") or ():
        for dr in di.get("doseAndRate") or ():
            rq = dr.get("rateQuantity") or (dr.get("rateRange") or {}).get("high")
            if isinstance(rq, Mapping):
                unit = _known_unit(rq)
                if unit is None:
                    problems.append(f"rate unit {units.quantity_unit(rq)!r} is not one we can convert")
                else:
                    out.append((float(rq["value"]), unit))
            ratio = dr.get("rateRatio")
            if isinstance(ratio, Mapping):
                num_unit, period = _known_unit(ratio.get("numerator")), days(ratio.get("denominator"))
                if num_unit is None or not period:
                    problems.append("the rate ratio cannot be read")
                    continue
                try:
                    per_min = units.convert(float(ratio["numerator"]["value"]), num_unit, "ug") / (period * 1440)
                    out.append((per_min, "ug/min"))
                except units.UnitError:
                    try:  # a per-kg numerator (mcg/kg per minute)
                        per_min = units.convert(float(ratio["numerator"]["value"]), num_unit, "ug/kg") / (period * 1440)
                        out.append((per_min, "ug/kg/min"))
                    except units.UnitError as exc:
                        problems.append(str(exc))
    return out, problems
