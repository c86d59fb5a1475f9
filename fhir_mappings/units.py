"""UCUM unit conversion for the quantities policies compare: convert, or say why not. Never guess.

Each unit belongs to one dimension with a factor to that dimension's base unit. Non-UCUM spellings that labs and
EHRs send (``mcg``, ``BU``, ``lbs``) are accepted as aliases of their UCUM unit. A unit we do not know, or one of
another dimension, raises :class:`UnitError`; callers turn that into "unknown", never into a number.
"""

from __future__ import annotations

from collections.abc import Mapping


class UnitError(ValueError):
    """A quantity's unit is unknown or belongs to another dimension than the one wanted."""


# unit -> (dimension, factor to the dimension's base unit)
_UNITS: dict[str, tuple[str, float]] = {
    # mass
    "kg": ("mass", 1000.0),
    "g": ("mass", 1.0),
    "mg": ("mass", 1e-3),
    "ug": ("mass", 1e-6),
    "ng": ("mass", 1e-9),
    "[lb_av]": ("mass", 453.59237),
    "[oz_av]": ("mass", 28.349523125),
    # volume
    "L": ("volume", 1.0),
    "dL": ("volume", 0.1),
    "mL": ("volume", 1e-3),
    # mass per body mass (dosing)
    "ug/kg": ("dose_per_kg", 1.0),
    "mg/kg": ("dose_per_kg", 1000.0),
    # dose rates (infusions)
    "ug/min": ("mass_rate", 1.0),
    "ug/h": ("mass_rate", 1 / 60),
    "mg/h": ("mass_rate", 1000 / 60),
    "ug/kg/min": ("dose_rate_per_kg", 1.0),
    "ug/kg/h": ("dose_rate_per_kg", 1 / 60),
    # counted units of a product (tablets, vials, kits); UCUM writes them as annotations
    "{tbl}": ("tablet", 1.0),
    "{vial}": ("vial", 1.0),
    "{kit}": ("kit", 1.0),
    # Bethesda titres
    "[beth'U]/mL": ("bethesda", 1.0),
    "[beth'U]": ("bethesda", 1.0),
    # factor activity: 1 IU/dL of factor is 1 % of normal (codes.md, unit pitfalls)
    "%": ("factor_activity", 1.0),
    "[IU]/dL": ("factor_activity", 1.0),
    "[iU]/dL": ("factor_activity", 1.0),
    "[IU]/mL": ("factor_activity", 100.0),
    "[iU]/mL": ("factor_activity", 100.0),
    # cell counts per volume (base: per microlitre)
    "10*3/uL": ("count_per_volume", 1e3),
    "10*9/L": ("count_per_volume", 1e3),
    "/uL": ("count_per_volume", 1.0),
    "/mm3": ("count_per_volume", 1.0),
    "{cells}/uL": ("count_per_volume", 1.0),
    # reciprocal titres (1:678 is 678)
    "{titer}": ("titer", 1.0),
    # pressure (liver stiffness)
    "kPa": ("pressure", 1000.0),
    # body mass index
    "kg/m2": ("bmi", 1.0),
    # time
    "s": ("time", 1.0),
    "min": ("time", 60.0),
    "h": ("time", 3600.0),
    "d": ("time", 86400.0),
    "wk": ("time", 604800.0),
    "mo": ("time", 2629800.0),
    "a": ("time", 31557600.0),
    # length
    "cm": ("length", 1e-2),
    "m": ("length", 1.0),
    "[in_i]": ("length", 0.0254),
}

_ALIASES: dict[str, str] = {
    "mcg": "ug",
    "µg": "ug",
    "μg": "ug",
    "microgram": "ug",
    "micrograms": "ug",
    "mcg/kg": "ug/kg",
    "µg/kg": "ug/kg",
    "mcg/min": "ug/min",
    "mcg/kg/min": "ug/kg/min",
    "ml": "mL",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "BU": "[beth'U]/mL",
    "BU/mL": "[beth'U]/mL",
    "B.U.": "[beth'U]/mL",
    "IU/dL": "[IU]/dL",
    "IU/mL": "[IU]/mL",
    "x10^9/L": "10*9/L",
    "K/uL": "10*3/uL",
    "cells/uL": "{cells}/uL",
    "kg/m^2": "kg/m2",
    "tablet": "{tbl}",
    "tablets": "{tbl}",
    "TAB": "{tbl}",
    "{tablet}": "{tbl}",
    "vial": "{vial}",
    "vials": "{vial}",
    "kit": "{kit}",
    "kits": "{kit}",
    "hr": "h",
    "hour": "h",
    "hours": "h",
    "day": "d",
    "days": "d",
    "week": "wk",
    "weeks": "wk",
    "month": "mo",
    "months": "mo",
    "year": "a",
    "years": "a",
}


def ucum(unit: str) -> str:
    """The UCUM spelling of ``unit``; raises :class:`UnitError` when it is unknown."""
    unit = unit.strip()
    if unit in _UNITS:
        return unit
    if unit in _ALIASES:
        return _ALIASES[unit]
    raise UnitError(f"unit '{unit}' is not one we can convert")


def is_known(unit: str) -> bool:
    try:
        ucum(unit)
    except UnitError:
        return False
    return True


def dimension(unit: str) -> str:
    return _UNITS[ucum(unit)][0]


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert ``value`` from one unit to another of the same dimension.

    :raise UnitError: either unit is unknown, or the two measure different things.
    """
    src, dst = ucum(from_unit), ucum(to_unit)
    if src == dst:
        return value
    sdim, sfac = _UNITS[src]
    ddim, dfac = _UNITS[dst]
    if sdim != ddim:
        raise UnitError(f"cannot convert '{from_unit}' to '{to_unit}': they measure different things")
    return value * sfac / dfac


def quantity_unit(q: Mapping[str, object]) -> str | None:
    """The unit of a FHIR Quantity: the UCUM ``code`` when we know it, else ``unit``, else ``code``."""
    code = q.get("code")
    unit = q.get("unit")
    if isinstance(code, str) and code and is_known(code):
        return code
    if isinstance(unit, str) and unit:
        return unit
    if isinstance(code, str) and code:
        return code
    return None
