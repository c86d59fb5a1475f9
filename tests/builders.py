"""Small builders for FHIR resources and CDS Hooks requests, so each test states only what it is about."""

from __future__ import annotations

import copy
import uuid
from typing import Any

HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
NUCC = "http://nucc.org/provider-taxonomy"
UCUM = "http://unitsofmeasure.org"
NDC = "http://hl7.org/fhir/sid/ndc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SCT = "http://snomed.info/sct"
COVERAGE_INFO = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"


def bundle(*resources: dict[str, Any], type_: str = "searchset") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": type_,
        "entry": [{"fullUrl": f"http://ehr.test/fhir/{r['resourceType']}/{r['id']}", "resource": r} for r in resources],
    }


def patient(birth: str | None = "1980-04-02", pid: str = "pat-1") -> dict[str, Any]:
    p: dict[str, Any] = {"resourceType": "Patient", "id": pid, "name": [{"family": "Testpatient", "given": ["Casey"]}]}
    if birth:
        p["birthDate"] = birth
    return p


def coverage(payer: str = "cigna", cid: str = "cov-1", **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "resourceType": "Coverage",
        "id": cid,
        "status": "active",
        "subscriberId": "MEMBER-001",
        "beneficiary": {"reference": "Patient/pat-1"},
        "payor": [{"identifier": {"system": "urn:cds:payer-id", "value": payer}}],
    }
    c.update(extra)
    return c


def condition(
    code: str, cid: str | None = None, system: str = ICD10, status: str = "active", verification: str = "confirmed"
) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid or f"cond-{code.replace('.', '')}",
        "subject": {"reference": "Patient/pat-1"},
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": status}]
        },
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]
        },
        "code": {"coding": [{"system": system, "code": code}]},
    }


def observation(
    loinc: str,
    value: float,
    unit: str,
    when: str = "2026-11-01",
    oid: str | None = None,
    comparator: str | None = None,
    status: str = "final",
) -> dict[str, Any]:
    vq: dict[str, Any] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    if comparator:
        vq["comparator"] = comparator
    return {
        "resourceType": "Observation",
        "id": oid or f"obs-{loinc}",
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": "Patient/pat-1"},
        "effectiveDateTime": f"{when}T09:00:00Z",
        "valueQuantity": vq,
    }


def role(specialty: str | None = "207RH0000X", rid: str = "role-1", practitioner: str = "pract-1") -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": rid,
        "practitioner": {"reference": f"Practitioner/{practitioner}"},
    }
    if specialty:
        r["specialty"] = [{"coding": [{"system": NUCC, "code": specialty}]}]
    return r


def practitioner(pid: str = "pract-1") -> dict[str, Any]:
    return {"resourceType": "Practitioner", "id": pid, "name": [{"family": "Prescriber"}]}


def ehr_chart() -> tuple[dict[str, Any], ...]:
    """What the EHR's FHIR server holds for the standard patient, for hooks that query it instead of prefetching:
    acquired hemophilia (D68.311), 70 kg, a hematologist prescribing, Cigna coverage."""
    return (patient(), coverage(), condition("D68.311"), observation("29463-7", 70, "kg"), role(), practitioner())


def med_order(
    code: str = "J7189",
    system: str = HCPCS,
    oid: str = "mr-1",
    dose: float | None = 90,
    dose_unit: str = "ug/kg",
    every_hours: float = 2,
    days: float | None = 3,
    **extra: Any,
) -> dict[str, Any]:
    order: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": oid,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/pat-1"},
        "authoredOn": "2026-11-23",
        "requester": {"reference": "Practitioner/pract-1"},
    }
    if dose is not None:
        repeat: dict[str, Any] = {"frequency": 1, "period": every_hours, "periodUnit": "h"}
        if days is not None:
            repeat["boundsDuration"] = {"value": days, "unit": "d", "system": UCUM, "code": "d"}
        order["dosageInstruction"] = [
            {
                "timing": {"repeat": repeat},
                "doseAndRate": [
                    {"doseQuantity": {"value": dose, "unit": dose_unit, "system": UCUM, "code": dose_unit}}
                ],
            }
        ]
    order.update(extra)
    return order


def hook_request(
    orders: list[dict[str, Any]],
    *,
    hook: str = "order-sign",
    conditions: list[dict[str, Any]] | None = None,
    observations: list[dict[str, Any]] | None = None,
    the_patient: dict[str, Any] | None = None,
    the_coverage: dict[str, Any] | list[dict[str, Any]] | None = None,
    roles: list[dict[str, Any]] | None = None,
    history: list[dict[str, Any]] | None = None,
    prefetch: dict[str, Any] | None = None,
    omit: tuple[str, ...] = (),
    fhir_server: str | None = None,
    configuration: dict[str, Any] | None = None,
    selections: list[str] | None = None,
) -> dict[str, Any]:
    """A complete hook request with full prefetch (keys in ``omit`` left out)."""
    coverages = the_coverage if isinstance(the_coverage, list) else [the_coverage or coverage()]
    full: dict[str, Any] = {
        "patient": the_patient if the_patient is not None else patient(),
        "coverage": bundle(*coverages),
        "user": practitioner(),
        "practitionerRoles": bundle(*(roles if roles is not None else [role()])),
        "conditions": bundle(*(conditions or [])),
        "observations": bundle(*(observations if observations is not None else [observation("29463-7", 70, "kg")])),
        "medicationStatements": bundle(*(history or [])),
        "medicationRequests": bundle(),
        "medicationAdministrations": bundle(),
    }
    full.update(prefetch or {})
    for key in omit:
        full.pop(key, None)
    context: dict[str, Any] = {
        "userId": "Practitioner/pract-1",
        "patientId": "pat-1",
        "draftOrders": bundle(*orders, type_="collection"),
    }
    if hook == "order-select":
        context["selections"] = selections or [f"{o['resourceType']}/{o['id']}" for o in orders]
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context, "prefetch": full}
    if fhir_server:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {
            "access_token": "ehr-token-123",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "payer-cds",
        }
    if configuration is not None:
        body["extension"] = {"davinci-crd.configuration": configuration}
    return copy.deepcopy(body)


def coverage_info(action_resource: dict[str, Any]) -> dict[str, Any]:
    """The sub-extensions of the (single) coverage-information extension as {url: [values]}."""
    exts = [e for e in action_resource.get("extension", []) if e["url"] == COVERAGE_INFO]
    assert len(exts) == 1, exts
    out: dict[str, list[Any]] = {}
    for sub in exts[0]["extension"]:
        value = next(v for k, v in sub.items() if k.startswith("value"))
        out.setdefault(sub["url"], []).append(value)
    return out
