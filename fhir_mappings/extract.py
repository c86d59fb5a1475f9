"""Turn FHIR R4 resources into named policy inputs (facts), each with the references that support it.

Pure: no I/O, no Flask. A :class:`FactFinder` is built per request over a :class:`ClinicalData` and computes an
input only when a policy asks for it.

A fact's ``value`` is ``None`` when the data cannot settle it; ``partial`` then holds what weaker evidence suggests
(a non-specific diagnosis code, a partial birth date) so a form can be prepopulated, and ``searched`` says whether
the source was available at all (so "absent" can be told from "not looked at"). Lab facts carry the date they were
measured; the engine, not this module, decides whether that is recent enough.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any

from fhir_mappings import systems, units
from fhir_mappings.loader import CURRENT_PROCEDURE_DAYS, CodeRow, InputDef, Mappings

ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})
EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
FINAL_OBSERVATION = frozenset({"final", "amended", "corrected"})
HISTORY_EXCLUDED = frozenset({"entered-in-error", "not-taken", "not-done", "cancelled", "draft"})
HISTORY_CURRENT = frozenset({"active", "in-progress", "on-hold", "intended"})
PROCEDURE_DONE = frozenset({"completed", "in-progress", "preparation"})

# qualitative results, as SNOMED CT findings, v3 interpretation codes or plain text -> our two answer codes
RESULT_CODES: Mapping[str, str] = {
    "10828004": "positive",
    "260373001": "positive",
    "11214006": "positive",  # positive, detected, reactive
    "260385009": "negative",
    "260415000": "negative",
    "131194007": "negative",  # negative, not detected, non-reactive
    "POS": "positive",
    "DET": "positive",
    "NEG": "negative",
    "ND": "negative",
    "RR": "positive",  # v3 reactive
    "NR": "negative",  # v3 non-reactive
    "N": "negative",  # v3 normal: for a qualitative test, not detected
    "A": "positive",  # v3 abnormal: for a qualitative test, detected
}
VIRAL_LOAD_UNITS = frozenset({"[IU]/mL", "{copies}/mL", "{log_IU}/mL", "{log_copies}/mL"})
RESULT_TEXT: Mapping[str, str] = {
    "positive": "positive",
    "detected": "positive",
    "reactive": "positive",
    "negative": "negative",
    "not detected": "negative",
    "undetected": "negative",
    "nonreactive": "negative",
    "non-reactive": "negative",
}


@dataclass(frozen=True)
class Range:
    """A number known to lie between ``lo`` and ``hi`` (a lab comparator or a partial birth date widens it)."""

    lo: float | None
    hi: float | None
    lo_open: bool = False
    hi_open: bool = False

    @staticmethod
    def exact(value: float) -> Range:
        return Range(value, value)

    @staticmethod
    def measured(value: float, comparator: Any = None) -> Range:
        """A result as reported: ``<5`` is every number below 5, ``>=5`` every number from 5 up."""
        if comparator in ("<", "<="):
            return Range(None, value, hi_open=comparator == "<")
        if comparator in (">", ">="):
            return Range(value, None, lo_open=comparator == ">")
        return Range.exact(value)

    def describe(self, unit: str | None = None) -> str:
        suffix = f" {unit}" if unit else ""
        if self.lo is not None and self.lo == self.hi:
            return f"{_num(self.lo)}{suffix}"
        if self.lo is None and self.hi is not None:
            return f"{'<' if self.hi_open else '≤'}{_num(self.hi)}{suffix}"
        if self.hi is None and self.lo is not None:
            return f"{'>' if self.lo_open else '≥'}{_num(self.lo)}{suffix}"
        return f"{_num(self.lo)}–{_num(self.hi)}{suffix}"


def _num(v: float | None) -> str:
    return "?" if v is None else f"{v:g}"


@dataclass(frozen=True)
class Fact:
    value: Any = None  # bool | Range | str (answer code) | None when unsettled
    evidence: tuple[str, ...] = ()
    partial: Any = None  # what weaker evidence suggests, for prepopulating a form
    searched: bool = False
    note: str = ""
    observed: date | None = None  # labs: when the result was taken
    window_days: int | None = None  # labs: the mapping's default recency window
    below_range: bool | None = None  # labs: under the lab's own reference range (None: the result does not say)

    @property
    def known(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class Reasons:
    """What the order's own reason (MedicationRequest.reasonCode / reasonReference) names: the diagnosis inputs its
    codes map to. The reason is the indication requested, so it picks the indication (or shows the use is another)."""

    matched: Mapping[str, bool] = field(default_factory=dict)  # input -> True: a code proves it; False: suggests it
    evidence: tuple[str, ...] = ()
    coded: bool = False  # the order states a coded reason at all


NO_REASONS = Reasons()


@dataclass(frozen=True)
class ClinicalData:
    """What we know about the patient and the order, from prefetch or queries. Resources are R4 JSON dicts."""

    today: date
    order: Mapping[str, Any]
    patient: Mapping[str, Any] | None = None
    conditions: tuple[Mapping[str, Any], ...] = ()
    observations: tuple[Mapping[str, Any], ...] = ()
    practitioner_roles: tuple[Mapping[str, Any], ...] = ()
    practitioners: tuple[Mapping[str, Any], ...] = ()
    medications: tuple[Mapping[str, Any], ...] = ()
    medication_history: tuple[Mapping[str, Any], ...] = ()
    procedures: tuple[Mapping[str, Any], ...] = ()
    encounter: Mapping[str, Any] | None = None
    locations: tuple[Mapping[str, Any], ...] = ()  # the encounter's locations
    user: str | None = None  # the hook's userId, the prescriber when the order names no requester
    # the sources obtained (prefetched or queried); one missing here was not available
    available: frozenset[str] = field(default_factory=frozenset)


def ref(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def codings(concept: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(concept, Mapping):
        for c in concept.get("coding") or ():
            if isinstance(c, Mapping):
                yield c


def all_codings(concepts: Any) -> list[Mapping[str, Any]]:
    """The codings of a list of CodeableConcepts (e.g. Encounter.type)."""
    return [c for concept in concepts or () for c in codings(concept)]


def medication_codings(
    resource: Mapping[str, Any], medications: Iterable[Mapping[str, Any]] = (), names: frozenset[str] = frozenset()
) -> list[Mapping[str, Any]]:
    """Codings of the drug a Medication* resource names: its CodeableConcept, or the contained / given Medication.
    Words of the drug's name (text and displays) that are in ``names`` come too, under :data:`systems.PRODUCT_NAME`,
    for products that have no code."""
    concepts = [resource.get("medicationCodeableConcept")]
    mref = (resource.get("medicationReference") or {}).get("reference")
    if isinstance(mref, str):
        if mref.startswith("#"):
            candidates = [c for c in resource.get("contained") or () if c.get("id") == mref[1:]]
        else:
            rid = mref.rsplit("/", 1)[-1]
            candidates = [m for m in medications if m.get("id") == rid]
        concepts.extend(med.get("code") for med in candidates)
    out: list[Mapping[str, Any]] = []
    texts: list[str] = []
    for concept in concepts:
        if not isinstance(concept, Mapping):
            continue
        found = list(codings(concept))
        out.extend(found)
        texts.extend(str(t) for t in [concept.get("text"), *(c.get("display") for c in found)] if t)
    for word in dict.fromkeys(w for text in texts for w in systems.name_words(text)):
        if word in names:
            out.append({"system": systems.PRODUCT_NAME, "code": word})
    return out


def effective_date(obs: Mapping[str, Any]) -> date | None:
    raw = obs.get("effectiveDateTime") or obs.get("effectiveInstant")
    if not raw and isinstance(obs.get("effectivePeriod"), Mapping):
        raw = obs["effectivePeriod"].get("end") or obs["effectivePeriod"].get("start")
    return parse_date(raw or obs.get("issued"))


def parse_date(raw: Any) -> date | None:
    if not isinstance(raw, str) or len(raw) < 10:
        return None
    try:
        return date.fromisoformat(raw[:10])
    except ValueError:
        return None


def years_between(born: date, today: date) -> int:
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def age_range(birth: str, today: date) -> Range:
    """Age in whole years from a FHIR date (``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``). Raises ValueError."""
    parts = birth.split("-")
    year = int(parts[0])
    if len(parts) >= 3:
        return Range.exact(years_between(date(year, int(parts[1]), int(parts[2][:2])), today))
    first_month, last_month = (int(parts[1]), int(parts[1])) if len(parts) == 2 else (1, 12)
    earliest = date(year, first_month, 1)
    latest = date(year, last_month, calendar.monthrange(year, last_month)[1])
    return Range(years_between(latest, today), years_between(earliest, today))


class FactFinder:
    """Computes facts on demand for one request and remembers them for that request only."""

    def __init__(self, mappings: Mappings, data: ClinicalData) -> None:
        self.mappings = mappings
        self.data = data
        self._cache: dict[str, Fact] = {}

    def get(self, name: str) -> Fact:
        if name not in self._cache:
            self._cache[name] = self._compute(self.mappings.inputs[name])
        return self._cache[name]

    def _compute(self, spec: InputDef) -> Fact:
        kind = spec.kind
        if kind == "age":
            return self._age()
        if kind == "drug":
            return self._drug(spec)
        if kind in ("condition", "order_reason"):
            return self._condition(spec, reasons_only=kind == "order_reason")
        if kind == "lab":
            return self._lab(spec)
        if kind == "lab_code":
            return self._lab_code(spec)
        if kind == "specialty":
            return self._specialty(spec)
        if kind == "medication_history":
            return self._history(spec)
        if kind == "procedure":
            return self._procedure(spec)
        if kind == "setting":
            return self._setting(spec)
        return Fact(note="asked in the questionnaire only")  # kind "answer": no structured source

    def _matches(self, name: str, concepts: Iterable[Mapping[str, Any]]) -> list[CodeRow]:
        hits: list[CodeRow] = []
        for c in concepts:
            hits.extend(r for r in self.mappings.lookup(c.get("system"), c.get("code")) if r.input == name)
        return hits

    def _age(self) -> Fact:
        patient = self.data.patient
        if patient is None:
            return Fact(note="no Patient resource was available")
        birth = patient.get("birthDate")
        evidence = (ref(patient),)
        if not isinstance(birth, str) or not birth:
            return Fact(evidence=evidence, searched=True, note="Patient has no birthDate")
        try:
            age = age_range(birth, self.data.today)
        except ValueError:
            return Fact(evidence=evidence, searched=True, note="Patient birthDate is not a date")
        if age.lo == age.hi:
            return Fact(age, evidence, searched=True)
        return Fact(age, evidence, partial=birth, searched=True, note=f"birth date is partial ({birth})")

    def _drug(self, spec: InputDef) -> Fact:
        found = self._matches(
            spec.name, medication_codings(self.data.order, self.data.medications, self.mappings.product_names)
        )
        if found:
            return Fact(True, (ref(self.data.order),), searched=True)
        return Fact(False, searched=True)

    def reason(self, name: str) -> Fact:
        """A diagnosis input as the order's own reason states it (other inputs as :meth:`get`)."""
        spec = self.mappings.inputs[name]
        if spec.kind != "condition":
            return self.get(name)
        key = f"reason:{name}"
        if key not in self._cache:
            self._cache[key] = self._condition(spec, reasons_only=True)
        return self._cache[key]

    def reasons(self) -> Reasons:
        """What the order's reason names: each diagnosis input its codes map to (True: proves it; False: suggests)."""
        matched: dict[str, bool] = {}
        evidence: list[str] = []
        coded = False
        for where, concept in self._order_reasons():
            for c in codings(concept):
                coded = True
                for row in self.mappings.lookup(c.get("system"), c.get("code")):
                    if self.mappings.inputs[row.input].kind in ("condition", "order_reason"):
                        matched[row.input] = matched.get(row.input, False) or row.strength == "proof"
                        evidence.append(where)
        return Reasons(matched, tuple(dict.fromkeys(evidence)), coded)

    def _order_reasons(self) -> list[tuple[str, Mapping[str, Any]]]:
        order = self.data.order
        out: list[tuple[str, Mapping[str, Any]]] = [
            (f"{ref(order)}#reasonCode", concept)
            for concept in order.get("reasonCode") or ()
            if isinstance(concept, Mapping)
        ]
        by_id = {c.get("id"): c for c in self.data.conditions}
        for reason in order.get("reasonReference") or ():
            target = (reason or {}).get("reference") or ""
            if target.startswith("#"):
                cond = next((c for c in order.get("contained") or () if c.get("id") == target[1:]), None)
            elif target.startswith("Condition/"):
                cond = by_id.get(target.split("/", 1)[1])
            else:
                cond = None
            if cond is not None:
                out.append((target if target.startswith("#") else ref(cond), cond.get("code") or {}))
        return out

    def _condition(self, spec: InputDef, reasons_only: bool) -> Fact:
        proof: list[str] = []
        partial: list[str] = []
        refuted: list[str] = []
        if not reasons_only:
            for cond in self.data.conditions:
                rows = self._matches(spec.name, codings(cond.get("code")))
                if not rows:
                    continue
                clinical = {c.get("code") for c in codings(cond.get("clinicalStatus"))}
                verification = {c.get("code") for c in codings(cond.get("verificationStatus"))}
                if "refuted" in verification:
                    refuted.append(ref(cond))
                    continue
                if verification & EXCLUDED_VERIFICATION or (clinical and not clinical & ACTIVE_CLINICAL):
                    continue
                (proof if any(r.strength == "proof" for r in rows) else partial).append(ref(cond))
        for where, concept in self._order_reasons():
            rows = self._matches(spec.name, codings(concept))
            if rows:
                (proof if any(r.strength == "proof" for r in rows) else partial).append(where)
        searched = reasons_only or "conditions" in self.data.available
        if proof:
            return Fact(True, tuple(dict.fromkeys(proof)), searched=True)
        if partial:
            return Fact(
                None,
                tuple(dict.fromkeys(partial)),
                partial=True,
                searched=searched,
                note="a related but non-specific diagnosis code is on record",
            )
        if refuted:
            return Fact(False, tuple(refuted), searched=True, note="the diagnosis is recorded as refuted")
        return Fact(None, searched=searched, note="" if searched else "the patient's conditions were not available")

    def _latest(self, spec: InputDef) -> tuple[date, Mapping[str, Any], CodeRow] | None:
        """The result the input reads (``spec.pick``): the latest (default); the lowest or the highest at any date
        (results without a value the unit converts to do not compete; with none, the latest); or the one before
        the latest."""
        found: list[tuple[date, Mapping[str, Any], CodeRow]] = []
        for obs in self.data.observations:
            if obs.get("status") not in FINAL_OBSERVATION:
                continue
            rows = self._matches(spec.name, codings(obs.get("code")))
            when = effective_date(obs)
            if rows and when is not None:
                found.append((when, obs, rows[0]))
        # newest first; of results on the same date, the first listed
        ordered = [item for _, item in sorted(enumerate(found), key=lambda p: (-p[1][0].toordinal(), p[0]))]
        if spec.pick == "previous":
            return ordered[1] if len(ordered) > 1 else None
        if spec.pick in ("lowest", "highest"):
            valued = [(v, item) for item in ordered if (v := _measured(item[1], spec.unit or "")) is not None]
            if valued:
                if spec.pick == "lowest":
                    return min(valued, key=lambda p: _low_key(p[0]))[1]
                return max(valued, key=lambda p: _high_key(p[0]))[1]
        return ordered[0] if ordered else None

    def _result(self, spec: InputDef) -> tuple[Fact, Mapping[str, Any] | None]:
        """The result the input reads (the latest unless ``pick`` says otherwise) as a Fact with its evidence and
        date but no value yet (and the Observation), or a final Fact saying why there is none."""
        searched = "observations" in self.data.available
        latest = self._latest(spec)
        if latest is None:
            note = f"no {spec.display} result on record" if searched else "laboratory results were not available"
            return Fact(None, searched=searched, note=note), None
        when, obs, row = latest
        return Fact(
            None, (ref(obs),), searched=True, observed=when, window_days=row.recency_days or spec.recency_days
        ), obs

    def _lab(self, spec: InputDef) -> Fact:
        base, obs = self._result(spec)
        if obs is None:
            return base
        vq = obs.get("valueQuantity")
        value = vq.get("value") if isinstance(vq, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return replace(base, note=f"{spec.display} result has no numeric value")
        assert isinstance(vq, Mapping)
        unit = units.quantity_unit(vq)
        if unit is None:
            return replace(base, note=f"{spec.display} result has no unit")
        try:
            converted = units.convert(float(value), unit, spec.unit or "")
        except units.UnitError as exc:
            return replace(base, note=f"{spec.display}: {exc}")
        measured = Range.measured(converted, vq.get("comparator"))
        when = base.observed.isoformat() if base.observed else "?"
        below = _below_range(obs, measured, spec.unit or "")
        flag = "" if below is None else ", below its reference range" if below else ", not below its reference range"
        return replace(
            base,
            value=measured,
            below_range=below,
            note=f"{spec.display} {measured.describe(spec.unit)} on {when}{flag}",
        )

    def _lab_code(self, spec: InputDef) -> Fact:
        base, obs = self._result(spec)
        if obs is None:
            return base
        result = _qualitative(obs)
        if result is None:
            return replace(base, note=f"{spec.display} result is not a recognised positive/negative")
        when = base.observed.isoformat() if base.observed else "?"
        return replace(base, value=result, note=f"{spec.display} {result} on {when}")

    def _prescriber_resources(self) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
        requester = (self.data.order.get("requester") or {}).get("reference") or self.data.user or ""
        rtype, _, rid = requester.rpartition("/")
        rtype = rtype.rsplit("/", 1)[-1]
        roles = [
            r
            for r in self.data.practitioner_roles
            if (rtype == "PractitionerRole" and r.get("id") == rid)
            or (
                rtype == "Practitioner"
                and str((r.get("practitioner") or {}).get("reference", "")).endswith(f"Practitioner/{rid}")
            )
        ]
        pract_ids = (
            {rid}
            if rtype == "Practitioner"
            else {str((r.get("practitioner") or {}).get("reference", "")).rsplit("/", 1)[-1] for r in roles}
        )
        practs = [p for p in self.data.practitioners if p.get("id") in pract_ids]
        return roles, practs

    def _specialty(self, spec: InputDef) -> Fact:
        roles, practs = self._prescriber_resources()
        for role in roles:
            for concept in role.get("specialty") or ():
                if self._matches(spec.name, codings(concept)):
                    return Fact(True, (ref(role),), searched=True)
        for pract in practs:
            for qual in pract.get("qualification") or ():
                if self._matches(spec.name, codings((qual or {}).get("code"))):
                    return Fact(True, (ref(pract),), searched=True)
        seen = tuple(ref(r) for r in roles) + tuple(ref(p) for p in practs)
        recorded = any(role.get("specialty") for role in roles) or any(p.get("qualification") for p in practs)
        if recorded:
            return Fact(False, seen, searched=True, note="the prescriber's recorded specialty is not a match")
        return Fact(None, seen, searched=bool(seen), note="the prescriber's specialty is not on record")

    def _history(self, spec: InputDef) -> Fact:
        assert spec.drug is not None  # checked at load
        order = self.data.order
        evidence: list[str] = []
        ordered: list[str] = []  # mode administered: earlier orders, which do not show the drug was given
        on_demand: list[str] = []  # mode current: therapy taken only as needed
        for res in self.data.medication_history:
            if res.get("id") == order.get("id") and res.get("resourceType") == order.get("resourceType"):
                continue
            status = res.get("status")
            if status in HISTORY_EXCLUDED or (spec.mode == "current" and status not in HISTORY_CURRENT):
                continue
            if not self._matches(
                spec.drug, medication_codings(res, self.data.medications, self.mappings.product_names)
            ):
                continue
            if spec.mode == "administered" and not _given(res):
                if res.get("resourceType") == "MedicationRequest":
                    ordered.append(ref(res))
                continue
            if spec.mode == "current" and _as_needed_only(res):
                on_demand.append(ref(res))  # review C17: therapy "as needed" is not routine prophylaxis
                continue
            evidence.append(ref(res))
        if spec.mode != "current" and order.get("priorPrescription") and self.get(spec.drug).value:
            (evidence if spec.mode == "ever" else ordered).append(f"{ref(order)}#priorPrescription")
        if evidence:
            return Fact(True, tuple(dict.fromkeys(evidence)), searched=True)
        searched = "medication_history" in self.data.available
        if on_demand:
            return Fact(
                None,
                tuple(dict.fromkeys(on_demand)),
                partial=True,
                searched=True,
                note="current therapy on record is taken as needed (on demand), which is not routine prophylaxis",
            )
        if ordered:
            when = [
                d for r in self.data.medication_history if ref(r) in ordered if (d := parse_date(r.get("authoredOn")))
            ]
            dated = f" ({', '.join(sorted(d.isoformat() for d in when))})" if when else ""
            return Fact(
                None,
                tuple(dict.fromkeys(ordered)),
                partial=True,
                searched=True,
                note=f"an earlier order is on record{dated}; the record does not show it was administered",
            )
        return Fact(
            False if searched else None,
            searched=searched,
            note="" if searched else "the patient's medication history was not available",
        )

    def _coded(
        self, spec: InputDef, where: Iterable[tuple[str, Iterable[Mapping[str, Any]]]]
    ) -> tuple[list[str], list[str]]:
        """References whose codings match the input: (proof, partial)."""
        proof: list[str] = []
        partial: list[str] = []
        for reference, concepts in where:
            rows = self._matches(spec.name, concepts)
            if rows:
                (proof if any(r.strength == "proof" for r in rows) else partial).append(reference)
        return list(dict.fromkeys(proof)), list(dict.fromkeys(partial))

    def _procedure(self, spec: InputDef) -> Fact:
        done = [p for p in self.data.procedures if p.get("status") in PROCEDURE_DONE]
        proof, partial = self._coded(spec, ((ref(p), codings(p.get("code"))) for p in done))
        searched = "procedures" in self.data.available
        if spec.mode == "current" and proof:
            # "being treated with" (Regiocit: CRRT): in progress, or performed in the last days; an older one suggests
            by_ref = {ref(p): p for p in done}
            now = [r for r in proof if _under_way(by_ref[r], self.data.today)]
            if not now:
                return Fact(
                    None,
                    tuple(proof),
                    partial=True,
                    searched=True,
                    note="the procedure on record is not under way now (completed earlier)",
                )
            proof = now
        if proof:
            return Fact(True, tuple(proof), searched=True)
        if partial:
            return Fact(None, tuple(partial), partial=True, searched=searched, note="a related procedure is on record")
        return Fact(None, searched=searched, note="" if searched else "the patient's procedures were not available")

    def _setting(self, spec: InputDef) -> Fact:
        """Where the drug is given: the order's category, the encounter's class and type, its locations' types.

        A proof row settles it (true), a partial row suggests it. Codes that match no row of this input leave it
        unknown but searched (review C7): the seed's settings are examples ("for example, hospitals, surgical centers,
        and emergency departments"), and a category such as ``outpatient`` covers the emergency department too, so an
        unlisted code is not "another setting". Only a setting known not to qualify fails a criterion, and that is a
        row of its own input (``setting.outside_facility``: POS 12 Home, class HH, category community / discharge),
        which policies test with ``absent``; for that input, other codes on record mean "searched, none found".
        No codes at all: unknown (not searched when there is no encounter)."""
        order, enc = self.data.order, self.data.encounter
        where: list[tuple[str, list[Mapping[str, Any]]]] = [
            (f"{ref(order)}#category", all_codings(order.get("category")))
        ]
        if enc is not None:
            klass = enc.get("class")
            where.append((ref(enc), [klass] if isinstance(klass, Mapping) else []))
            where.append((ref(enc), all_codings(enc.get("type"))))
        for loc in self.data.locations:
            where.append((ref(loc), all_codings(loc.get("type"))))
        proof, partial = self._coded(spec, where)
        known = [r for r, concepts in where if concepts]
        if proof:
            return Fact(True, tuple(proof), searched=True)
        if partial:
            return Fact(
                None,
                tuple(partial),
                partial=True,
                searched=True,
                note="the setting on record may qualify but does not show it",
            )
        if known:
            return Fact(
                None,
                tuple(dict.fromkeys(known)),
                searched=True,
                note=f"the setting on record does not show {spec.display[0].lower()}{spec.display[1:]}",
            )
        return Fact(None, searched=enc is not None, note="the setting of care is not on record")


def _measured(obs: Mapping[str, Any], unit: str) -> Range | None:
    """A result's value in ``unit`` (None when it has no numeric value or the unit does not convert)."""
    vq = obs.get("valueQuantity")
    value = vq.get("value") if isinstance(vq, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    assert isinstance(vq, Mapping)
    from_unit = units.quantity_unit(vq)
    if from_unit is None:
        return None
    try:
        return Range.measured(units.convert(float(value), from_unit, unit), vq.get("comparator"))
    except units.UnitError:
        return None


def _low_key(r: Range) -> tuple[float, int]:
    """Orders results from the lowest: by the highest number each allows (``<1`` before ``1``)."""
    return (float("inf") if r.hi is None else r.hi, 0 if r.hi_open else 1)


def _high_key(r: Range) -> tuple[float, int]:
    """Orders results up to the highest: by the lowest number each allows (``>5`` after ``5``)."""
    return (float("-inf") if r.lo is None else r.lo, 1 if r.lo_open else 0)


# v3 ObservationInterpretation: below the low normal limit, and within or above it
LOW_FLAGS = frozenset({"L", "LL", "LU", "<"})
NOT_LOW_FLAGS = frozenset({"N", "H", "HH", "HU", ">"})


def _below_range(obs: Mapping[str, Any], value: Range, unit: str) -> bool | None:
    """Whether a result lies under the lab's own reference range: the lab's interpretation flag (L, LL) when it gives
    one, else the value against ``referenceRange.low`` (converted to ``unit``). None when the result says neither."""
    for concept in obs.get("interpretation") or ():
        for c in codings(concept):
            code = str(c.get("code"))
            if code in LOW_FLAGS:
                return True
            if code in NOT_LOW_FLAGS:
                return False
    for ref_range in obs.get("referenceRange") or ():
        low = (ref_range or {}).get("low") if isinstance(ref_range, Mapping) else None
        if not isinstance(low, Mapping) or isinstance(low.get("value"), bool):
            continue
        if not isinstance(low.get("value"), int | float):
            continue
        low_unit = units.quantity_unit(low)
        try:
            limit = units.convert(float(low["value"]), low_unit or "", unit)
        except units.UnitError:
            continue
        if value.hi is not None and (value.hi < limit or (value.hi_open and value.hi <= limit)):
            return True
        if value.lo is not None and value.lo >= limit:
            return False
    return None


def _given(res: Mapping[str, Any]) -> bool:
    """Whether a history resource shows the drug was given: a completed or in-progress MedicationAdministration,
    or an active or completed MedicationStatement (not not-taken, intended, stopped before use ...)."""
    kind, status = res.get("resourceType"), res.get("status")
    if kind == "MedicationAdministration":
        return status in ("completed", "in-progress")
    if kind == "MedicationStatement":
        return status in ("active", "completed")
    return False


def _under_way(procedure: Mapping[str, Any], today: date) -> bool:
    """In progress, or performed (its end, else its date) within the last CURRENT_PROCEDURE_DAYS days."""
    if procedure.get("status") in ("in-progress", "preparation"):
        return True
    period = procedure.get("performedPeriod")
    raw = procedure.get("performedDateTime")
    if isinstance(period, Mapping):
        if not period.get("end"):
            return True  # started and not ended: under way
        raw = period.get("end")
    when = parse_date(raw)
    return when is not None and (today - when).days <= CURRENT_PROCEDURE_DAYS


def as_needed(dosage: Mapping[str, Any]) -> bool:
    """The dosage is taken as needed (``asNeededBoolean`` true, or an ``asNeededCodeableConcept`` reason)."""
    return dosage.get("asNeededBoolean") is True or isinstance(dosage.get("asNeededCodeableConcept"), Mapping)


def _as_needed_only(res: Mapping[str, Any]) -> bool:
    """Whether every dosage of a MedicationRequest / MedicationStatement is "as needed" (none scheduled)."""
    dosages = [d for d in res.get("dosageInstruction") or res.get("dosage") or () if isinstance(d, Mapping)]
    return bool(dosages) and all(as_needed(d) for d in dosages)


def _qualitative(obs: Mapping[str, Any]) -> str | None:
    for c in codings(obs.get("valueCodeableConcept")):
        hit = RESULT_CODES.get(str(c.get("code")))
        if hit:
            return hit
    text = obs.get("valueString")
    if isinstance(text, str) and text.strip().lower() in RESULT_TEXT:
        return RESULT_TEXT[text.strip().lower()]
    for concept in obs.get("interpretation") or ():
        for c in codings(concept):
            hit = RESULT_CODES.get(str(c.get("code")))
            if hit:
                return hit
    # a viral load (IU/mL, copies/mL, log IU/mL): a quantified amount is a detected one; "<15 IU/mL" alone does not
    # say whether the target was detected below the limit or not at all, so without a flag or text it settles
    # nothing. Other quantities (an immunoassay's S/CO index) are never read as a result without their flag.
    vq = obs.get("valueQuantity")
    if isinstance(vq, Mapping) and not vq.get("comparator") and units.quantity_unit(vq) in VIRAL_LOAD_UNITS:
        value = vq.get("value")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return "positive"
    return None
