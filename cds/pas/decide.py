"""What the policy settles for each item of a PAS request, without HTTP and without storing the request.

An item's drug is read from ``item.productOrService`` (HCPCS / NDC through the mappings) and the MedicationRequest
its ``requestedService`` names. The order carries the CRD assertion this service made at order-sign (its
coverage-information extension, ``coverage-assertion-id``); the policy is evaluated again on the record that
assertion was made on plus the DTR answers the Claim carries in ``supportingInfo`` (a QuestionnaireResponse or a DTR
QuestionnaireResponse Bundle, read against the form it names), or those a DTR submission already settled it with
(:func:`cds.dtr.service.determine`). Met: **A1**, with the authorization a satisfied CRD assertion issued (the same
reuse key, :func:`cds.authorizations.issue`). Everything else is **A4** pended for a reviewer, with the criteria still
open or failed: the service never denies (A3) or modifies (A6) on its own.

The only thing stored here is an authorization that is issued (before the response is sent, as CRD does).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Any

from cds import authorizations, constants
from cds.crd.assess import drug_inputs
from cds.dtr import answers
from cds.dtr import service as dtr
from cds.errors import ClientError
from cds.pas.bundle import REQUESTED_SERVICE, Checked, codes, extension, is_cancelled
from cds.runtime import Runtime
from cds.store import AssertionRecord
from fhir_mappings.extract import ClinicalData, FactFinder, medication_codings
from policies import explain
from policies.engine import Decision, Determination, evaluate
from policies.model import Policy, Product

CERTIFIED, PENDED, DENIED, MODIFIED, CANCELLED = "A1", "A4", "A3", "A6", "C"
MAX_REASONS = 12


def _reason(text: str, code: str = "") -> dict[str, str]:
    return {"code": code, "text": text}


def _rows(det: Determination) -> list[dict[str, Any]]:
    return [
        {"id": r.id, "text": r.text, "state": r.state.value, "evidence": list(r.evidence), "note": r.note}
        for r in explain.rows(det)
    ]


def _open_reasons(det: Determination) -> list[dict[str, str]]:
    out = []
    for r in explain.rows(det):
        if r.state.value != "met":
            note = f"; {r.note}" if r.note else ""
            out.append(_reason(f"{r.id} {r.text} ({r.state.value}{note})", r.id))
    if det.decision is Decision.DOSE_REVIEW:
        for d in det.doses:
            if d.state.value == "not-met":
                out.append(_reason(f"{d.id}: the dose exceeds the policy limit ({explain.shown(d.note)})", d.id))
    return out[:MAX_REASONS]


def _assertion_id(order: Mapping[str, Any]) -> str | None:
    info = extension(order, constants.COVERAGE_INFO_URL)
    for part in (info or {}).get("extension") or ():
        if isinstance(part, Mapping) and part.get("url") == "coverage-assertion-id" and part.get("valueString"):
            return str(part["valueString"])
    return None


def supporting(checked: Checked) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The DTR responses (reference, QuestionnaireResponse) and the other documents the Claim's supportingInfo
    points to."""
    responses: list[tuple[str, dict[str, Any]]] = []
    documents: list[str] = []
    for info in checked.claim.get("supportingInfo") or ():
        ref = info.get("valueReference") if isinstance(info, Mapping) else None
        found = checked.entry(ref)
        if found is None:
            continue
        url, resource = found
        if resource.get("resourceType") in ("QuestionnaireResponse", "Bundle"):
            try:
                responses.append((url, dtr.the_response(resource)))
                continue
            except ClientError:
                pass
        documents.append(str((ref or {}).get("reference") or url))
    return responses, documents


def _documents_answer(rt: Runtime, record: AssertionRecord, qr: Mapping[str, Any]) -> bool:
    try:
        return dtr.assertion_id_of(rt, qr) == record.assertion_id
    except ClientError:
        return bool(record.questionnaire) and qr.get("questionnaire") == record.questionnaire


def _answers(
    rt: Runtime, record: AssertionRecord, patient: str, carried: list[tuple[str, dict[str, Any]]]
) -> tuple[dict[str, Any], str, list[dict[str, str]]]:
    """The answers for an assertion: those a carried response gives, else those DTR settled it with. Returns the
    values (attestation removed), their source and the problems that kept a response from counting."""
    problems: list[dict[str, str]] = []
    candidates = [(url, qr) for url, qr in carried if _documents_answer(rt, record, qr)]
    if not candidates:
        stored = rt.store.responses_for(record.assertion_id)
        candidates = [(f"QuestionnaireResponse/{record.assertion_id}", s["resource"]) for s in stored[-1:]]
    for url, qr in reversed(candidates):
        if qr.get("status") not in dtr.DONE_STATUSES:
            problems.append(_reason(f"{url}: the QuestionnaireResponse is not completed"))
            continue
        if not dtr._same_patient(qr.get("subject"), patient):
            problems.append(_reason(f"{url}: the QuestionnaireResponse is about another patient"))
            continue
        try:
            form = dtr.questionnaire_of(rt, str(qr.get("questionnaire") or ""))
            author = qr.get("author") if isinstance(qr.get("author"), Mapping) else {}
            read = answers.read(form, qr, record.draft_response or {}, author=(author or {}).get("reference"))
        except ClientError as exc:
            problems.append(_reason(f"{url}: {exc.message}"))
            continue
        if read.values.pop(constants.ATTESTATION_LINK, None) is not True:
            problems.append(_reason(f"{url}: the form is not signed (attestation)"))
            continue
        return read.values, url, problems
    return {}, "", problems


def _drug(
    rt: Runtime, checked: Checked, item: Mapping[str, Any]
) -> tuple[Mapping[str, Any] | None, tuple[Policy, Product] | None, str]:
    """The requested MedicationRequest, the policy and product for the item's drug, and a label for it."""
    service = extension(item, REQUESTED_SERVICE)
    order = checked.resolve((service or {}).get("valueReference"))
    codings = [c for c in (item.get("productOrService") or {}).get("coding") or () if isinstance(c, Mapping)]
    medication: Mapping[str, Any] | None = None
    if order is not None and order.get("resourceType") == "MedicationRequest":
        medication = order
        meds = [checked.resolve(order.get("medicationReference"))] if order.get("medicationReference") else []
        codings += medication_codings(order, [m for m in meds if m], rt.mappings.product_names)
    label = ", ".join(codes(item.get("productOrService"))) or "item"
    inputs = drug_inputs(rt, codings)
    match = rt.policies.find(checked.payer.policies, inputs) if inputs else None
    if match is not None:
        label = f"{match[1].title} ({label})"
    return medication, match, label


def item_states(rt: Runtime, checked: Checked, *, today: date | None = None) -> list[dict[str, Any]]:
    """One state per Claim item (JSON-ready; stored in the request's explanation and rendered by
    :mod:`cds.pas.response`): sequence, code (A1 / A4 / C), reasons, criteria rows, PA and period."""
    day = today or rt.clock().date()
    carried, documents = supporting(checked)
    patient = str((checked.claim.get("patient") or {}).get("reference") or "")
    out = []
    for item in checked.claim.get("item") or ():
        state = decide_item(rt, checked, item, carried, patient, day)
        state["documents"] = documents
        out.append(state)
    return out


def decide_item(
    rt: Runtime,
    checked: Checked,
    item: Mapping[str, Any],
    carried: list[tuple[str, dict[str, Any]]],
    patient: str,
    today: date,
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "sequence": item["sequence"],
        "code": PENDED,
        "reasons": [],
        "criteria": [],
        "policy": "",
        "product": "",
        "drug": "",
        "assertion_id": None,
        "answers": "",
        "pa_id": None,
        "period": None,
        "doses": None,
        "decision": "",
    }
    if is_cancelled(item) or is_cancelled(checked.claim):
        state.update(code=CANCELLED, reasons=[_reason("Cancelled at the submitter's request (certificationType 3)")])
        return state
    order, match, label = _drug(rt, checked, item)
    state["drug"] = label
    if match is None:
        state["reasons"] = [
            _reason(f"No {checked.payer.name} drug policy settles {label} automatically; pended for clinical review")
        ]
        return state
    policy, product = match
    state.update(policy=policy.ref, product=product.id)
    assertion_id = _assertion_id(order) if order is not None else None
    record = rt.store.assertion(assertion_id) if assertion_id else None
    if record is None or record.payer_id != checked.payer.id or record.product != product.id:
        det = evaluate(
            policy,
            product,
            rt.mappings,
            FactFinder(rt.mappings, ClinicalData(today=today, order=order or {})),
            order or {},
            today,
        )
        why = (
            "the order carries no coverage assertion of this service"
            if record is None
            else "the order's coverage assertion is for another payer or drug"
        )
        state.update(
            criteria=_rows(det),
            decision=det.decision.value,
            reasons=[_reason(f"{policy.ref}: {why} (CRD order-sign); pended for clinical review"), *_open_reasons(det)],
        )
        return state
    state["assertion_id"] = record.assertion_id
    try:
        kept = dtr.record_of(rt, record, today)
        values, source, problems = _answers(rt, record, kept.patient, carried)
        det = dtr.determine(rt, record, kept, values, source=source or "record", today=today)
    except ClientError as exc:  # the assertion's record or policy version is gone: a reviewer decides
        state["reasons"] = [_reason(f"{policy.ref}: {exc.message}; pended for clinical review")]
        return state
    state.update(criteria=_rows(det), decision=det.decision.value, answers=source)
    if det.decision is Decision.APPROVED:
        pa = authorizations.issue(rt, det, record.payer_id, record.patient_key, record.assertion_id)
        state.update(
            code=CERTIFIED,
            pa_id=pa.pa_id,
            period={"start": pa.valid_from.isoformat(), **({"end": pa.valid_to.isoformat()} if pa.valid_to else {})},
            doses=pa.doses,
            reasons=[
                _reason(
                    f"{policy.ref}: every criterion met; prior authorization {pa.pa_id} {authorizations.until(pa)} "
                    f"({product.authorization.id})"
                )
            ],
        )
        return state
    headline = {
        Decision.NOT_COVERED: f"a criterion is not met ({explain.failed_text(det)})",
        Decision.DOCUMENTATION: "the criteria are met and the policy asks for clinical review of the documentation",
        Decision.DOSE_REVIEW: "the dose exceeds the policy limit",
        Decision.REVIEW: "a use the policy sends to its off-label review",
    }.get(det.decision, "criteria are still open")
    state["reasons"] = [
        _reason(f"{policy.ref}: {headline}; pended for clinical review"),
        *problems,
        *_open_reasons(det),
    ][:MAX_REASONS]
    return state
