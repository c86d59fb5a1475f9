"""FHIR R4 records synthesized from a policy case's facts, for running the CQL and the Python extraction side by side.

A case (``policies/*/cases.yaml``) states facts by input name, the engine's view of the record. This module writes
a record that shows them: a Patient with a birth date for ``age_years``, Conditions with a proving or a partial code
of codes.csv, Observations with value, unit, date, reference range and flag, the prescriber's PractitionerRole,
earlier therapy, procedures, the encounter and its locations, and the order (a MedicationRequest) with its drug,
reason and requester. Facts the case marks ``unsearched`` (or leaves out) are simply not written.

The record does not need to reproduce the case's facts exactly: the test compares what two engines read from the
same record. What varies between the cases is chosen by a stable hash of the case and the input (which code of
several, which resource shape: a Condition or the order's reason, a statement or an administration, a flag or a
reference range), so the cases together exercise many shapes while each run stays the same. A few records that
must not count (a resolved diagnosis, a preliminary result, a therapy entered in error) are added beside them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from fhir_mappings import systems, units
from fhir_mappings.extract import ClinicalData
from fhir_mappings.loader import CodeRow, InputDef, Mappings
from policies.cases import build_order
from policies.model import Policy, Product

PATIENT_ID = "case-patient"
UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
SOURCES = frozenset({"conditions", "observations", "medication_history", "procedures"})
# a unit a lab may report instead of the input's (or another spelling of it), for the conversions
_OTHER_UNIT = {"%": "[IU]/dL", "kg": "[lb_av]", "10*9/L": "10*3/uL", "/uL": "10*3/uL", "[beth'U]/mL": "BU"}
_QUALITATIVE = {
    "positive": ("10828004", "Positive", "Detected", "POS"),
    "negative": ("260385009", "Negative", "Not detected", "NEG"),
}


@dataclass(frozen=True)
class Record:
    """One synthesized record: the Python engine's view and the Bundle the CQL reads (the same resources)."""

    data: ClinicalData
    bundle: dict[str, Any]
    order: dict[str, Any]


def _pick(key: str, n: int) -> int:
    """A stable choice among ``n`` for ``key`` (the same case always gets the same shape)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % n if n else 0


def _coding(row: CodeRow) -> dict[str, Any]:
    code = row.code
    if code.endswith("*"):  # a family: a code under it
        stem = code[:-1]
        code = stem + ("0" if "." in stem else ".0")
    return {"system": row.system, "code": code, "display": row.display}


def _concept(row: CodeRow) -> dict[str, Any]:
    return {"coding": [_coding(row)], "text": row.display}


def _quantity(value: float, unit: str, spelled: str | None = None) -> dict[str, Any]:
    return {"value": value, "unit": spelled or unit, "system": UCUM, "code": unit}


class _Builder:
    def __init__(self, policy: Policy, product: Product, mappings: Mappings, key: str, today: date) -> None:
        self.policy = policy
        self.product = product
        self.mappings = mappings
        self.key = key
        self.today = today
        self.counter = 0
        self.patient: dict[str, Any] = {"resourceType": "Patient", "id": PATIENT_ID, "gender": "male"}
        self.conditions: list[dict[str, Any]] = []
        self.observations: list[dict[str, Any]] = []
        self.roles: list[dict[str, Any]] = []
        self.practitioners: list[dict[str, Any]] = []
        self.medications: list[dict[str, Any]] = []
        self.therapy: list[dict[str, Any]] = []
        self.procedures: list[dict[str, Any]] = []
        self.encounter: dict[str, Any] | None = None
        self.locations: list[dict[str, Any]] = []
        self.order: dict[str, Any] = {}

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def choose(self, what: str, n: int) -> int:
        return _pick(f"{self.key}|{what}", n)

    def row(self, name: str, strength: str | None = None) -> CodeRow | None:
        rows = [
            r
            for r in self.mappings.rows_for(name)
            if (strength is None or r.strength == strength) and r.system != systems.PRODUCT_NAME
        ]
        return rows[self.choose(f"row:{name}:{strength}", len(rows))] if rows else None

    def subject(self) -> dict[str, str]:
        return {"reference": f"Patient/{PATIENT_ID}"}

    # --- per kind ----------------------------------------------------------------------------------------------

    def age(self, raw: Any) -> None:
        if isinstance(raw, str):
            self.patient["birthDate"] = raw  # a partial date as the case writes it
            return
        years = int(raw)
        born = self.today - timedelta(days=10 + self.choose("birthday", 200))
        try:
            born = born.replace(year=born.year - years)
        except ValueError:  # 29 February
            born = born.replace(year=born.year - years, day=28)
        self.patient["birthDate"] = born.isoformat()

    def condition(self, spec: InputDef, raw: Any) -> None:
        strength = "partial" if raw == "partial" else "proof"
        row = self.row(spec.name, strength)
        if row is None:
            return
        cond: dict[str, Any] = {
            "resourceType": "Condition",
            "id": self.next_id("cond"),
            "subject": self.subject(),
            "code": _concept(row),
        }
        shape = self.choose(f"cond:{spec.name}", 3)
        if raw is False:
            cond["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": "refuted"}]}
        else:
            if shape != 2:
                status = "recurrence" if shape == 1 else "active"
                cond["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": status}]}
            if shape != 1:
                cond["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": "confirmed"}]}
        self.conditions.append(cond)

    def reason(self, spec: InputDef, raw: Any) -> None:
        """The order's own reason names it: reasonCode, or reasonReference to a Condition. Never a contained one:
        cql-exec-fhir types contained resources as Resource, so CQL run in it cannot read their code."""
        row = self.row(spec.name, "partial" if raw == "partial" else "proof")
        if row is None:
            return
        if self.choose(f"reason:{spec.name}", 2) == 0:
            self.order.setdefault("reasonCode", []).append(_concept(row))
            return
        # on the problem list as resolved: it counts as the order's reason, not as an active diagnosis
        cid = self.next_id("reason")
        cond = {"resourceType": "Condition", "id": cid, "subject": self.subject(), "code": _concept(row)}
        cond["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": "resolved"}]}
        self.conditions.append(cond)
        self.order.setdefault("reasonReference", []).append({"reference": f"Condition/{cid}"})

    def specialty(self, spec: InputDef, raw: Any) -> None:
        row = self.row(spec.name)
        if row is None:
            return
        concept = (
            _concept(row)
            if raw is True
            else {"coding": [{"system": systems.NUCC, "code": "207Q00000X", "display": "Family Medicine"}]}
        )
        pract = {"resourceType": "Practitioner", "id": "prescriber", "name": [{"family": "Prescriber"}]}
        shape = self.choose(f"specialty:{spec.name}", 3)
        if shape == 2:  # the specialty as the Practitioner's qualification, no role
            pract["qualification"] = [{"code": concept}]
            self.practitioners.append(pract)
            self.order["requester"] = {"reference": "Practitioner/prescriber"}
            return
        role = {
            "resourceType": "PractitionerRole",
            "id": "prescriber-role",
            "practitioner": {"reference": "Practitioner/prescriber"},
            "specialty": [concept],
        }
        self.roles.append(role)
        self.practitioners.append(pract)
        ref = "PractitionerRole/prescriber-role" if shape == 0 else "Practitioner/prescriber"
        self.order["requester"] = {"reference": ref}

    def medication(self, res: dict[str, Any], drug: str) -> None:
        """Name the drug on a Medication* resource: a code, or a Medication it references (not a contained one, which
        CQL run in cql-exec-fhir cannot read)."""
        row = self.row(drug)
        if row is None:
            return
        if self.choose(f"med:{res['id']}", 2) == 0:
            res["medicationCodeableConcept"] = _concept(row)
        else:
            mid = self.next_id("med")
            self.medications.append({"resourceType": "Medication", "id": mid, "code": _concept(row)})
            res["medicationReference"] = {"reference": f"Medication/{mid}"}

    def history(self, spec: InputDef, raw: Any) -> None:
        assert spec.drug is not None
        mode = spec.mode
        shape = self.choose(f"history:{spec.name}", 3)
        scheduled = [{"timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "wk"}}}]
        if raw in (True, "partial") and mode != "current" and spec.drug in self.product.drugs and shape == 0:
            # the order itself says it continues an earlier prescription (proof for "ever", a hint otherwise)
            self.order["priorPrescription"] = {"reference": "MedicationRequest/earlier"}
            return
        if raw is True:
            if mode == "current":
                kind, status = ("MedicationStatement", "active") if shape != 2 else ("MedicationRequest", "active")
            elif mode == "administered":
                kind, status = [
                    ("MedicationAdministration", "completed"),
                    ("MedicationAdministration", "in-progress"),
                    ("MedicationStatement", "completed"),
                ][shape]
            else:
                kind, status = [
                    ("MedicationStatement", "active"),
                    ("MedicationAdministration", "completed"),
                    ("MedicationRequest", "completed"),
                ][shape]
            res = self.history_resource(kind, status, spec.drug)
            if kind != "MedicationAdministration":
                res["dosageInstruction" if kind == "MedicationRequest" else "dosage"] = scheduled
        elif raw == "partial":
            if mode == "administered":
                self.history_resource("MedicationRequest", ["active", "completed", "stopped"][shape], spec.drug)
            elif mode == "current":
                res = self.history_resource("MedicationStatement", "active", spec.drug)
                res["dosage"] = [
                    {"asNeededBoolean": True} if shape != 1 else {"asNeededCodeableConcept": {"text": "bleeding"}}
                ]
        elif shape == 0:  # nothing on record but a statement entered in error, which does not count
            self.history_resource("MedicationStatement", "entered-in-error", spec.drug)

    def history_resource(self, kind: str, status: str, drug: str) -> dict[str, Any]:
        res: dict[str, Any] = {"resourceType": kind, "id": self.next_id(kind[10:].lower() or "med"), "status": status}
        res["subject"] = self.subject()
        if kind == "MedicationRequest":
            res["intent"] = "order"
            res["authoredOn"] = (self.today - timedelta(days=200)).isoformat()
        if kind == "MedicationAdministration":
            res["effectiveDateTime"] = (self.today - timedelta(days=150)).isoformat()
        self.medication(res, drug)
        self.therapy.append(res)
        return res

    def procedure(self, spec: InputDef, raw: Any) -> None:
        row = self.row(spec.name, "partial" if raw == "partial" else "proof")
        old = False
        if row is None and raw == "partial" and spec.mode == "current":
            row, old = self.row(spec.name, "proof"), True  # done earlier: it only suggests current treatment
        if row is None:
            return
        proc: dict[str, Any] = {
            "resourceType": "Procedure",
            "id": self.next_id("proc"),
            "subject": self.subject(),
            "code": _concept(row),
            "status": "completed",
        }
        shape = self.choose(f"proc:{spec.name}", 3)
        if old:
            proc["performedDateTime"] = (self.today - timedelta(days=30)).isoformat()
        elif shape == 0:
            proc["status"] = "in-progress"
            proc["performedPeriod"] = {"start": (self.today - timedelta(days=3)).isoformat()}
        elif shape == 1:
            proc["performedDateTime"] = (self.today - timedelta(days=1)).isoformat()
        else:
            proc["performedPeriod"] = {"start": (self.today - timedelta(days=5)).isoformat()}
        self.procedures.append(proc)

    def setting(self, spec: InputDef, raw: Any) -> None:
        row = self.row(spec.name, "partial" if raw == "partial" else "proof")
        if row is None:
            return
        enc = self.ensure_encounter()
        if row.system == systems.MEDREQ_CATEGORY:
            self.order.setdefault("category", []).append(_concept(row))
        elif row.system == systems.ACTCODE:
            enc["class"] = _coding(row)
        elif row.system == systems.HSLOC:
            lid = self.next_id("loc")
            self.locations.append({"resourceType": "Location", "id": lid, "type": [_concept(row)]})
            enc.setdefault("location", []).append({"location": {"reference": f"Location/{lid}"}})
        else:
            enc.setdefault("type", []).append(_concept(row))

    def ensure_encounter(self) -> dict[str, Any]:
        if self.encounter is None:
            self.encounter = {
                "resourceType": "Encounter",
                "id": "case-encounter",
                "status": "in-progress",
                "class": {"system": systems.ACTCODE, "code": "AMB", "display": "ambulatory"},
                "subject": self.subject(),
            }
            self.order["encounter"] = {"reference": "Encounter/case-encounter"}
        return self.encounter

    def lab(self, spec: InputDef, raw: Any) -> None:
        row = self.row(spec.name)
        if row is None:
            return
        target = spec.unit or ""
        if isinstance(raw, Mapping):
            value, unit = float(raw["value"]), units.ucum(str(raw.get("unit") or target))
            days_ago, comparator, below = int(raw.get("days_ago", 0)), raw.get("comparator"), raw.get("below_range")
        else:
            value, unit, days_ago, comparator, below = float(raw), target, 0, None, None
        if not comparator and unit in _OTHER_UNIT and self.choose(f"unit:{spec.name}", 3) == 0:
            # the same result in another unit (or spelling) the lab may report: both engines convert it
            other = _OTHER_UNIT[unit]
            value, unit = units.convert(value, unit, other), other
        obs = self.observation(spec, row, days_ago)
        obs["valueQuantity"] = _quantity(value, unit)
        if comparator:
            obs["valueQuantity"]["comparator"] = comparator
        extra = self.choose(f"extra:{spec.name}", 4)
        if extra < 3:
            # another result of the same test: older and higher, older and censored ("<"), or the same day
            older = self.observation(spec, row, days_ago + (0 if extra == 2 else 30))
            older["valueQuantity"] = _quantity(value * 2 if extra != 1 else value / 2, unit)
            if extra == 1:
                older["valueQuantity"]["comparator"] = "<"
        if below is not None:
            shape = self.choose(f"range:{spec.name}", 2)
            if shape == 0:
                obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": "L" if below else "N"}]}]
            else:  # no flag: the reference range says it
                low = value * 2 + 1 if below else max(value / 2, 0.0)
                obs["referenceRange"] = [{"low": _quantity(low, unit)}]

    def lab_code(self, spec: InputDef, raw: Any) -> None:
        row = self.row(spec.name)
        if row is None:
            return
        value, days_ago = (raw.get("value"), int(raw.get("days_ago", 0))) if isinstance(raw, Mapping) else (raw, 0)
        if value not in _QUALITATIVE:
            return
        obs = self.observation(spec, row, days_ago)
        snomed, display, text, flag = _QUALITATIVE[str(value)]
        shape = self.choose(f"qual:{spec.name}", 3)
        if shape == 0:
            obs["valueCodeableConcept"] = {"coding": [{"system": systems.SNOMED, "code": snomed, "display": display}]}
        elif shape == 1:
            obs["valueString"] = f" {text} "
        else:
            obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag}]}]

    def observation(self, spec: InputDef, row: CodeRow, days_ago: int) -> dict[str, Any]:
        when = self.today - timedelta(days=days_ago)
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": self.next_id("obs"),
            "status": ["final", "amended", "corrected"][self.choose(f"status:{spec.name}", 3)],
            "subject": self.subject(),
            "code": _concept(row),
        }
        shape = self.choose(f"when:{spec.name}", 4)
        if shape == 0:
            obs["effectiveDateTime"] = when.isoformat()
        elif shape == 1:
            obs["effectiveDateTime"] = f"{when.isoformat()}T08:30:00Z"
        elif shape == 2:
            obs["effectivePeriod"] = {"start": (when - timedelta(days=1)).isoformat(), "end": when.isoformat()}
        else:
            obs["issued"] = f"{when.isoformat()}T09:00:00Z"
        self.observations.append(obs)
        return obs

    # --- records that must not count ---------------------------------------------------------------------------

    def distractors(self, inputs: list[str], given: Mapping[str, Any]) -> None:
        for name in inputs:
            spec = self.mappings.inputs[name]
            if name in given or self.choose(f"distractor:{name}", 2):
                continue
            row = self.row(name, "proof") if spec.kind == "condition" else self.row(name)
            if row is None:
                continue
            if spec.kind == "condition":
                # resolved or entered in error (neither counts), or refuted (the record says "no")
                status, verification = [("resolved", "confirmed"), ("active", "entered-in-error"), ("", "refuted")][
                    self.choose(f"distractor-kind:{name}", 3)
                ]
                cond = {"resourceType": "Condition", "id": self.next_id("old"), "subject": self.subject()}
                cond["code"] = _concept(row)
                if status:
                    cond["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": status}]}
                cond["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": verification}]}
                self.conditions.append(cond)
            elif spec.kind in ("lab", "lab_code"):
                obs = self.observation(spec, row, 1)
                obs["status"] = "preliminary"
                obs["valueQuantity"] = _quantity(123.0, spec.unit or "1")
            elif spec.kind == "procedure":
                self.procedures.append(
                    {
                        "resourceType": "Procedure",
                        "id": self.next_id("proc"),
                        "status": "not-done",
                        "subject": self.subject(),
                        "code": _concept(row),
                    }
                )


def _product(policy: Policy, name: str | None) -> Product:
    if name is None:
        return policy.products[0]
    return next(p for p in policy.products if p.id == name)


def synthesize(
    policy: Policy, mappings: Mappings, case: Mapping[str, Any], defaults: Mapping[str, Any], inputs: list[str]
) -> Record:
    """The record a case describes. ``inputs``: the inputs the library defines (distractors are added for them)."""
    note = str(case.get("note") or "")
    today = date.fromisoformat(str(case.get("today") or defaults.get("today") or "2026-01-15"))
    product = _product(policy, case.get("product") or defaults.get("product"))
    b = _Builder(policy, product, mappings, f"{policy.id}|{note}", today)
    facts = {**(defaults.get("facts") or {}), **(case.get("facts") or {})}
    b.order = build_order(case.get("order") if "order" in case else defaults.get("order"))
    b.order["subject"] = b.subject()
    b.order["authoredOn"] = today.isoformat()
    if "medicationCodeableConcept" not in b.order and "medicationReference" not in b.order:
        drug = b.row(product.drugs[0])
        if drug is not None:
            b.order["medicationCodeableConcept"] = _concept(drug)
    b.order.setdefault("requester", {"reference": "Practitioner/unknown"})
    for name, raw in sorted(facts.items()):
        spec = mappings.inputs[name]
        if raw is None or raw == "unsearched":
            continue
        if spec.kind == "age":
            b.age(raw)
        elif spec.kind == "condition":
            b.condition(spec, raw)
        elif spec.kind == "order_reason" and raw is not False:
            b.reason(spec, raw)
        elif spec.kind == "specialty" and isinstance(raw, bool):
            b.specialty(spec, raw)
        elif spec.kind == "medication_history":
            b.history(spec, raw)
        elif spec.kind == "procedure":
            b.procedure(spec, raw)
        elif spec.kind == "setting":
            b.setting(spec, raw)
        elif spec.kind == "lab":
            b.lab(spec, raw)
        elif spec.kind == "lab_code":
            b.lab_code(spec, raw)
    for name, raw in sorted((case.get("reason") or {}).items()):
        b.reason(mappings.inputs[name], raw)
    b.distractors(inputs, facts)
    resources: list[dict[str, Any]] = [b.patient, *b.conditions, *b.observations, *b.roles, *b.practitioners]
    resources += [*b.medications, *b.therapy, *b.procedures, *([b.encounter] if b.encounter else []), *b.locations]
    resources.append(b.order)
    data = ClinicalData(
        today=today,
        order=b.order,
        patient=b.patient,
        conditions=tuple(b.conditions),
        observations=tuple(b.observations),
        practitioner_roles=tuple(b.roles),
        practitioners=tuple(b.practitioners),
        medications=tuple(b.medications),
        medication_history=tuple(b.therapy),
        procedures=tuple(b.procedures),
        encounter=b.encounter,
        locations=tuple(b.locations),
        available=SOURCES,
    )
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    return Record(data, bundle, b.order)
