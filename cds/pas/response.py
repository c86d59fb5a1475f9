"""The PAS response Bundle (PAS 2.2.1 §2.3): a collection whose first entry is the ClaimResponse, followed by every
resource it references (transitively, each once, with the request's fullUrl: §spec-31/33).

Each Claim item comes back under its ``itemSequence`` (§spec-34/46) with an adjudication of category ``submitted``
whose ``extension-reviewAction`` carries the X12 306 code in the separate ``extension-reviewActionCode`` extension
(its full URL; dtr-pas.md gotcha 3). A1 items carry the PA number (``reviewAction.number``, and
``ClaimResponse.preAuthRef``) and ``itemPreAuthPeriod``; A4 items carry the open criteria as ``reasonCode`` and in
``processNote``; an A6 item has what was authorized in ``addItem`` linked by ``itemSequence`` (§spec-36/37).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from cds import constants
from cds.pas.bundle import PAS, Checked, is_cancelled
from cds.runtime import Runtime

X12_306 = "https://codesystem.x12.org/005010/306"
REVIEW_ACTION = PAS + "extension-reviewAction"
REVIEW_ACTION_CODE = PAS + "extension-reviewActionCode"
ITEM_PERIOD = PAS + "extension-itemPreAuthPeriod"
ITEM_ISSUE_DATE = PAS + "extension-itemPreAuthIssueDate"
RESPONSE_BUNDLE_PROFILE = PAS + "profile-pas-response-bundle"
CLAIM_RESPONSE_PROFILE = PAS + "profile-claimresponse"
INQUIRY_BUNDLE_PROFILE = PAS + "profile-pas-inquiry-response-bundle"
INQUIRY_RESPONSE_PROFILE = PAS + "profile-claiminquiryresponse"
ADJUDICATION = "http://terminology.hl7.org/CodeSystem/adjudication"
DISPLAY = {"A1": "Certified in total", "A3": "Not Certified", "A4": "Pended", "A6": "Modified", "C": "Cancelled"}


def _review_action(rt: Runtime, state: Mapping[str, Any], code: str | None = None) -> dict[str, Any]:
    code = code or str(state["code"])
    parts: list[dict[str, Any]] = [
        {
            "url": REVIEW_ACTION_CODE,
            "valueCodeableConcept": {"coding": [{"system": X12_306, "code": code, "display": DISPLAY[code]}]},
        }
    ]
    if state.get("pa_id") and code in ("A1", "A6"):
        parts.append({"url": "number", "valueString": state["pa_id"]})
    if code in ("A3", "A4", "A6"):
        system = rt.base_url + constants.CRITERIA_SYSTEM_PATH
        for reason in state.get("reasons") or ():
            if reason.get("code"):
                parts.append(
                    {
                        "url": "reasonCode",
                        "valueCodeableConcept": {
                            "coding": [{"system": system, "code": reason["code"]}],
                            "text": reason["text"],
                        },
                    }
                )
    return {"url": REVIEW_ACTION, "extension": parts}


def _adjudication(rt: Runtime, state: Mapping[str, Any], code: str | None = None) -> list[dict[str, Any]]:
    return [
        {
            "extension": [_review_action(rt, state, code)],
            "category": {"coding": [{"system": ADJUDICATION, "code": "submitted"}]},
        }
    ]


def _period_extensions(state: Mapping[str, Any], issued: str) -> list[dict[str, Any]]:
    if not state.get("period"):
        return []
    return [
        {"url": ITEM_ISSUE_DATE, "valueDate": issued},
        {"url": ITEM_PERIOD, "valuePeriod": dict(state["period"])},
    ]


def claim_response(
    rt: Runtime, checked: Checked, items: Sequence[Mapping[str, Any]], *, response_id: str, created: datetime
) -> dict[str, Any]:
    claim = checked.claim
    issued = created.date().isoformat()
    request_ref: dict[str, Any] = {}
    ident = next((i for i in claim.get("identifier") or () if isinstance(i, Mapping) and i.get("value")), None)
    if ident is not None:
        request_ref["identifier"] = dict(ident)
    else:
        request_ref["extension"] = [
            {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "not-applicable"}
        ]
    out: dict[str, Any] = {
        "resourceType": "ClaimResponse",
        "id": response_id,
        "meta": {"profile": [CLAIM_RESPONSE_PROFILE]},
        "identifier": [{"system": rt.base_url + "/fhir/ClaimResponse", "value": response_id}],
        "status": "active",
        "type": claim.get("type")
        or {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "preauthorization",
        "patient": dict(claim["patient"]),
        "created": created.isoformat(timespec="seconds"),
        "insurer": dict(claim["insurer"]),
        "requestor": dict(claim["provider"]),
        "request": request_ref,
        "outcome": "complete",
    }
    approved = [s for s in items if s.get("code") in ("A1", "A6") and s.get("pa_id")]
    if approved:
        out["preAuthRef"] = approved[0]["pa_id"]
        if approved[0].get("period"):
            out["preAuthPeriod"] = dict(approved[0]["period"])
    notes: list[dict[str, Any]] = []
    for state in items:
        for reason in state.get("reasons") or ():
            notes.append(
                {"number": len(notes) + 1, "type": "display", "text": f"Item {state['sequence']}: {reason['text']}"}
            )
    if not items and is_cancelled(claim):
        notes.append({"number": 1, "type": "display", "text": "The request is cancelled at the submitter's request"})
    if notes:
        out["processNote"] = notes
    if items:
        out["item"] = [
            {
                **({"extension": _period_extensions(s, issued)} if s.get("code") == "A1" else {}),
                "itemSequence": s["sequence"],
                "adjudication": _adjudication(rt, s),
            }
            for s in items
        ]
    added = [s for s in items if s.get("code") == "A6" and s.get("added")]
    if added:
        out["addItem"] = [
            {
                "extension": _period_extensions(s, issued),
                "itemSequence": [s["sequence"]],
                "productOrService": dict(s["added"]["productOrService"]),
                **({"quantity": dict(s["added"]["quantity"])} if s["added"].get("quantity") else {}),
                "adjudication": _adjudication(rt, s, "A1"),
            }
            for s in added
        ]
    return out


def response_bundle(
    rt: Runtime,
    checked: Checked,
    items: Sequence[Mapping[str, Any]],
    *,
    response_id: str,
    created: datetime,
    bundle_id: str,
) -> dict[str, Any]:
    """The PAS response Bundle: the ClaimResponse first, then what it references (as the request gave them)."""
    cr = claim_response(rt, checked, items, response_id=response_id, created=created)
    claim = checked.claim
    included = checked.closure(claim.get("patient"), claim.get("insurer"), claim.get("provider"))
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"profile": [RESPONSE_BUNDLE_PROFILE]},
        "identifier": {"system": rt.base_url + "/fhir/Bundle", "value": bundle_id},
        "type": "collection",
        "timestamp": created.isoformat(timespec="seconds"),
        "entry": [
            {"fullUrl": f"{rt.base_url}/fhir/ClaimResponse/{response_id}", "resource": cr},
            *({"fullUrl": url, "resource": dict(resource)} for url, resource in included),
        ],
    }


def inquiry_bundle(rt: Runtime, stored: Mapping[str, Any], *, bundle_id: str, now: datetime) -> dict[str, Any]:
    """A PAS inquiry response Bundle with the current ClaimResponse of a stored response Bundle (and what it
    references), the ClaimResponse marked as the inquiry response profile."""
    entries = [dict(e) for e in stored.get("entry") or ()]
    if entries:
        cr = dict(entries[0]["resource"])
        cr["meta"] = {"profile": [INQUIRY_RESPONSE_PROFILE]}
        entries[0] = {**entries[0], "resource": cr}
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"profile": [INQUIRY_BUNDLE_PROFILE]},
        "identifier": {"system": rt.base_url + "/fhir/Bundle", "value": bundle_id},
        "type": "collection",
        "timestamp": now.isoformat(timespec="seconds"),
        "entry": entries,
    }
