"""Data access over the PAS tables (:mod:`cds.pas.tables`) through ``rt.store.engine``: one code path for SQLite and
PostgreSQL (SQLAlchemy Core).

A submission is inserted with its response and its audit event in one transaction, committed before the response
is sent. The database holds at most one row per (submitter, Bundle.identifier): of concurrent duplicates one insert
wins, the others read the winner back (:func:`insert_or_get`) and create nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from cds.pas.tables import audit_events, pas_decisions, pas_requests
from cds.runtime import Runtime

JSON_COLUMNS = ("request", "response", "explanation")
OPEN = ("pended", "partial")


def _aware(value: Any) -> Any:
    return value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value


def _row(row: RowMapping) -> dict[str, Any]:
    out = {k: _aware(v) for k, v in dict(row).items()}
    for name in JSON_COLUMNS:
        out[name] = json.loads(out[name])
    return out


def _dumped(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in values.items()}


def audit(conn: Connection, *, kind: str, actor: str, subject: str | None, at: datetime, detail: Any) -> None:
    conn.execute(insert(audit_events).values(kind=kind, actor=actor, subject=subject, at=at, detail=json.dumps(detail)))


def by_key(rt: Runtime, submitter: str, bundle_key: str) -> dict[str, Any] | None:
    with rt.store.engine.connect() as conn:
        row = (
            conn.execute(
                select(pas_requests).where(
                    and_(pas_requests.c.submitter == submitter, pas_requests.c.bundle_key == bundle_key)
                )
            )
            .mappings()
            .first()
        )
    return None if row is None else _row(row)


def get(rt: Runtime, request_id: str) -> dict[str, Any] | None:
    with rt.store.engine.connect() as conn:
        row = conn.execute(select(pas_requests).where(pas_requests.c.id == request_id)).mappings().first()
    return None if row is None else _row(row)


def current_for_claim(rt: Runtime, submitter: str, claim_key: str) -> dict[str, Any] | None:
    """The current (not superseded) request of this submitter for a Claim identifier."""
    with rt.store.engine.connect() as conn:
        row = (
            conn.execute(
                select(pas_requests)
                .where(
                    and_(
                        pas_requests.c.submitter == submitter,
                        pas_requests.c.claim_key == claim_key,
                        pas_requests.c.superseded_by.is_(None),
                    )
                )
                .order_by(pas_requests.c.received_at.desc())
            )
            .mappings()
            .first()
        )
    return None if row is None else _row(row)


def insert_or_get(
    rt: Runtime,
    values: Mapping[str, Any],
    *,
    audit_detail: Any,
    supersedes: str | None = None,
    revoke: Sequence[str] = (),
) -> tuple[dict[str, Any], bool]:
    """Store a new request (with its audit event; for an update the prior request marked superseded and the
    authorizations it cancels revoked, audited as ``prior-auth-revoked``) in one transaction. A row under the same
    (submitter, bundle_key) wins: it is read back and returned, with False."""
    try:
        with rt.store.engine.begin() as conn:
            conn.execute(insert(pas_requests).values(**_dumped(values)))
            if supersedes is not None:
                conn.execute(
                    update(pas_requests)
                    .where(pas_requests.c.id == supersedes)
                    .values(superseded_by=values["id"], updated_at=values["received_at"])
                )
            who = {"actor": str(values["submitter"]), "subject": str(values["id"]), "at": values["received_at"]}
            audit(conn, kind="submit", detail=audit_detail, **who)
            revoked = rt.store.revoke_prior_auths(conn, revoke)
            if revoked:
                audit(conn, kind="prior-auth-revoked", detail={"revoked": revoked}, **who)
    except IntegrityError:
        found = by_key(rt, str(values["submitter"]), str(values["bundle_key"]))
        if found is None:
            raise
        return found, False
    stored = get(rt, str(values["id"]))
    assert stored is not None
    return stored, True


def matching(rt: Runtime, payer_id: str, member_id: str, provider_key: str) -> list[dict[str, Any]]:
    """Current requests for one patient (member id) from one provider to one payer, oldest first."""
    with rt.store.engine.connect() as conn:
        rows = (
            conn.execute(
                select(pas_requests)
                .where(
                    and_(
                        pas_requests.c.payer_id == payer_id,
                        pas_requests.c.member_id == member_id,
                        pas_requests.c.provider_key == provider_key,
                        pas_requests.c.superseded_by.is_(None),
                    )
                )
                .order_by(pas_requests.c.received_at)
            )
            .mappings()
            .all()
        )
    return [_row(r) for r in rows]


def open_requests(rt: Runtime) -> list[dict[str, Any]]:
    """Current requests waiting for a reviewer, by due time."""
    with rt.store.engine.connect() as conn:
        rows = (
            conn.execute(
                select(pas_requests)
                .where(and_(pas_requests.c.status.in_(OPEN), pas_requests.c.superseded_by.is_(None)))
                .order_by(pas_requests.c.due_at, pas_requests.c.received_at)
            )
            .mappings()
            .all()
        )
    return [_row(r) for r in rows]


def decisions_for(rt: Runtime, request_id: str) -> list[dict[str, Any]]:
    with rt.store.engine.connect() as conn:
        rows = (
            conn.execute(
                select(pas_decisions).where(pas_decisions.c.request_id == request_id).order_by(pas_decisions.c.id)
            )
            .mappings()
            .all()
        )
    return [{k: _aware(v) for k, v in dict(r).items()} for r in rows]


def audit_for(rt: Runtime, subject: str) -> list[dict[str, Any]]:
    with rt.store.engine.connect() as conn:
        rows = (
            conn.execute(select(audit_events).where(audit_events.c.subject == subject).order_by(audit_events.c.id))
            .mappings()
            .all()
        )
    return [{**{k: _aware(v) for k, v in dict(r).items()}, "detail": json.loads(r["detail"])} for r in rows]


def record_decision(
    conn: Connection,
    *,
    request_id: str,
    was_status: str,
    status: str,
    response: Any,
    explanation: Any,
    decision: Mapping[str, Any],
    at: datetime,
) -> bool:
    """Within the caller's transaction: the request's new status and response (only if it is still ``was_status``
    and current), the decision row and its audit event. False, changing nothing, when another decision won."""
    changed = conn.execute(
        update(pas_requests)
        .where(
            and_(
                pas_requests.c.id == request_id,
                pas_requests.c.status == was_status,
                pas_requests.c.superseded_by.is_(None),
            )
        )
        .values(status=status, response=json.dumps(response), explanation=json.dumps(explanation), updated_at=at)
    ).rowcount
    if changed != 1:
        return False
    conn.execute(insert(pas_decisions).values(request_id=request_id, decided_at=at, **decision))
    audit(
        conn,
        kind="decision",
        actor=str(decision["reviewer"]),
        subject=request_id,
        at=at,
        detail={k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in decision.items()},
    )
    return True


def record_audit(rt: Runtime, *, kind: str, actor: str, subject: str | None, at: datetime, detail: Any) -> None:
    with rt.store.engine.begin() as conn:
        audit(conn, kind=kind, actor=actor, subject=subject, at=at, detail=detail)
