"""Load the reviewed mapping data (``inputs.yaml``, ``codes.csv``) into an immutable lookup, strictly.

Every problem is a :class:`MappingLoadError` naming the file and the row or key: unknown code systems, blank
displays, duplicate rows, rows feeding an undefined input, units we cannot convert, malformed recency windows,
inputs that no row feeds.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from cds.errors import MappingLoadError
from fhir_mappings import systems, units

HERE = Path(__file__).parent

# kind -> the value type its facts carry
KIND_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "drug": "boolean",  # the order's medication code
        "condition": "boolean",  # an active Condition or the order's reason
        "order_reason": "boolean",  # the order's reasonCode / reasonReference only
        "specialty": "boolean",  # the prescriber's PractitionerRole.specialty / Practitioner.qualification
        "medication_history": "boolean",  # a MedicationStatement / -Administration / earlier -Request for a drug input
        "lab": "quantity",  # the latest final Observation value, converted to the input's unit
        "lab_code": "code",  # the latest final qualitative Observation result (positive / negative ...)
        "age": "age",  # whole years from Patient.birthDate
        "procedure": "boolean",  # a completed or ongoing Procedure carries a mapped code
        "setting": "boolean",  # where the drug is given: the order's category, the Encounter class, the Location type
        "answer": "",  # no structured source: only a Questionnaire answer settles it (type declared)
    }
)
CODED_KINDS = frozenset({"drug", "condition", "order_reason", "specialty", "lab", "lab_code", "procedure", "setting"})
STRENGTHS = frozenset({"proof", "partial"})
_INPUT_KEYS = {
    "kind",
    "type",
    "display",
    "unit",
    "question",
    "options",
    "drug",
    "mode",
    "recency_days",
    "pick",
    "disorder",
}
# medication_history modes: any record of the drug (ever), a current one (current), or one showing it was given
# (administered: a completed / in-progress MedicationAdministration or an active / completed MedicationStatement;
# an earlier order only suggests it)
HISTORY_MODES = ("ever", "current", "administered")
# procedure modes: done at any time (ever), or under way now (current: in progress, or performed within the last
# CURRENT_PROCEDURE_DAYS days; an earlier one only suggests it)
PROCEDURE_MODES = ("ever", "current")
CURRENT_PROCEDURE_DAYS = 2
# which result a lab input reads: the latest (default), the lowest or the highest at any date (a diagnostic
# baseline, a historical peak), or the one before the latest (a re-test's predecessor)
LAB_PICKS = ("latest", "lowest", "highest", "previous")


@dataclass(frozen=True)
class InputDef:
    name: str
    kind: str
    type: str  # boolean | quantity | code | age
    display: str
    question: str
    unit: str | None = None  # quantity inputs: the unit facts are converted to
    options: tuple[tuple[str, str], ...] = ()  # code inputs: (code, display)
    drug: str | None = None  # medication_history: the drug input whose codes it looks for
    mode: str = "ever"  # medication_history: one of HISTORY_MODES
    recency_days: int | None = None  # default window for lab results
    pick: str = "latest"  # lab / lab_code: which result is read (LAB_PICKS; lowest / highest: quantities only)
    disorder: bool = False  # condition / order_reason: a diagnosis that is some policy's indication (not an event)


@dataclass(frozen=True)
class CodeRow:
    system: str
    code: str  # normalised; a trailing '*' marks a code family
    display: str
    input: str
    strength: str
    unit: str | None
    recency_days: int | None
    source: str


@dataclass(frozen=True)
class Mappings:
    inputs: Mapping[str, InputDef]
    rows: tuple[CodeRow, ...]
    _index: Mapping[tuple[str, str], tuple[CodeRow, ...]] = field(repr=False)
    _prefixes: Mapping[str, tuple[CodeRow, ...]] = field(repr=False)
    # the product-name words rows name (products identified by name, for want of a code)
    product_names: frozenset[str] = frozenset()

    def lookup(self, system: str | None, code: str | None) -> tuple[CodeRow, ...]:
        """Rows matching a Coding (system aliases, NDC spellings and ICD-10 families are normalised)."""
        canon = systems.canonical_system(system)
        if not canon or not isinstance(code, str) or not code:
            return ()
        found: list[CodeRow] = []
        for key in systems.normalize_code(canon, code):
            found.extend(self._index.get((canon, key), ()))
            if canon == systems.NDC and key.count("-") == 2:
                # a package NDC also matches rows kept at product level (labeler-product)
                found.extend(self._index.get((canon, key.rsplit("-", 1)[0]), ()))
            for row in self._prefixes.get(canon, ()):
                if key.startswith(row.code[:-1]):
                    found.append(row)
        return tuple(dict.fromkeys(found))

    def rows_for(self, input_name: str) -> tuple[CodeRow, ...]:
        return tuple(r for r in self.rows if r.input == input_name)


def _load_inputs(path: Path) -> dict[str, InputDef]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise MappingLoadError(str(path), "file", f"cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise MappingLoadError(str(path), "file", f"invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise MappingLoadError(str(path), "file", "must map input names to definitions")
    inputs: dict[str, InputDef] = {}
    for name, spec in raw.items():
        inputs[name] = _input(str(path), str(name), spec)
    for name, spec in inputs.items():
        if spec.kind == "medication_history":
            target = inputs.get(spec.drug or "")
            if target is None or target.kind != "drug":
                raise MappingLoadError(str(path), f"{name}.drug", f"{spec.drug!r} is not a drug input")
    return inputs


def _input(file: str, name: str, spec: Any) -> InputDef:
    if not isinstance(spec, dict):
        raise MappingLoadError(file, name, "must be a mapping")
    extra = set(spec) - _INPUT_KEYS
    if extra:
        raise MappingLoadError(file, name, f"unknown keys {sorted(extra)}")
    kind = str(spec.get("kind"))
    if kind not in KIND_TYPES:
        raise MappingLoadError(file, f"{name}.kind", f"unknown kind {kind!r}; known: {sorted(KIND_TYPES)}")
    type_ = KIND_TYPES[kind] or str(spec.get("type"))
    if kind == "answer" and type_ not in ("boolean", "quantity", "code"):
        raise MappingLoadError(file, f"{name}.type", "an answer input declares type boolean, quantity or code")
    if spec.get("type") not in (None, type_):
        raise MappingLoadError(file, f"{name}.type", f"a {kind} input has type {type_}")
    for key in ("display", "question"):
        if not str(spec.get(key) or "").strip():
            raise MappingLoadError(file, f"{name}.{key}", "is required")
    unit = spec.get("unit")
    if type_ == "quantity":
        if not unit:
            raise MappingLoadError(file, f"{name}.unit", "a quantity input names the unit its facts are kept in")
        try:
            unit = units.ucum(str(unit))
        except units.UnitError as exc:
            raise MappingLoadError(file, f"{name}.unit", str(exc)) from None
    elif unit is not None:
        raise MappingLoadError(file, f"{name}.unit", f"only quantity inputs have a unit ({name} is {type_})")
    options: list[tuple[str, str]] = []
    if type_ == "code":
        raw_options = spec.get("options")
        if not isinstance(raw_options, dict) or not raw_options:
            raise MappingLoadError(file, f"{name}.options", "a code input lists its answer codes: {code: display}")
        options = [(str(k), str(v)) for k, v in raw_options.items()]
    elif "options" in spec:
        raise MappingLoadError(file, f"{name}.options", "only code inputs have options")
    mode = str(spec.get("mode", "ever"))
    if kind == "medication_history":
        if mode not in HISTORY_MODES:
            raise MappingLoadError(file, f"{name}.mode", f"must be one of {', '.join(HISTORY_MODES)}")
        if not spec.get("drug"):
            raise MappingLoadError(file, f"{name}.drug", "a medication_history input names its drug input")
    elif kind == "procedure" and "mode" in spec:
        if mode not in PROCEDURE_MODES:
            raise MappingLoadError(file, f"{name}.mode", f"must be one of {', '.join(PROCEDURE_MODES)}")
    elif "drug" in spec or "mode" in spec:
        raise MappingLoadError(file, name, "'drug' and 'mode' belong to medication_history (and procedure) inputs")
    pick = str(spec.get("pick", "latest"))
    if "pick" in spec:
        if kind not in ("lab", "lab_code"):
            raise MappingLoadError(file, f"{name}.pick", "only lab inputs choose which result they read")
        if pick not in LAB_PICKS or (kind == "lab_code" and pick in ("lowest", "highest")):
            allowed = LAB_PICKS if kind == "lab" else ("latest", "previous")
            raise MappingLoadError(file, f"{name}.pick", f"must be one of {', '.join(allowed)}")
    recency = spec.get("recency_days")
    if recency is not None and (not isinstance(recency, int) or recency <= 0):
        raise MappingLoadError(file, f"{name}.recency_days", "must be a positive whole number")
    disorder = spec.get("disorder", False)
    if not isinstance(disorder, bool) or (disorder and kind not in ("condition", "order_reason")):
        raise MappingLoadError(file, f"{name}.disorder", "true or false, for condition and order_reason inputs")
    return InputDef(
        name=name,
        kind=kind,
        type=type_,
        display=str(spec["display"]).strip(),
        question=str(spec["question"]).strip(),
        unit=unit,
        options=tuple(options),
        drug=spec.get("drug"),
        mode=mode,
        recency_days=recency,
        pick=pick,
        disorder=disorder,
    )


_COLUMNS = ["system", "code", "display", "input", "strength", "unit", "recency_days", "source"]


def _load_rows(path: Path, inputs: Mapping[str, InputDef]) -> list[CodeRow]:
    rows: list[CodeRow] = []
    seen: set[tuple[str, str, str]] = set()
    try:
        text = path.read_text()
    except OSError as exc:
        raise MappingLoadError(str(path), "file", f"cannot read ({exc.strerror})") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames != _COLUMNS:
        raise MappingLoadError(str(path), "header", f"columns must be {','.join(_COLUMNS)}")
    for lineno, rec in enumerate(reader, start=2):
        where = f"line {lineno}"
        if None in rec or any(v is None for v in rec.values()):
            raise MappingLoadError(str(path), where, "wrong number of columns")
        system = rec["system"].strip()
        if system not in systems.CANONICAL:
            raise MappingLoadError(str(path), where, f"unknown code system {system!r}; write the canonical URI")
        code = rec["code"].strip()
        if not code:
            raise MappingLoadError(str(path), where, "code is blank")
        if not rec["display"].strip():
            raise MappingLoadError(str(path), where, f"display is blank for {code}")
        name = rec["input"].strip()
        spec = inputs.get(name)
        if spec is None:
            raise MappingLoadError(str(path), where, f"input {name!r} is not defined in inputs.yaml")
        if spec.kind not in CODED_KINDS:
            raise MappingLoadError(str(path), where, f"input {name} is a {spec.kind} input; codes do not feed it")
        strength = rec["strength"].strip()
        if strength not in STRENGTHS:
            raise MappingLoadError(str(path), where, f"strength must be one of {sorted(STRENGTHS)}")
        unit_raw = rec["unit"].strip()
        unit: str | None = None
        if spec.kind == "lab":
            if not unit_raw:
                raise MappingLoadError(str(path), where, f"{code} feeds a quantity; give the unit it reports in")
            try:
                unit = units.ucum(unit_raw)
                units.convert(1.0, unit, spec.unit or "")
            except units.UnitError as exc:
                raise MappingLoadError(str(path), where, str(exc)) from None
        elif unit_raw:
            raise MappingLoadError(str(path), where, f"only lab rows carry a unit ({name} is a {spec.kind} input)")
        recency_raw = rec["recency_days"].strip()
        recency: int | None = None
        if recency_raw:
            if spec.kind not in ("lab", "lab_code"):
                raise MappingLoadError(str(path), where, "recency_days applies to lab results only")
            if not recency_raw.isdigit() or int(recency_raw) <= 0:
                raise MappingLoadError(str(path), where, "recency_days must be a positive whole number")
            recency = int(recency_raw)
        norm: tuple[str, ...]
        if code.endswith("*"):
            if system not in systems.PREFIX_SYSTEMS or len(code) < 3:
                raise MappingLoadError(str(path), where, f"code families ('*') are for ICD-10 codes only: {code}")
            norm = (code.upper(),)
        else:
            norm = systems.normalize_code(system, code)
        if len(norm) != 1:
            raise MappingLoadError(str(path), where, f"code {code} is ambiguous; write NDCs as 5-4-2 or 5-4")
        key = (system, norm[0], name)
        if key in seen:
            raise MappingLoadError(str(path), where, f"duplicate row {system}|{code} -> {name}")
        seen.add(key)
        if not rec["source"].strip():
            raise MappingLoadError(str(path), where, f"source is blank for {code}: say where the code was read")
        rows.append(
            CodeRow(system, norm[0], rec["display"].strip(), name, strength, unit, recency, rec["source"].strip())
        )
    fed = {r.input for r in rows}
    for name, spec in inputs.items():
        if spec.kind in CODED_KINDS and name not in fed:
            raise MappingLoadError(str(path), name, f"input {name} ({spec.kind}) has no code rows")
    return rows


def load_mappings(directory: Path | None = None) -> Mappings:
    """Load and check ``inputs.yaml`` and ``codes.csv`` from ``directory`` (default: this package)."""
    base = directory or HERE
    inputs = _load_inputs(base / "inputs.yaml")
    rows = _load_rows(base / "codes.csv", inputs)
    index: dict[tuple[str, str], list[CodeRow]] = {}
    prefixes: dict[str, list[CodeRow]] = {}
    for row in rows:
        if row.code.endswith("*"):
            prefixes.setdefault(row.system, []).append(row)
        else:
            index.setdefault((row.system, row.code), []).append(row)
            if row.system == systems.NDC and row.code.count("-") == 2:
                # an order may name the product (labeler-product) without the package
                index.setdefault((row.system, row.code.rsplit("-", 1)[0]), []).append(row)
    return Mappings(
        MappingProxyType(inputs),
        tuple(rows),
        MappingProxyType({k: tuple(v) for k, v in index.items()}),
        MappingProxyType({k: tuple(v) for k, v in prefixes.items()}),
        frozenset(r.code for r in rows if r.system == systems.PRODUCT_NAME),
    )
