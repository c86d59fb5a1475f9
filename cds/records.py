"""The record an assertion was made on, kept with it so that answers can settle it later.

A coverage assertion rests on what the EHR showed at order-sign (prefetch or queries). When the clinician answers
the DTR form days later, or the PA request arrives, the policy is evaluated again on that same record plus the
answers (the record is not read from the EHR again: DTR and PAS calls carry no EHR access). The snapshot is the
:class:`~fhir_mappings.extract.ClinicalData` of the order without its date, with the other draft orders of the same
product signed with it; it holds patient data and lives in the store only (never in logs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import date
from typing import Any

from fhir_mappings.extract import ClinicalData

VERSION = 1
_TUPLES = frozenset(
    {"conditions", "observations", "practitioner_roles", "practitioners", "medications", "medication_history"}
    | {"procedures", "locations"}
)


@dataclass(frozen=True)
class Record:
    clinical: ClinicalData
    companions: tuple[Mapping[str, Any], ...]
    patient: str  # Patient/{id} as the EHR named it (context.patientId)
    coverage: str  # Coverage/{id}

    @property
    def order(self) -> Mapping[str, Any]:
        return self.clinical.order


def snapshot(
    clinical: ClinicalData, companions: Sequence[Mapping[str, Any]], *, patient: str, coverage: str
) -> dict[str, Any]:
    out: dict[str, Any] = {"version": VERSION, "patient_ref": patient, "coverage_ref": coverage}
    for f in fields(clinical):
        if f.name == "today":
            continue
        value = getattr(clinical, f.name)
        out[f.name] = sorted(value) if f.name == "available" else list(value) if f.name in _TUPLES else value
    out["companions"] = list(companions)
    return out


def restore(raw: Mapping[str, Any], today: date) -> Record:
    """The record as it was at order-sign, evaluated as of ``today``."""
    values: dict[str, Any] = {"today": today}
    for f in fields(ClinicalData):
        if f.name == "today" or f.name not in raw:
            continue
        value = raw[f.name]
        values[f.name] = frozenset(value) if f.name == "available" else tuple(value) if f.name in _TUPLES else value
    return Record(
        clinical=ClinicalData(**values),
        companions=tuple(raw.get("companions") or ()),
        patient=str(raw.get("patient_ref") or ""),
        coverage=str(raw.get("coverage_ref") or ""),
    )
