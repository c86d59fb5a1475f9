"""The Da Vinci CRD coverage-information extension, and how a determination maps onto it.

The shape validates under CRD 2.2 and CRD 2.0.1 (what the Inferno test kit checks): ``pa-needed`` is present
whenever ``covered`` is not ``not-covered``, at most one ``doc-needed``, and none of the elements whose shape changed
between the two (``detail``, ``contact``, ``expiry-date``). Every invariant crd-ci-q1…q9 holds by construction and
is checked again by :func:`problems`, which the tests run on every extension the service emits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from cds.constants import COVERAGE_INFO_URL, CRD_TEMP_SYSTEM
from fhir_mappings import systems
from fhir_mappings.loader import Mappings
from policies.model import Product


@dataclass(frozen=True)
class Reason:
    text: str
    code: str | None = None  # a coverageAssertionReasons code (technical, no-member-found ...)

    def as_json(self) -> dict[str, Any]:
        concept: dict[str, Any] = {"text": self.text[:1000]}
        if self.code:
            concept["coding"] = [{"system": CRD_TEMP_SYSTEM, "code": self.code}]
        return concept


@dataclass(frozen=True)
class CoverageInfo:
    coverage: str  # Coverage/{id}
    covered: str
    today: date
    assertion_id: str
    pa_needed: str | None = None
    doc_needed: str | None = None
    doc_purpose: str | None = None
    reasons: tuple[Reason, ...] = ()
    questionnaires: tuple[str, ...] = ()
    billing_codes: tuple[Mapping[str, str], ...] = ()
    satisfied_pa_id: str | None = None
    info_needed: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        ext: list[dict[str, Any]] = [
            {"url": "coverage", "valueReference": {"reference": self.coverage}},
            {"url": "covered", "valueCode": self.covered},
        ]
        if self.pa_needed:
            ext.append({"url": "pa-needed", "valueCode": self.pa_needed})
        if self.doc_needed:
            ext.append({"url": "doc-needed", "valueCode": self.doc_needed})
        if self.doc_purpose:
            ext.append({"url": "doc-purpose", "valueCode": self.doc_purpose})
        ext.extend({"url": "info-needed", "valueCode": c} for c in self.info_needed)
        ext.extend({"url": "billingCode", "valueCoding": dict(c)} for c in self.billing_codes)
        ext.extend({"url": "reason", "valueCodeableConcept": r.as_json()} for r in self.reasons)
        ext.extend({"url": "questionnaire", "valueCanonical": q} for q in self.questionnaires)
        ext.append({"url": "date", "valueDate": self.today.isoformat()})
        ext.append({"url": "coverage-assertion-id", "valueString": self.assertion_id})
        if self.satisfied_pa_id:
            ext.append({"url": "satisfied-pa-id", "valueString": self.satisfied_pa_id})
        return {"url": COVERAGE_INFO_URL, "extension": ext}


def billing_codes(mappings: Mappings, product: Product) -> tuple[Mapping[str, str], ...]:
    """The HCPCS code a claim must carry for the assertion to hold (CRD §resp-30)."""
    for drug in product.drugs:
        for row in mappings.rows_for(drug):
            if row.system == systems.HCPCS:
                return ({"system": row.system, "code": row.code, "display": row.display},)
    return ()


def values(extension: Mapping[str, Any], name: str) -> list[Any]:
    out: list[Any] = []
    for sub in extension.get("extension") or ():
        if isinstance(sub, Mapping) and sub.get("url") == name:
            out.extend(v for k, v in sub.items() if k.startswith("value"))
    return out


def with_coverage_info(resource: Mapping[str, Any], extension: Mapping[str, Any], coverage_ref: str) -> dict[str, Any]:
    """The resource exactly as sent, with its coverage-information for this Coverage replaced by ``extension``."""
    updated = dict(resource)
    kept = [
        e
        for e in resource.get("extension") or ()
        if not (
            isinstance(e, Mapping)
            and e.get("url") == COVERAGE_INFO_URL
            and any(v.get("reference") == coverage_ref for v in values(e, "coverage") if isinstance(v, Mapping))
        )
    ]
    updated["extension"] = [*kept, dict(extension)]
    return updated


def existing(resource: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [e for e in resource.get("extension") or () if isinstance(e, Mapping) and e.get("url") == COVERAGE_INFO_URL]


_SAME = (
    "coverage",
    "covered",
    "pa-needed",
    "doc-needed",
    "doc-purpose",
    "info-needed",
    "questionnaire",
    "satisfied-pa-id",
    "billingCode",
)


def same_assertion(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Do two extensions say the same thing (ignoring the date and the assertion id)?"""
    return all(values(old, name) == values(new, name) for name in _SAME) and [
        r.get("text") for r in values(old, "reason")
    ] == [r.get("text") for r in values(new, "reason")]


def problems(extension: Mapping[str, Any]) -> list[str]:
    """Broken invariants (CRD 2.2 crd-ci-q1…q9, plus CRD 2.0.1's reading of q2). Empty when all hold."""
    out = []
    one = ("coverage", "covered", "date", "coverage-assertion-id")
    for name in one:
        if len(values(extension, name)) != 1:
            out.append(f"{name} must appear exactly once")
    covered = (values(extension, "covered") or [None])[0]
    pa = values(extension, "pa-needed")
    doc = values(extension, "doc-needed")
    purpose = values(extension, "doc-purpose")
    reasons = values(extension, "reason")
    if covered not in ("covered", "not-covered", "conditional", "indeterminate"):
        out.append(f"covered {covered!r} is not in the value set")
    if len(pa) > 1 or len(doc) > 1:
        out.append("pa-needed and doc-needed appear at most once")
    if values(extension, "questionnaire") and not doc:
        out.append("crd-ci-q1: questionnaire without doc-needed")
    if covered == "not-covered" and pa:
        out.append("crd-ci-q2: pa-needed with not-covered")
    if covered != "not-covered" and not pa:
        out.append("crd-ci-q2 (2.0.1): pa-needed missing while covered is not not-covered")
    if "conditional" in [covered, *pa, *doc] and not values(extension, "info-needed"):
        out.append("crd-ci-q3: conditional without info-needed")
    if "satisfied" in pa and "withpa" in purpose:
        out.append("crd-ci-q4: doc-purpose withpa with pa-needed satisfied")
    if ("satisfied" in pa) != bool(values(extension, "satisfied-pa-id")):
        out.append("crd-ci-q5: satisfied-pa-id iff pa-needed satisfied")
    if "OTH" in values(extension, "info-needed") and not reasons:
        out.append("crd-ci-q6: info-needed OTH without reason")
    for r in reasons:
        if not r.get("text") and not r.get("coding"):
            out.append("crd-ci-q7: a reason needs text or a code")
    if purpose and not reasons:
        out.append("crd-ci-q8: doc-purpose without reason")
    if "indeterminate" in [covered, *pa, *doc] and not reasons:
        out.append("crd-ci-q9: indeterminate without reason")
    return out


def first_text(items: Sequence[str], limit: int = 3) -> str:
    shown = list(items[:limit])
    more = len(items) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
