"""PAS, free of HTTP: submit (new requests, updates, cancellation), inquire, and the reviewer's queue and decisions.

A submission is checked (:mod:`cds.pas.bundle`), each item decided (:mod:`cds.pas.decide`), the response Bundle built
(:mod:`cds.pas.response`) and stored with the request before it is answered (:mod:`cds.pas.store`). A retry of the
same ``Bundle.identifier`` by the same submitter is answered with the stored response and creates nothing. A Claim
update (``related.claim`` → the prior Claim, carried in the Bundle) is a request of its own that supersedes the prior
one: each item is matched by sequence, an unchanged decided item keeps its decision, certificationType 3 cancels an
item (or, on the Claim, the whole request) and revokes the authorization the prior request gave it, anything else is
decided again. A denied or cancelled request cannot be updated (PAS Additional Notes 2).

The reviewer's decision (approve A1 / modify A6 / deny A3) is recorded with the new response, the decision row, its
audit event, the authorization it grants and the notification to the submitter (``cds.pas.notify.enqueue``) in one
transaction. The authorization is a new one with the reviewer's period: one active before under the same reuse key
(payer, patient, product, policy|version) is superseded, so that CRD and DTR answer with what the reviewer granted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

from cds import authorizations, metrics
from cds.errors import BusinessRule, Conflict, InvalidRequest, NotFound
from cds.pas import bundle, inquiry, notify, response
from cds.pas import decide as rules
from cds.pas import store as pas_store
from cds.pas.bundle import Checked, identifier_key, is_cancelled
from cds.runtime import Runtime
from cds.store import PriorAuth

EXPEDITED_DUE = timedelta(hours=72)  # CMS-0057-F
STANDARD_DUE = timedelta(days=7)
UNAUTHENTICATED = "unauthenticated"
ACTIONS = {"approve": rules.CERTIFIED, "modify": rules.MODIFIED, "deny": rules.DENIED}
KEPT_ON_UPDATE = (rules.CERTIFIED, rules.DENIED, rules.MODIFIED)


def status_of(items: Sequence[Mapping[str, Any]], *, cancelled: bool = False) -> str:
    """pended | certified | denied | modified | cancelled | partial, from the items' review actions."""
    found = {str(s["code"]) for s in items} - {rules.CANCELLED}
    if cancelled or not found:
        return "cancelled"
    if rules.PENDED in found:
        return "partial" if found - {rules.PENDED} else "pended"
    if found == {rules.CERTIFIED}:
        return "certified"
    if found == {rules.DENIED}:
        return "denied"
    return "modified" if found <= {rules.MODIFIED, rules.CERTIFIED} else "partial"


def _changed(item: Mapping[str, Any]) -> bool:
    ext = bundle.extension(item, bundle.INFO_CHANGED)
    return ext is not None and ext.get("valueCode") in ("changed", "added")


def _items(rt: Runtime, checked: Checked, prior: Mapping[str, Any] | None, today: date) -> list[dict[str, Any]]:
    carried, documents = rules.supporting(checked)
    patient = str((checked.claim.get("patient") or {}).get("reference") or "")
    before = {s["sequence"]: s for s in (prior or {}).get("explanation", {}).get("items", ())}
    out = []
    for item in checked.claim.get("item") or ():
        was = before.get(item["sequence"])
        if was is not None and was["code"] in KEPT_ON_UPDATE and not _changed(item) and not is_cancelled(item):
            state = dict(was)
        else:
            state = rules.decide_item(rt, checked, item, carried, patient, today)
        state["documents"] = documents
        out.append(state)
    return out


def _cancel_authorizations(
    prior: Mapping[str, Any] | None, claim: Mapping[str, Any], items: list[dict[str, Any]]
) -> list[str]:
    """The authorizations that an update cancels: those the prior request's items carry where the update cancels
    the item (certificationType 3) or the whole request. Each cancelled item's reasons say so."""
    if prior is None:
        return []
    whole = is_cancelled(claim)
    now = {s["sequence"]: s for s in items}
    out = []
    for was in prior["explanation"]["items"]:
        pa_id, state = was.get("pa_id"), now.get(was["sequence"])
        if not pa_id or not (whole or (state is not None and state["code"] == rules.CANCELLED)):
            continue
        out.append(str(pa_id))
        if state is not None:
            state["reasons"] = [*state["reasons"], {"code": "", "text": f"Prior authorization {pa_id} is cancelled"}]
    return out


def _patient_key(rt: Runtime, checked: Checked, items: Sequence[Mapping[str, Any]], member: str) -> str:
    for state in items:
        found = rt.store.assertion(str(state["assertion_id"])) if state.get("assertion_id") else None
        if found is not None:
            return found.patient_key
    basis = f"pas-member-v1|{checked.payer.id}|{member}"
    return hashlib.sha256(basis.encode()).hexdigest()[:40]


def submit(rt: Runtime, body: Any, *, submitter: str | None) -> tuple[dict[str, Any], bool]:
    """The response Bundle for a PAS request Bundle, and whether this call stored it (False: the stored response of
    an earlier submission of the same Bundle.identifier by the same submitter). Raises a 4xx ClientError for a
    Bundle that cannot be processed, or an update of a request that cannot be updated."""
    who = submitter or UNAUTHENTICATED
    checked = bundle.check(rt, body)
    found = pas_store.by_key(rt, who, checked.bundle_key)
    if found is not None:
        return found["response"], False
    now = rt.clock()
    prior: dict[str, Any] | None = None
    if checked.prior_claim is not None:
        prior_key = identifier_key(checked.prior_claim) or ""
        prior = pas_store.current_for_claim(rt, who, prior_key)
        if prior is None:
            raise BusinessRule(
                "The prior Claim of this update is not a current request of this submitter; send a new request",
                expression="Claim.related.claim",
            )
        if prior["status"] in ("denied", "cancelled"):
            raise BusinessRule(
                f"The request this update names is {prior['status']} and cannot be updated; send a new request",
                expression="Claim.related.claim",
            )
    items = _items(rt, checked, prior, now.date())
    revoke = _cancel_authorizations(prior, checked.claim, items)
    member = bundle.member_id(checked)
    request_id, bundle_id = rt.new_id(), rt.new_id()
    out = response.response_bundle(rt, checked, items, response_id=request_id, created=now, bundle_id=bundle_id)
    fast = bundle.expedited(checked.claim)
    status = status_of(items, cancelled=is_cancelled(checked.claim))
    drugs = sorted({str(s["drug"]) for s in items if s.get("drug")})
    policies = sorted({str(s["policy"]) for s in items if s.get("policy")})
    values = {
        "id": request_id,
        "submitter": who,
        "bundle_key": checked.bundle_key,
        "claim_key": checked.claim_key,
        "patient_key": _patient_key(rt, checked, items, member),
        "payer_id": checked.payer.id,
        "member_id": member,
        "provider_key": bundle.provider_key(checked),
        "org_identifier": bundle.org_identifier(checked),
        "status": status,
        "priority": "expedited" if fast else "standard",
        "drug": "; ".join(drugs)[:256],
        "policy": "; ".join(policies)[:128],
        "received_at": now,
        "due_at": now + (EXPEDITED_DUE if fast else STANDARD_DUE),
        "updated_at": now,
        "related_to": prior["id"] if prior else None,
        "request": dict(body),
        "response": out,
        "explanation": {"claim": checked.claim_url, "items": items},
    }
    detail = {"bundle": checked.bundle_key, "status": status, "items": [[s["sequence"], s["code"]] for s in items]}
    stored, created = pas_store.insert_or_get(
        rt, values, audit_detail=detail, supersedes=prior["id"] if prior else None, revoke=revoke
    )
    if created:
        metrics.pas_decided(items)
    return stored["response"], created


def inquire(rt: Runtime, body: Any, *, submitter: str | None) -> dict[str, Any]:
    """Parameters with one ``return`` inquiry response Bundle per current request matching the inquiry's patient
    (member id), requesting provider and payer (PAS "Prior Authorization Inquiries", §spec-53) and its items' services
    and authorization numbers (:mod:`cds.pas.inquiry`); none matching is a Parameters without ``return``."""
    checked = bundle.check(rt, body, inquiry=True)
    member, provider = bundle.member_id(checked), bundle.provider_key(checked)
    if not member:
        raise InvalidRequest(
            "An inquiry names the patient's member id (Coverage or Patient)", expression="Claim.patient"
        )
    if not provider:
        raise InvalidRequest("An inquiry names the requesting provider's identifier", expression="Claim.provider")
    now = rt.clock()
    wanted = inquiry.examples(checked.claim)
    found = [r for r in pas_store.matching(rt, checked.payer.id, member, provider) if inquiry.matches(wanted, r)]
    pas_store.record_audit(
        rt,
        kind="inquire",
        actor=submitter or UNAUTHENTICATED,
        subject=None,
        at=now,
        detail={"bundle": checked.bundle_key, "matched": [r["id"] for r in found]},
    )
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "return", "resource": response.inquiry_bundle(rt, r["response"], bundle_id=rt.new_id(), now=now)}
            for r in found
        ],
    }


# --- the reviewer's side ------------------------------------------------------------------------------------------


def _overdue(rt: Runtime, row: Mapping[str, Any]) -> bool:
    due: datetime = row["due_at"]
    return bool(rt.clock() > due)


def pended(rt: Runtime) -> list[dict[str, Any]]:
    """The requests waiting for a reviewer (pended or partly pended), soonest due first."""
    return [
        {
            "id": r["id"],
            "status": r["status"],
            "received_at": r["received_at"],
            "due_at": r["due_at"],
            "priority": r["priority"],
            "drug": r["drug"],
            "policy": r["policy"],
            "overdue": _overdue(rt, r),
        }
        for r in pas_store.open_requests(rt)
    ]


def _submitted(row: Mapping[str, Any], refs: list[str]) -> list[dict[str, Any]]:
    urls = {e.get("fullUrl"): e.get("resource") for e in row["request"].get("entry") or ()}
    by_type = {f"{r.get('resourceType')}/{r.get('id')}": r for r in urls.values() if isinstance(r, Mapping)}
    return [{"reference": ref, "resource": urls.get(ref) or by_type.get(ref)} for ref in refs]


def request_view(rt: Runtime, request_id: str) -> dict[str, Any]:
    """A request as the reviewer reads it: each item with its decision, the explanation criterion by criterion
    (state, evidence, note), the submitted answers and documents, and the decisions made so far."""
    row = pas_store.get(rt, request_id)
    if row is None:
        raise NotFound(f"No PAS request '{request_id[:64]}' is known here")
    items = row["explanation"]["items"]
    answers = sorted({str(s["answers"]) for s in items if s.get("answers")})
    documents = sorted({d for s in items for d in s.get("documents") or ()})
    return {
        "id": row["id"],
        "status": row["status"],
        "priority": row["priority"],
        "received_at": row["received_at"],
        "due_at": row["due_at"],
        "overdue": _overdue(rt, row),
        "drug": row["drug"],
        "policy": row["policy"],
        "org_identifier": row["org_identifier"],
        "related_to": row["related_to"],
        "superseded_by": row["superseded_by"],
        "items": items,
        "answers": _submitted(row, answers),
        "documents": _submitted(row, documents),
        "decisions": pas_store.decisions_for(rt, request_id),
        "response": row["response"],
    }


def _period_end(value: Any) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise InvalidRequest("period_end is a date (YYYY-MM-DD)", expression="period_end") from None


def _default_end(rt: Runtime, state: Mapping[str, Any], today: date) -> date | None:
    pid = str(state.get("policy") or "").partition("|")[0]
    policy = rt.policies.policies.get(pid)
    product = next((p for p in policy.products if p.id == state.get("product")), None) if policy else None
    if product is None:
        return None
    auth = product.authorization
    if auth.days:
        return today + timedelta(days=auth.days - 1)
    return authorizations.add_months(today, auth.initial_months) if auth.initial_months else None


def _reuse_product(state: Mapping[str, Any], request_id: str) -> str:
    """The product part of an authorization's reuse key: the policy's product, or for a drug no policy covers its
    submitted codes (hashed to fit), or this request's item when it has none."""
    if state.get("product"):
        return str(state["product"])
    label = str(state.get("drug") or "")
    basis = f"codes|{label}" if label and label != "item" else f"item|{request_id}|{state['sequence']}"
    return "pas:" + hashlib.sha256(basis.encode()).hexdigest()[:40]


def _candidate(
    rt: Runtime, row: Mapping[str, Any], state: Mapping[str, Any], end: date | None, today: date
) -> PriorAuth:
    return PriorAuth(
        rt.new_pa_id(),
        str(state.get("assertion_id") or f"pas:{row['id']}"),
        str(row["payer_id"]),
        str(row["patient_key"]),
        _reuse_product(state, str(row["id"])),
        str(state.get("policy") or ""),
        today,
        end,
        None,
    )


def _key(pa: PriorAuth) -> tuple[str, str, str, str]:
    return pa.payer_id, pa.patient_key, pa.product, pa.policy


def decide(
    rt: Runtime,
    request_id: str,
    *,
    action: str,
    reviewer: str,
    reason: str | None = None,
    period_end: date | str | None = None,
    quantity: float | None = None,
) -> dict[str, Any]:
    """A reviewer's decision on every pended item of a request: approve → A1 (with the period), modify → A6 with
    what was authorized in addItem (quantity or period), deny → A3 (reason required). Returns the new response
    Bundle; stores it, the decision (who, when), the authorization granted (superseding the one active under its
    reuse key), their audit events and the notification in one transaction."""
    if action not in ACTIONS:
        raise InvalidRequest("action is approve, modify or deny", expression="action")
    if not reviewer:
        raise InvalidRequest("the reviewer is named", expression="reviewer")
    if action == "deny" and not (reason or "").strip():
        raise InvalidRequest("a denial gives its reason", expression="reason")
    end = _period_end(period_end)
    if action == "modify" and quantity is None and end is None:
        raise InvalidRequest("a modification authorizes a quantity or a period", expression="quantity")
    if quantity is not None and (isinstance(quantity, bool) or not isinstance(quantity, int | float) or quantity <= 0):
        raise InvalidRequest("quantity is a positive number", expression="quantity")
    row = pas_store.get(rt, request_id)
    if row is None:
        raise NotFound(f"No PAS request '{request_id[:64]}' is known here")
    if row["status"] not in pas_store.OPEN or row["superseded_by"]:
        raise Conflict(
            f"The request is {row['status'] if not row['superseded_by'] else 'superseded'}; nothing is pended"
        )
    now = rt.clock()
    today = now.date()
    checked = bundle.check(rt, row["request"])
    claim_items = {i["sequence"]: i for i in checked.claim.get("item") or ()}
    granted: dict[tuple[str, str, str, str], PriorAuth] = {}  # one authorization per reuse key in this decision
    items = []
    for state in row["explanation"]["items"]:
        state = dict(state)
        if state["code"] == rules.PENDED:
            note = f"Reviewed by {reviewer}" + (f": {reason}" if reason else "")
            if action == "deny":
                state.update(code=rules.DENIED, reasons=[{"code": "", "text": f"Not certified: {reason}"}])
            else:
                until = end or _default_end(rt, state, today)
                if until is None and action == "approve":
                    raise InvalidRequest(
                        "give the period end (no policy sets it for this item)", expression="period_end"
                    )
                candidate = _candidate(rt, row, state, until, today)
                pa = granted.setdefault(_key(candidate), candidate)
                period = {"start": today.isoformat(), **({"end": until.isoformat()} if until else {})}
                state.update(code=ACTIONS[action], pa_id=pa.pa_id, period=period, reasons=[{"code": "", "text": note}])
                if action == "modify":
                    item = claim_items.get(state["sequence"], {})
                    added: dict[str, Any] = {"productOrService": item.get("productOrService") or {"text": "item"}}
                    if quantity is not None:
                        added["quantity"] = {"value": quantity}
                    state["added"] = added
        items.append(state)
    out = response.response_bundle(rt, checked, items, response_id=request_id, created=now, bundle_id=rt.new_id())
    explanation = {**row["explanation"], "items": items}
    decision = {"reviewer": reviewer, "action": action, "reason": reason, "period_end": end, "quantity": quantity}
    with rt.store.engine.begin() as conn:
        ok = pas_store.record_decision(
            conn,
            request_id=request_id,
            was_status=row["status"],
            status=status_of(items),
            response=out,
            explanation=explanation,
            decision=decision,
            at=now,
        )
        if not ok:
            raise Conflict("Another decision on this request was recorded meanwhile; open it again")
        for pa in granted.values():
            try:
                superseded = rt.store.replace_prior_auth(conn, pa)
            except IntegrityError:  # the whole decision rolls back
                raise Conflict(
                    "An authorization for this drug and patient was issued meanwhile; open the request again"
                ) from None
            pas_store.audit(
                conn,
                kind="prior-auth-granted",
                actor=reviewer,
                subject=request_id,
                at=now,
                detail={
                    "pa": pa.pa_id,
                    "valid_to": pa.valid_to.isoformat() if pa.valid_to else None,
                    "superseded": superseded,
                },
            )
        notify.enqueue(conn, rt, org_identifier=row["org_identifier"], bundle=out, request_id=request_id)
    metrics.reviewed(row["explanation"]["items"], items)
    return out
