"""Generate each policy's CQL prepopulation library from the policy and the mapping data. Pure: no I/O.

DTR clients pre-populate a Questionnaire by running CQL over the EHR's data (DTR §spec-59), so every input a
question of the policy may ask gets a ``define`` that reads the record the way :mod:`fhir_mappings.extract` does,
and the Questionnaire item's ``initialExpression`` names it (``"<Library>"."<input>"``, :func:`expression`). The
CQL is generated, never written by hand: a mapping row added to codes.csv or a criterion added to a policy changes
it, and ``cds cql check`` reports a committed library that no longer matches (``cds cql build`` regenerates it and
translates it to ELM with the reference translator).

What each input's defines mean (``<input>`` is the input's name, e.g. ``dx.hemophilia_a``):

- yes/no inputs (condition, order_reason, specialty, medication_history, procedure, setting):
  ``"<input> record"`` is what the record settles, as the Python engine's fact value: true (a code that proves it),
  false (a refuted diagnosis, a recorded specialty that is another, no earlier therapy on record), else null.
  ``"<input> suggested"`` is true when only weaker evidence is on record (the fact's ``partial``): a ``partial``
  code of codes.csv (D68.2 for factor VII deficiency), an earlier order when the input wants an administration, a
  therapy taken only as needed when it wants current prophylaxis, a procedure done earlier when it wants one under
  way. ``"<input>"``, the initial answer, is the record, else the suggestion: a suggestive code pre-fills "yes" for
  the prescriber to confirm, as the service's own draft response does. A partial code never makes the record true.
- lab inputs: ``"<input> result"`` is the Observation the engine reads (``pick``: latest, lowest, highest, previous),
  ``"<input> date"`` its date, ``"<input>"`` its value as a Quantity in the input's unit, and ``"<input> below
  range"`` (inputs tested with ``below_range``) whether it is under the laboratory's reference range. A result older
  than the policy's window for the input (the strictest ``within_days`` of its criteria, else the input's
  ``recency_days``) pre-fills nothing, and neither does one reported with a comparator (``<5``: not a number).
- lab_code inputs: ``"<input>"`` is the result as a Code (``positive`` / ``negative``, :data:`RESULT_SYSTEM`).
- age: ``"age_years"`` is the date of birth (the question asks for it), partial when the record's is.

The order the form is for comes in as the parameter ``"medication_request"`` (as DTR clients pass the request in
context); without it, what only the order carries (its reason, requester, category, earlier prescription) is null.
Known differences from the Python extraction, all in data the test synthesizer does not produce: codes match
ValueSets exactly (Python also accepts system aliases, NDC spellings and lower-case ICD-10 codes), drug names
(``urn:cds:product-name`` rows) are not matched, the prescriber comes from the order's requester only (not the hook's
user), and dates are read in the timezone they are written in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from cds import constants
from cds.dtr.valuesets import ValueSetSpec, spec
from fhir_mappings import units
from fhir_mappings.extract import (
    ACTIVE_CLINICAL,
    EXCLUDED_VERIFICATION,
    FINAL_OBSERVATION,
    HISTORY_CURRENT,
    HISTORY_EXCLUDED,
    LOW_FLAGS,
    NOT_LOW_FLAGS,
    PROCEDURE_DONE,
    RESULT_CODES,
    RESULT_TEXT,
    VIRAL_LOAD_UNITS,
)
from fhir_mappings.loader import CURRENT_PROCEDURE_DAYS, InputDef, Mappings
from policies.dose import DOSE_KINDS
from policies.model import Indication, Node, Policy, Product

FHIRHELPERS_NAME = "FHIRHelpers"
FHIRHELPERS_VERSION = "4.0.1"
ORDER_PARAMETER = "medication_request"
ORDER_DEFINE = "Order"  # the order the form documents (its itemPopulationContext)
LIBRARY_SUFFIX = "Prepopulation"
# the system of the codes a lab_code define returns (the input's options: positive, negative)
RESULT_SYSTEM = constants.RESULT_SYSTEM  # under CANONICAL_BASE, like the value sets
BOOLEAN_KINDS = frozenset({"condition", "order_reason", "specialty", "medication_history", "procedure", "setting"})
DEFINED_KINDS = BOOLEAN_KINDS | {"lab", "lab_code", "age"}
# extract.py's qualitative-result tables, written out in CQL (kept in step by the agreement test)
_VIRAL_LOAD_UNITS = tuple(sorted(VIRAL_LOAD_UNITS))
_LOW_FLAGS = tuple(sorted(LOW_FLAGS))
_NOT_LOW_FLAGS = tuple(sorted(NOT_LOW_FLAGS))
_STATEMENT_GIVEN = ("active", "completed")
_ADMINISTRATION_GIVEN = ("completed", "in-progress")


@dataclass(frozen=True)
class InputUse:
    """How the policy's questions use an input: the operators that test it and the recency window of its results."""

    name: str
    ops: frozenset[str]
    window: int | None = None  # days: an older result is missing for some criterion, so it pre-fills nothing


def _s(text: str) -> str:
    """A CQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _q(name: str) -> str:
    """A CQL quoted identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _strings(values: Iterable[str]) -> str:
    return "{ " + ", ".join(_s(v) for v in values) + " }"


def _comment(text: str) -> str:
    return "// " + " ".join(text.split())


def library_name(policy: Policy) -> str:
    """A CQL identifier unique per policy: the id in CamelCase, the document number as the document writes it."""
    number = "".join(ch for ch in policy.number if ch.isalnum())
    parts = []
    for part in policy.id.split("-"):
        alnum = "".join(ch for ch in part if ch.isalnum())
        parts.append(number if alnum.lower() == number.lower() else alnum[:1].upper() + alnum[1:])
    name = "".join(parts)
    if not name[:1].isalpha():
        name = "Policy" + name
    return name + LIBRARY_SUFFIX


def uses(policy: Policy, mappings: Mappings) -> dict[str, InputUse]:
    """The inputs the policy's questions may ask about, with a structured source: every input an indication's
    diagnosis, criteria or reauthorization criteria test, and those its dose rules ask for (a body weight, a date of
    birth). ``answer`` inputs have no source, drug inputs are the order itself: neither has a define."""
    ops: dict[str, set[str]] = {}
    windows: dict[str, list[int | None]] = {}

    def leaf(node: Node) -> None:
        if not node.input or node.op == "attested":
            return
        spec_input = mappings.inputs[node.input]
        if spec_input.kind not in DEFINED_KINDS:
            return
        ops.setdefault(node.input, set()).add(node.op)
        windows.setdefault(node.input, []).append(node.within_days or _default_window(mappings, spec_input))

    for product in policy.products:
        roots = [n for ind in product.indications for n in (ind.diagnosis, *ind.criteria)]
        if product.reauthorization is not None:
            roots.extend(product.reauthorization.criteria)
        for root in roots:
            for node in root.walk():
                leaf(node)
        for rule in product.dose_rules():
            for name in DOSE_KINDS[rule.kind].inputs(rule):
                spec_input = mappings.inputs[name]
                if spec_input.kind in DEFINED_KINDS:
                    ops.setdefault(name, set()).add("dose")
                    windows.setdefault(name, []).append(_default_window(mappings, spec_input))
    out = {}
    for name in sorted(ops):
        limits = [w for w in windows[name] if w is not None]
        out[name] = InputUse(name, frozenset(ops[name]), min(limits) if limits else None)
    return out


def _default_window(mappings: Mappings, spec_input: InputDef) -> int | None:
    if spec_input.kind not in ("lab", "lab_code"):
        return None
    if any(r.recency_days for r in mappings.rows_for(spec_input.name)):
        # extract.py takes the window of the row the result matched; one define per input cannot
        raise ValueError(f"{spec_input.name}: per-code recency windows (codes.csv recency_days) are not supported")
    return spec_input.recency_days


def defines(policy: Policy, mappings: Mappings) -> dict[str, str]:
    """Input name -> the define that pre-populates its questions, for every input the library defines."""
    return {name: _item_define(mappings.inputs[name], use) for name, use in uses(policy, mappings).items()}


def _item_define(spec_input: InputDef, use: InputUse, op: str | None = None) -> str:
    if spec_input.kind == "lab":
        asked = {op} if op else use.ops
        if asked and asked <= {"below_range"}:
            return f"{spec_input.name} below range"  # the question asks whether it is low, not its value
    return spec_input.name


def expression(policy: Policy, mappings: Mappings, input_name: str, op: str | None = None) -> str | None:
    """The ``text/cql`` initialExpression of a question about ``input_name`` (``op``: the criterion's operator, for
    a lab input asked both as a value and as below its range), or None when the library has no define for it."""
    use = uses(policy, mappings).get(input_name)
    if use is None:
        return None
    return f"{_q(library_name(policy))}.{_q(_item_define(mappings.inputs[input_name], use, op))}"


def evidence_inputs(indication: Indication, defined: Container[str]) -> tuple[str, ...]:
    """The inputs whose presence on record (or suggestion) points to ``indication``: the yes/no inputs its diagnosis
    tests with ``present`` that the library defines (``defined``: input names)."""
    return tuple(
        sorted({n.input for n in indication.diagnosis.walk() if n.op == "present" and n.input and n.input in defined})
    )


def suggested_define(product: Product) -> str:
    """The define listing the indications of ``product`` the record points to (its indication question's
    candidateExpression)."""
    return f"{product.id} suggested indications"


def qualified(policy: Policy, define: str) -> str:
    """The ``text/cql`` expression ``"<Library>"."<define>"`` (a form's variable, context or candidates)."""
    return f"{_q(library_name(policy))}.{_q(define)}"


def observations_define(input_name: str) -> str:
    """The define listing a lab input's results on record, newest first (its question's contextExpression)."""
    return f"{input_name} observations"


def value_set_specs(policy: Policy, mappings: Mappings) -> tuple[ValueSetSpec, ...]:
    """The ValueSets the library declares, in declaration order."""
    return _build(policy, mappings).value_sets


def generate(policy: Policy, mappings: Mappings) -> str:
    """The library's CQL text (deterministic: the same policy and mappings give the same text)."""
    return _build(policy, mappings).text


def version(policy: Policy, mappings: Mappings) -> str:
    """The library version: the policy's version, and a digest of the CQL (a mapping change changes the logic)."""
    return _build(policy, mappings).version


def outputs(policy: Policy, mappings: Mappings) -> tuple[tuple[str, str], ...]:
    """(define, FHIR type) of every define a form may read (for Library.parameter)."""
    return _build(policy, mappings).outputs


def data_requirements(policy: Policy, mappings: Mappings) -> tuple[tuple[str, str | None, str | None], ...]:
    """(resource type, code path, ValueSet canonical) the library reads, for Library.dataRequirement."""
    return _build(policy, mappings).requirements


# --- the writer ------------------------------------------------------------------------------------------------------


@dataclass
class _Library:
    value_sets: tuple[ValueSetSpec, ...]
    text: str
    version: str
    outputs: tuple[tuple[str, str], ...]
    requirements: tuple[tuple[str, str | None, str | None], ...]


@dataclass
class _Writer:
    mappings: Mappings
    value_sets: dict[str, ValueSetSpec] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # name -> CQL block, emitted once, in first-use order
    blocks: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    requirements: set[tuple[str, str | None, str | None]] = field(default_factory=set)
    matchers: dict[str, bool] = field(default_factory=dict)  # function name -> whether it tests any code

    def need(self, name: str) -> None:
        """Emit a shared block (and what it needs) before the first block that uses it."""
        if name in self.shared:
            return
        for dep in _SHARED_NEEDS.get(name, ()):
            self.need(dep)
        self.shared[name] = _SHARED[name]
        for req in _SHARED_READS.get(name, ()):
            self.requirements.add((req, None, None))

    def define(self, name: str, body: str, comment: str = "", out: str | None = None) -> None:
        lines = [_comment(comment)] if comment else []
        lines.append(f"define {_q(name)}:\n  {body}")
        self.blocks.append("\n".join(lines))
        if out:
            self.outputs.append((name, out))

    def function(self, name: str, params: str, body: str, comment: str = "") -> None:
        lines = [_comment(comment)] if comment else []
        lines.append(f"define function {_q(name)}({params}):\n  {body}")
        self.blocks.append("\n".join(lines))

    def matcher(self, input_name: str, strength: str | None, function: str, reads: str | None, path: str) -> bool:
        """Define ``function``(codings): some coding is one of the input's codes of ``strength`` (its ValueSet or
        one of its code families). False when the input has no such codes (nothing is defined). ``reads``/``path``:
        the data requirement it adds (the ValueSet as a code filter; a family needs the type unfiltered)."""
        if function in self.matchers:
            return self.matchers[function]
        vs = spec(self.mappings, input_name, strength)
        tests = []
        if vs.codes:
            self.value_sets[vs.key] = vs
            tests.append(f"C in {_q(vs.key)}")
            if reads:
                self.requirements.add((reads, path, vs.canonical))
        if vs.families:
            if reads:
                self.requirements.add((reads, None, None))
            self.need("In family")
            tests.extend(f'"In family"(C, {_s(system)}, {_s(prefix)})' for system, prefix in vs.families)
        self.matchers[function] = bool(tests)
        if not tests:
            return False
        joined = "\n        or ".join(tests)
        self.function(function, "codings List<FHIR.Coding>", f"exists (codings C\n      where {joined})")
        return True


_BUILT: dict[tuple[int, str, str], tuple[Mappings, _Library]] = {}


def _build(policy: Policy, mappings: Mappings) -> _Library:
    """The library, written once per policy version and mappings object (a service asks for it on every form)."""
    key = (id(mappings), policy.id, policy.content_hash)
    hit = _BUILT.get(key)
    if hit is None or hit[0] is not mappings:  # the mappings are kept, so their id is not reused
        hit = (mappings, _write(policy, mappings))
        _BUILT[key] = hit
    return hit[1]


def _write(policy: Policy, mappings: Mappings) -> _Library:
    w = _Writer(mappings)
    w.requirements.add(("Patient", None, None))
    for name, use in uses(policy, mappings).items():
        spec_input = mappings.inputs[name]
        w.blocks.append(_comment(f"--- {name} ({spec_input.kind}): {spec_input.display}"))
        _KIND_WRITERS[spec_input.kind](w, spec_input, use)
    _form_context(w, policy, mappings)
    name = library_name(policy)
    value_sets = tuple(w.value_sets[k] for k in sorted(w.value_sets))
    body = _body(policy, w, value_sets)
    digest = hashlib.sha256(body.encode()).hexdigest()[:8]
    lib_version = f"{policy.version}-{digest}"
    header = "\n".join(
        [
            "/*",
            f" * {name}: prepopulation logic for {policy.publisher} {policy.number} ({policy.id} version "
            f"{policy.version}).",
            " * Generated by cds/dtr/cql.py from the policy and fhir_mappings (inputs.yaml, codes.csv): do not edit,",
            " * run `cds cql build`. Each define named after a policy input is the initial answer of its questions.",
            " */",
            f"library {name} version {_s(lib_version)}",
            "",
            "",
        ]
    )
    return _Library(
        value_sets,
        header + body,
        lib_version,
        tuple(w.outputs),
        tuple(sorted(w.requirements, key=lambda r: (r[0], r[1] or "", r[2] or ""))),
    )


def _body(policy: Policy, w: _Writer, value_sets: tuple[ValueSetSpec, ...]) -> str:
    parts = [
        "using FHIR version '4.0.1'",
        "",
        f"include {FHIRHELPERS_NAME} version {_s(FHIRHELPERS_VERSION)} called {FHIRHELPERS_NAME}",
        "",
    ]
    parts.extend(f"valueset {_q(vs.key)}: {_s(vs.url)} version {_s(vs.version)}" for vs in value_sets)
    if value_sets:
        parts.append("")
    parts.extend(
        [
            _comment("The order the form is for: DTR clients pass the request in context under this name."),
            f"parameter {_q(ORDER_PARAMETER)} FHIR.MedicationRequest",
            "",
            "context Patient",
        ]
    )
    sections = list(w.shared.values()) + w.blocks
    return "\n".join(parts) + "\n\n" + "\n\n".join(sections) + "\n"


# --- shared blocks ---------------------------------------------------------------------------------------------------

_ORDER = _q(ORDER_PARAMETER)
_SHARED: dict[str, str] = {
    "Codings": (
        _comment("The codings of a list of CodeableConcepts.")
        + '\ndefine function "Codings"(concepts List<FHIR.CodeableConcept>):\n'
        "  flatten (concepts C where C.coding is not null return all C.coding)"
    ),
    "In family": (
        _comment("A code of an ICD-10 family (codes.csv writes K72.1* for K72.1 and every code under it).")
        + '\ndefine function "In family"(coding FHIR.Coding, system String, prefix String):\n'
        "  coding.system.value = system and StartsWith(coding.code.value, prefix)"
    ),
    "Day": (
        _comment("The date of a dateTime written to the day at least (extract.parse_date), else null.")
        + '\ndefine function "Day"(value DateTime):\n'
        "  if day from value is null then null else date from value"
    ),
    "Order reason codings": (
        _comment("The order's own reason: reasonCode, and the Conditions reasonReference names (contained or not).")
        + '\ndefine "Order reason references":\n'
        f"  {_ORDER}.reasonReference R return R.reference.value\n\n"
        'define "Order reason codings":\n'
        f'  "Codings"({_ORDER}.reasonCode)\n'
        f'    union "Codings"({_ORDER}.contained X\n'
        "      where X is FHIR.Condition and ('#' + X.id.value) in \"Order reason references\"\n"
        "      return all (X as FHIR.Condition).code)\n"
        '    union "Codings"([Condition] C\n'
        "      where ('Condition/' + C.id.value) in \"Order reason references\"\n"
        "      return all C.code)"
    ),
    "Diagnosis codings": (
        _comment(
            "Diagnoses on record: active (or recurrent, relapsed) Conditions not refuted or entered in error, "
            "and the order's reason."
        )
        + '\ndefine function "Usable condition"(C FHIR.Condition):\n'
        "  not exists (C.verificationStatus.coding V\n"
        f"      where V.code.value in {_strings(sorted(EXCLUDED_VERIFICATION))})\n"
        "    and (not exists C.clinicalStatus.coding\n"
        "      or exists (C.clinicalStatus.coding S\n"
        f"        where S.code.value in {_strings(sorted(ACTIVE_CLINICAL))}))\n\n"
        'define "Diagnosis codings":\n'
        '  "Codings"([Condition] C where "Usable condition"(C) return all C.code)\n'
        '    union "Order reason codings"\n\n'
        + _comment("Diagnoses recorded as refuted.")
        + '\ndefine "Refuted codings":\n'
        '  "Codings"([Condition] C\n'
        "    where exists (C.verificationStatus.coding V where V.code.value = 'refuted')\n"
        "    return all C.code)"
    ),
    "Prescriber": (
        _comment(
            "The prescriber: the order's requester, a PractitionerRole, or a Practitioner and the roles naming them."
        )
        + '\ndefine "Requester parts":\n'
        f"  Split({_ORDER}.requester.reference.value, '/')\n\n"
        'define "Requester id":\n'
        '  Last("Requester parts")\n\n'
        'define "Requester type":\n'
        '  if Count("Requester parts") > 1 then "Requester parts"[Count("Requester parts") - 2] else \'\'\n\n'
        'define "Prescriber roles":\n'
        "  [PractitionerRole] R\n"
        '    where ("Requester type" = \'PractitionerRole\' and R.id.value = "Requester id")\n'
        "      or (\"Requester type\" = 'Practitioner'\n"
        "        and EndsWith(R.practitioner.reference.value, 'Practitioner/' + \"Requester id\"))\n\n"
        'define "Prescriber practitioner ids":\n'
        '  if "Requester type" = \'Practitioner\' then { "Requester id" }\n'
        "  else \"Prescriber roles\" R return Last(Split(R.practitioner.reference.value, '/'))\n\n"
        'define "Prescriber practitioners":\n'
        '  [Practitioner] P where P.id.value in "Prescriber practitioner ids"\n\n'
        'define "Prescriber codings":\n'
        '  "Codings"(flatten ("Prescriber roles" R where R.specialty is not null return all R.specialty))\n'
        '    union "Codings"(flatten ("Prescriber practitioners" P\n'
        "      where P.qualification is not null\n"
        "      return all (P.qualification Q return all Q.code)))\n\n"
        'define "Prescriber specialty recorded":\n'
        '  exists ("Prescriber roles" R where exists R.specialty)\n'
        '    or exists ("Prescriber practitioners" P where exists P.qualification)'
    ),
    "Medication codings": (
        _comment("The codings of the drug a Medication* resource names: its code, or the Medication it references.")
        + '\ndefine function "Medication codings"(concept FHIR.CodeableConcept, reference FHIR.Reference, '
        "contained List<FHIR.Resource>):\n"
        "  Coalesce(concept.coding, List<FHIR.Coding>{})\n"
        '    union "Codings"(contained X\n'
        "      where X is FHIR.Medication and ('#' + X.id.value) = reference.reference.value\n"
        "      return all (X as FHIR.Medication).code)\n"
        '    union "Codings"([Medication] M\n'
        "      where not StartsWith(reference.reference.value, '#')\n"
        "        and M.id.value = Last(Split(reference.reference.value, '/'))\n"
        "      return all M.code)\n\n"
        'define "Order medication codings":\n'
        f'  "Medication codings"({_ORDER}.medication as FHIR.CodeableConcept, '
        f"{_ORDER}.medication as FHIR.Reference, {_ORDER}.contained)"
    ),
    "As needed": (
        _comment("Every dosage is taken as needed (none is scheduled).")
        + '\ndefine function "As needed"(dosage FHIR.Dosage):\n'
        "  Coalesce((dosage.asNeeded as FHIR.boolean).value, false) or dosage.asNeeded is FHIR.CodeableConcept\n\n"
        'define function "As needed only"(dosages List<FHIR.Dosage>):\n'
        '  exists dosages and not exists (dosages D where not "As needed"(D))'
    ),
    "Procedures": (
        _comment("Procedures done or under way.") + '\ndefine "Done procedures":\n'
        f"  [Procedure] P where P.status.value in {_strings(sorted(PROCEDURE_DONE))}\n\n"
        + _comment(f"In progress, or performed (its end, else its date) within the last {CURRENT_PROCEDURE_DAYS} days.")
        + '\ndefine function "Under way"(P FHIR.Procedure):\n'
        "  P.status.value in { 'in-progress', 'preparation' }\n"
        '    or (P.performed is FHIR.Period and (P.performed as FHIR.Period)."end" is null)\n'
        '    or Coalesce(days between "Day"(FHIRHelpers.ToDateTime(Coalesce((P.performed as FHIR.Period)."end", '
        "P.performed as FHIR.dateTime))) and Today() <= "
        f"{CURRENT_PROCEDURE_DAYS}, false)"
    ),
    "Setting codings": (
        _comment("Where the drug is given: the order's category, its encounter's class and type, their locations.")
        + '\ndefine "Order encounter":\n'
        f"  First([Encounter] E where E.id.value = Last(Split({_ORDER}.encounter.reference.value, '/')))\n\n"
        'define "Order encounter locations":\n'
        "  [Location] L\n"
        '    where L.id.value in ("Order encounter".location X\n'
        "      return Last(Split(X.location.reference.value, '/')))\n\n"
        'define "Setting codings":\n'
        f'  "Codings"({_ORDER}.category)\n'
        '    union { "Order encounter".class }\n'
        '    union "Codings"("Order encounter".type)\n'
        '    union "Codings"(flatten ("Order encounter locations" L where L.type is not null return all L.type))'
    ),
    "Observations": (
        _comment(
            "The date a result was taken (effective[x], else issued), when written to the day; final results with one."
        )
        + '\ndefine function "Observed"(O FHIR.Observation):\n'
        '  "Day"(Coalesce(FHIRHelpers.ToDateTime(O.effective as FHIR.dateTime), (O.effective as FHIR.instant).value,\n'
        '    FHIRHelpers.ToDateTime((O.effective as FHIR.Period)."end"), '
        'FHIRHelpers.ToDateTime((O.effective as FHIR.Period)."start"),\n'
        "    O.issued.value))\n\n"
        'define "Final observations":\n'
        f"  [Observation] O where O.status.value in {_strings(sorted(FINAL_OBSERVATION))}\n"
        '    and "Observed"(O) is not null'
    ),
    "Unit": "",  # filled below: the known unit list is long
    "Below limit": (
        _comment(
            "A result (value and comparator) against a reference range's low limit: under it (true), "
            "at or above it (false), or not settled."
        )
        + '\ndefine function "Below limit"(value Decimal, comparator String, limit Decimal):\n'
        "  if not (comparator in { '>', '>=' }) and (value < limit or (comparator = '<' and value <= limit))\n"
        "    then true\n"
        "  else if not (comparator in { '<', '<=' }) and value >= limit then false\n"
        "  else null"
    ),
    "Qualitative": (
        _comment("A qualitative result: its coded value, its text, its interpretation, or a quantified viral load.")
        + '\ndefine function "Result code"(code String):\n'
        "  case code\n"
        + "".join(f"    when {_s(k)} then {_s(v)}\n" for k, v in RESULT_CODES.items())
        + "    else null\n  end\n\n"
        'define function "Result text"(text String):\n'
        "  case Lower(ReplaceMatches(text, '^\\\\s+|\\\\s+$', ''))\n"
        + "".join(f"    when {_s(k)} then {_s(v)}\n" for k, v in RESULT_TEXT.items())
        + "    else null\n  end\n\n"
        'define function "Qualitative"(O FHIR.Observation):\n'
        "  Coalesce(\n"
        '    First(((O.value as FHIR.CodeableConcept).coding) C where "Result code"(C.code.value) is not null\n'
        '      return all "Result code"(C.code.value)),\n'
        '    "Result text"((O.value as FHIR.string).value),\n'
        '    First(("Codings"(O.interpretation)) C where "Result code"(C.code.value) is not null\n'
        '      return all "Result code"(C.code.value)),\n'
        "    if (O.value as FHIR.Quantity).comparator is null\n"
        f'      and "Unit"(O.value as FHIR.Quantity) in {_strings(_VIRAL_LOAD_UNITS)}\n'
        "      and (O.value as FHIR.Quantity).value.value > 0 then 'positive'\n"
        "    else null\n"
        "  )"
    ),
}


def _known_units() -> list[str]:
    """Every unit spelling units.py converts (a Quantity's code is read when it is one of them)."""
    return sorted({*units._UNITS, *units._ALIASES})  # units.py keeps its tables private; we only list the names


def _unit_block() -> str:
    known = _known_units()
    rows = [", ".join(_s(u) for u in known[i : i + 8]) for i in range(0, len(known), 8)]
    listing = ",\n      ".join(rows)
    return (
        _comment(
            "The unit of a Quantity as units.quantity_unit reads it: its code when that is a known unit, "
            "else its unit, else its code."
        )
        + '\ndefine function "Unit"(quantity FHIR.Quantity):\n'
        f"  if quantity.code.value in {{\n      {listing}\n    }} then quantity.code.value\n"
        "  else if Length(quantity.unit.value) > 0 then quantity.unit.value\n"
        "  else quantity.code.value"
    )


_SHARED["Unit"] = _unit_block()
_SHARED_NEEDS: Mapping[str, tuple[str, ...]] = {
    "Order reason codings": ("Codings",),
    "Diagnosis codings": ("Order reason codings",),
    "Prescriber": ("Codings",),
    "Medication codings": ("Codings",),
    "Procedures": ("Day",),
    "Setting codings": ("Codings",),
    "Observations": ("Day",),
    "Qualitative": ("Codings", "Unit"),
}
_SHARED_READS: Mapping[str, tuple[str, ...]] = {
    "Prescriber": ("PractitionerRole", "Practitioner"),
    "Medication codings": ("Medication",),
    "Setting codings": ("Encounter", "Location"),
}


# --- one writer per kind ---------------------------------------------------------------------------------------------


def _yes_no(w: _Writer, name: str, record: str, suggested: str | None, comment: str) -> None:
    """The three defines of a yes/no input: what the record settles, what it suggests, the initial answer."""
    w.define(f"{name} record", record, comment, out="boolean")
    if suggested is None:
        w.define(name, _q(f"{name} record"), "The initial answer: what the record settles.", out="boolean")
        return
    w.define(
        f"{name} suggested", suggested, "Only weaker evidence is on record (a partial code or the like).", "boolean"
    )
    w.define(
        name,
        f"Coalesce({_q(name + ' record')}, {_q(name + ' suggested')})",
        "The initial answer: what the record settles, else what it suggests (for the prescriber to confirm).",
        out="boolean",
    )


def _coded_yes_no(
    w: _Writer, spec_input: InputDef, codings: str, reads: str | None, path: str, refuted: str | None
) -> None:
    name = spec_input.name
    proves = w.matcher(name, "proof", f"{name} proves", reads, path)
    suggests = w.matcher(name, "partial", f"{name} suggests", reads, path)
    p = f"{_q(name + ' proves')}({codings})" if proves else None
    s = f"{_q(name + ' suggests')}({codings})" if suggests else None
    branches: list[tuple[str, str]] = []
    if p:
        branches.append((p, "true"))
    if s:
        branches.append((s, "null"))
    if refuted:
        tests = [f"{_q(name + ' proves')}({refuted})"] if proves else []
        if suggests:
            tests.append(f"{_q(name + ' suggests')}({refuted})")
        if tests:
            branches.append((" or ".join(tests), "false"))
    suggested = None
    if s:
        suggested = f"if not {p} and {s} then true else null" if p else f"if {s} then true else null"
    _yes_no(w, name, _chain(branches), suggested, "What the record settles: true when a code proves it.")


def _chain(branches: list[tuple[str, str]]) -> str:
    """``if c1 then v1 else if c2 then v2 ... else null`` (a typed null when there is no branch)."""
    if not branches:
        return "null as Boolean"
    return "\n  else ".join(f"if {test} then {value}" for test, value in branches) + "\n  else null"


def _condition(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    w.need("Diagnosis codings")
    _coded_yes_no(w, spec_input, '"Diagnosis codings"', "Condition", "code", '"Refuted codings"')


def _order_reason(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    w.need("Order reason codings")
    _coded_yes_no(w, spec_input, '"Order reason codings"', "Condition", "code", None)


def _setting(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    w.need("Setting codings")
    _coded_yes_no(w, spec_input, '"Setting codings"', None, "", None)


def _specialty(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    name = spec_input.name
    w.need("Prescriber")
    # the roles are read whatever their codes: a recorded specialty that is another one settles "no"
    matches = w.matcher(name, None, f"{name} matches", None, "")
    test = f'{_q(name + " matches")}("Prescriber codings")' if matches else "false"
    record = f'if {test} then true\n  else if "Prescriber specialty recorded" then false\n  else null'
    _yes_no(w, name, record, None, "The prescriber's recorded specialty or qualification is one of the codes.")


def _procedure(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    name = spec_input.name
    w.need("Procedures")
    proves = w.matcher(name, "proof", f"{name} proves", "Procedure", "code")
    suggests = w.matcher(name, "partial", f"{name} suggests", "Procedure", "code")
    p = f"{_q(name + ' proves')}(P.code.coding)" if proves else "false"
    s = f"{_q(name + ' suggests')}(P.code.coding)" if suggests else "false"
    current = spec_input.mode == "current"
    proof_now = f'{p} and "Under way"(P)' if current else p
    record = f'if exists ("Done procedures" P where {proof_now}) then true else null'
    weaker = f"{p} or {s}" if current else s
    if weaker == "false":
        _yes_no(w, name, record, None, "A procedure with a proving code is on record.")
        return
    suggested = f'if {_q(name + " record")} is null and exists ("Done procedures" P where {weaker}) then true else null'
    what = "under way (in progress or within the last days)" if current else "on record"
    _yes_no(w, name, record, suggested, f"A procedure with a proving code is {what}.")


def _history(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    name, mode = spec_input.name, spec_input.mode
    assert spec_input.drug is not None  # checked at load
    drug = spec_input.drug
    w.need("Medication codings")
    matches = f"{drug} matches"
    if matches not in w.matchers and not w.matcher(drug, None, matches, "MedicationStatement", "medication"):
        w.function(matches, "codings List<FHIR.Coding>", "false")  # a drug known by name only (no codes)
    drug_codes = spec(w.mappings, drug, None)
    for kind in ("MedicationAdministration", "MedicationRequest"):
        w.requirements.add((kind, "medication", drug_codes.canonical if drug_codes.codes else None))
    status_ok = [f"not (Coalesce(X.status.value, '') in {_strings(sorted(HISTORY_EXCLUDED))})"]
    if mode == "current":
        status_ok.append(f"Coalesce(X.status.value, '') in {_strings(sorted(HISTORY_CURRENT))}")
        w.need("As needed")
    drug_test = (
        f'{_q(matches)}("Medication codings"(X.medication as FHIR.CodeableConcept, X.medication as FHIR.Reference, '
        "X.contained))"
    )
    where = "\n      and ".join([*status_ok, drug_test])

    def given(statuses: tuple[str, ...]) -> str:
        return f"if X.status.value in {_strings(statuses)} then 'evidence' else null"

    classes = {
        "ever": ("'evidence'", "'evidence'", "'evidence'"),
        "administered": (given(_STATEMENT_GIVEN), given(_ADMINISTRATION_GIVEN), "'ordered'"),
        "current": (
            "if \"As needed only\"(X.dosage) then 'on-demand' else 'evidence'",
            "'evidence'",
            "if \"As needed only\"(X.dosageInstruction) then 'on-demand' else 'evidence'",
        ),
    }[mode]
    sources = [
        f"[MedicationStatement] X\n    where {where}\n    return all {classes[0]}",
        f"[MedicationAdministration] X\n    where {where}\n    return all {classes[1]}",
        f"[MedicationRequest] X\n    where not Coalesce(X.id.value = {_ORDER}.id.value, false)\n"
        f"      and {where}\n    return all {classes[2]}",
    ]
    if mode != "current":
        prior = "'evidence'" if mode == "ever" else "'ordered'"
        sources.append(
            f'if {_ORDER}.priorPrescription is not null and {_q(matches)}("Order medication codings")\n'
            f"    then {{ {prior} }} else List<String>{{}}"
        )
    body = "\n  union ".join(f"({s})" for s in sources)
    w.define(
        f"{name} evidence",
        body,
        "What the medication history shows of the drug: given (evidence), only ordered, or taken only as needed.",
    )
    ev = _q(f"{name} evidence")
    record = (
        f"if 'evidence' in {ev} then true\n  else if 'on-demand' in {ev} or 'ordered' in {ev} then null\n  else false"
    )
    suggested = None
    if mode != "ever":
        suggested = f"if not ('evidence' in {ev}) and ('on-demand' in {ev} or 'ordered' in {ev}) then true else null"
    _yes_no(w, name, record, suggested, f"Earlier therapy with {drug} on record ({mode}); none on record is false.")


def _factor_literal(factor: float) -> str:
    """A CQL expression multiplying by ``factor`` exactly enough (CQL decimals keep 8 places)."""
    exact = Decimal(repr(factor))
    if exact == exact.quantize(Decimal("0.00000001")):
        text = format(exact.normalize(), "f")
        return f"* {text if '.' in text else text + '.0'}"
    inverse = Decimal(repr(1 / factor))
    text = format(inverse.quantize(Decimal("0.00000001")).normalize(), "f")
    return f"/ {text if '.' in text else text + '.0'}"


def _value_function(w: _Writer, spec_input: InputDef) -> str:
    """Define ``"<input> value"``(Quantity): the number in the input's unit (null when the unit does not convert)."""
    w.need("Unit")
    target = spec_input.unit or ""
    whens = []
    for unit in _known_units():
        try:
            factor = units.convert(1.0, unit, target)
        except units.UnitError:
            continue
        whens.append(f"    when {_s(unit)} then quantity.value.value {_factor_literal(factor)}")
    name = f"{spec_input.name} value"
    body = 'case "Unit"(quantity)\n' + "\n".join(whens) + "\n    else null\n  end"
    w.function(name, "quantity FHIR.Quantity", body, f"A quantity's number in {target} (units.convert).")
    return name


def _results(w: _Writer, spec_input: InputDef, extra: str) -> None:
    """``"<input> results"`` (newest first) and ``"<input> result"``, the one the input reads (``pick``)."""
    name = spec_input.name
    w.need("Observations")
    matches = w.matcher(name, None, f"{name} matches", "Observation", "code")
    test = f"{_q(name + ' matches')}(O.code.coding)" if matches else "false"
    fields = [
        "observation: O",
        'observed: "Observed"(O)',
        'dayIndex: days between @1900-01-01 and "Observed"(O)',
        *extra.split("\n"),
    ]
    tuple_text = ",\n      ".join(f for f in fields if f)
    w.define(
        f"{name} results",
        f'("Final observations" O\n    where {test}\n    return all Tuple {{\n      {tuple_text}\n    }}) R\n'
        "    sort by dayIndex desc",
        "Final results of the input's codes, newest first (of one day, in record order).",
    )
    results = _q(f"{name} results")
    pick = spec_input.pick
    if pick == "previous":
        chosen = f"{results}[1]"
    elif pick == "lowest":
        chosen = (
            f"Coalesce(First({results} R where R.value is not null sort by lowInf, lowKey, lowRank),\n"
            f"    First({results}))"
        )
    elif pick == "highest":
        chosen = (
            f"Coalesce(First({results} R where R.value is not null sort by highFinite desc, highKey desc, "
            f"highRank desc), First({results}))"
        )
    else:
        chosen = f"First({results})"
    what = {"latest": "the latest", "previous": "the one before the latest", "lowest": "the lowest (by value)"}
    w.define(
        observations_define(name),
        f"{results} R return all R.observation",
        "The input's results on record, newest first: what the clinician should see beside the question.",
    )
    w.define(f"{name} result", chosen, f"The result the input reads: {what.get(pick, 'the highest (by value)')}.")
    w.define(f"{name} date", f"{_q(name + ' result')}.observed", "The day the result was taken.", out="date")


def _form_context(w: _Writer, policy: Policy, mappings: Mappings) -> None:
    """What a form reads beside the answers: the order it documents (its population context) and, per product, the
    indications the record points to (the indication question's candidates)."""
    w.blocks.append(_comment("--- the form's context"))
    w.define(
        ORDER_DEFINE,
        _ORDER,
        "The order the form documents (the client passes it in context): every form's population context.",
        out="MedicationRequest",
    )
    defined = uses(policy, mappings)
    for product in policy.products:
        codes = []
        for ind in product.indications:
            named = evidence_inputs(ind, defined)
            if named:
                test = " or ".join(f"{_q(n)} is true" for n in named)
                codes.append(f"if {test} then Code {{ code: {_s(ind.id)}, display: {_s(ind.title)} }} else null")
        if codes:
            listed = ",\n    ".join(codes)
            w.define(
                suggested_define(product),
                f"(List<System.Code> {{\n    {listed}\n  }}) C where C is not null",
                "The indications (criterion ids) whose diagnosis is on record or suggested by it (a partial code): the "
                "indication question's candidates.",
            )


def _stale(name: str, window: int | None) -> str:
    if window is None:
        return ""
    return f"days between {_q(name + ' date')} and Today() > {window} or "


def _lab(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    name = spec_input.name
    value = _value_function(w, spec_input)
    v = f"{_q(value)}(O.value as FHIR.Quantity)"
    c = "Coalesce((O.value as FHIR.Quantity).comparator.value, '')"
    extra = [f"value: {v}", f"comparator: {c}"]
    if spec_input.pick == "lowest":
        extra += [
            f"lowInf: if {c} in {{ '>', '>=' }} then 1 else 0",
            f"lowKey: if {c} in {{ '>', '>=' }} then 0.0 else {v}",
            f"lowRank: if {c} = '<' then 0 else 1",
        ]
    if spec_input.pick == "highest":
        extra += [
            f"highFinite: if {c} in {{ '<', '<=' }} then 0 else 1",
            f"highKey: if {c} in {{ '<', '<=' }} then 0.0 else {v}",
            f"highRank: if {c} = '>' then 1 else 0",
        ]
    _results(w, spec_input, "\n".join(extra))
    result = _q(name + " result")
    stale = _stale(name, use.window)
    unit = _s(spec_input.unit or "")
    window = f" A result older than {use.window} days gives nothing." if use.window else ""
    w.define(
        name,
        f"if {stale}{result}.value is null or {result}.comparator in {{ '<', '<=', '>', '>=' }} then null\n"
        f"  else System.Quantity {{ value: {result}.value, unit: {unit} }}",
        f"The result in {spec_input.unit}.{window} A result with a comparator (<5) is not a number to pre-fill.",
        out="Quantity",
    )
    if "below_range" in use.ops:
        w.need("Codings")
        w.need("Below limit")
        flags = _strings(_LOW_FLAGS + _NOT_LOW_FLAGS)
        body = (
            f"if {stale}{result}.value is null then null\n"
            "  else Coalesce(\n"
            f'    First(("Codings"({result}.observation.interpretation)) C where C.code.value in {flags}\n'
            f"      return all C.code.value in {_strings(_LOW_FLAGS)}),\n"
            f"    First(({result}.observation.referenceRange X\n"
            f"      let limit: {_q(value)}(X.low)\n"
            "      where limit is not null\n"
            f'      return all "Below limit"({result}.value, {result}.comparator, limit)) B where B is not null)\n'
            "  )"
        )
        w.define(
            f"{name} below range",
            body,
            "Under the laboratory's reference range: its flag (L, LL), else the value against referenceRange.low.",
            out="boolean",
        )


def _lab_code(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    name = spec_input.name
    w.need("Qualitative")
    _results(w, spec_input, "")
    result = _q(name + " result")
    stale = _stale(name, use.window)
    whens = "".join(
        f"    when {_s(code)} then Code {{ code: {_s(code)}, system: {_s(RESULT_SYSTEM)}, display: {_s(display)} }}\n"
        for code, display in spec_input.options
    )
    window = f" (a result older than {use.window} days gives nothing)" if use.window else ""
    w.define(
        name,
        f'if {stale}{result} is null then null\n  else case "Qualitative"({result}.observation)\n{whens}'
        "    else null\n  end",
        f"The result as one of the answer codes{window}.",
        out="Coding",
    )


def _age(w: _Writer, spec_input: InputDef, use: InputUse) -> None:
    w.define(spec_input.name, "Patient.birthDate.value", "The date of birth (the question asks for it).", out="date")


_KIND_WRITERS = {
    "condition": _condition,
    "order_reason": _order_reason,
    "setting": _setting,
    "specialty": _specialty,
    "procedure": _procedure,
    "medication_history": _history,
    "lab": _lab,
    "lab_code": _lab_code,
    "age": _age,
}
assert set(_KIND_WRITERS) == DEFINED_KINDS
