"""PAS notifications (FHIR R4 Subscriptions backport, the PAS SubscriptionTopic): the subscriptions, the durable
outbox of notifications to deliver, and the notification Bundles.

A subscription is per sending system (``org-identifier`` filter, PAS §spec-58), owned by the client that created it.
It starts ``requested``; its handshake is put in the outbox in the same transaction, and delivering it makes it
``active`` (:mod:`cds.pas.delivery`). When a response changes, :func:`enqueue` puts one ``event-notification`` per
matching active subscription in the outbox, inside the caller's transaction: the request path only inserts rows, the
delivery worker sends them. The outbox rows are the audit record of every notification (what, when, how often tried).
A subscription whose ``end`` has passed is sent nothing more and turned ``off``; one with a heartbeat period is sent a
``heartbeat`` when nothing was sent to it for that long (both by the delivery worker's sweep).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Connection, DateTime, Index, Integer, String, Table, Text, insert, or_, select, update

from cds.runtime import Runtime, utc_now
from cds.store import metadata

PAS_TOPIC = "http://hl7.org/fhir/us/davinci-pas/SubscriptionTopic/PASSubscriptionTopic"
PAS_SUBSCRIPTION_PROFILE = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-subscription"
PAS_RESPONSE_BUNDLE_PROFILE = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-pas-response-bundle"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
BACKPORT_SUBSCRIPTION_PROFILE = BACKPORT + "backport-subscription"
FILTER_CRITERIA_URL = BACKPORT + "backport-filter-criteria"
PAYLOAD_CONTENT_URL = BACKPORT + "backport-payload-content"
STATUS_PROFILE = BACKPORT + "backport-subscription-status-r4"
TOPIC_CANONICAL_URL = BACKPORT + "capabilitystatement-subscriptiontopic-canonical"
STATUS_OPERATION = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status"

STATUSES = ("requested", "active", "error", "off")
KINDS = ("handshake", "event", "heartbeat")

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(512)),  # the verified client id; None when authentication is off
    Column("org_identifier", String(1024), nullable=False),  # ",id1,id2," (the filter's list, comma-delimited)
    Column("endpoint", String(2048), nullable=False),
    Column("headers", Text, nullable=False),  # JSON list of "Name: value" (may hold the receiver's credentials)
    Column("status", String(16), nullable=False),  # requested | active | error | off
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("resource", Text, nullable=False),  # the Subscription as accepted (JSON); status is the column's
    Column("events_since_start", Integer, nullable=False, default=0),
    Column("ends_at", DateTime(timezone=True)),  # Subscription.end: turned off when it passes
    Column("heartbeat_seconds", Integer),  # backport-heartbeat-period: a heartbeat when nothing was sent that long
    Column("last_notified_at", DateTime(timezone=True)),  # when a notification was last put in the outbox for it
    Index("ix_subscriptions_owner", "owner"),
    Index("ix_subscriptions_status", "status"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subscription_id", String(64), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # handshake | event | heartbeat
    Column("payload", Text, nullable=False),  # the notification Bundle (JSON), built when enqueued
    Column("attempts", Integer, nullable=False, default=0),
    # when the row may next be tried; a claim moves it ahead by the lease; None: given up (see last_error)
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("delivered_at", DateTime(timezone=True)),
    Column("last_error", String(500)),  # never the receiver's body: a status or a kind of failure
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("request_id", String(64)),  # the PAS request whose response changed (events)
    Index("ix_outbox_due", "delivered_at", "next_attempt_at"),
)


# --- the org-identifier filter -------------------------------------------------------------------------------------


def org_list(ids: Sequence[str]) -> str:
    """The ``org_identifier`` column for a filter naming ``ids``: comma-delimited, with a comma at each end."""
    return "," + ",".join(ids) + ","


def org_ids(column: str) -> list[str]:
    return [part for part in column.split(",") if part]


# --- notification Bundles ------------------------------------------------------------------------------------------


def _instant(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subscription_url(base_url: str, sub_id: str) -> str:
    return f"{base_url}/fhir/Subscription/{sub_id}"


def status_parameters(
    base_url: str,
    sub_id: str,
    *,
    status: str,
    type_: str,
    events_since_start: int,
    events: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A SubscriptionStatus (R4 backport: a Parameters resource, profile ``backport-subscription-status-r4``)."""
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": subscription_url(base_url, sub_id)}},
        {"name": "topic", "valueCanonical": PAS_TOPIC},
        {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": type_},
        {"name": "events-since-subscription-start", "valueString": str(events_since_start)},
    ]
    for event in events:
        parts: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event["number"])},
            {"name": "timestamp", "valueInstant": event["timestamp"]},
        ]
        if event.get("focus"):
            parts.append({"name": "focus", "valueReference": {"reference": event["focus"]}})
        params.append({"name": "notification-event", "part": parts})
    return {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": params,
    }


def _status_entry(base_url: str, sub_id: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{parameters['id']}",
        "resource": parameters,
        "request": {"method": "GET", "url": f"{subscription_url(base_url, sub_id)}/$status"},
        "response": {"status": "200"},
    }


def _history(entries: list[dict[str, Any]], at: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": _instant(at),
        "entry": entries,
    }


def handshake_bundle(base_url: str, sub_id: str, at: datetime) -> dict[str, Any]:
    """The handshake sent when a subscription is created or changed: status ``requested``, no events."""
    status = status_parameters(base_url, sub_id, status="requested", type_="handshake", events_since_start=0)
    return _history([_status_entry(base_url, sub_id, status)], at)


def heartbeat_bundle(base_url: str, sub_id: str, *, events_since_start: int, at: datetime) -> dict[str, Any]:
    """The heartbeat sent when nothing was sent to an active subscription for its heartbeat period: no events."""
    status = status_parameters(
        base_url, sub_id, status="active", type_="heartbeat", events_since_start=events_since_start
    )
    return _history([_status_entry(base_url, sub_id, status)], at)


def _claim_response_id(bundle: Mapping[str, Any]) -> str | None:
    entries = bundle.get("entry") or []
    first = entries[0].get("resource") if entries and isinstance(entries[0], Mapping) else None
    if isinstance(first, Mapping) and first.get("resourceType") == "ClaimResponse" and first.get("id"):
        return str(first["id"])
    return None


def event_bundle(
    base_url: str, sub_id: str, *, event_number: int, response: Mapping[str, Any], at: datetime
) -> dict[str, Any]:
    """An ``event-notification`` (full-resource): the SubscriptionStatus first, its event's ``focus`` the PAS
    response Bundle, which is the second entry (``fullUrl`` the same ``urn:uuid``). The entry's ``request`` names
    the ClaimResponse that changed, the resource type the PAS topic triggers on."""
    focus = f"urn:uuid:{uuid.uuid4()}"
    stamp = _instant(at)
    status = status_parameters(
        base_url,
        sub_id,
        status="active",
        type_="event-notification",
        events_since_start=event_number,
        events=[{"number": event_number, "timestamp": stamp, "focus": focus}],
    )
    claim_response = _claim_response_id(response)
    changed = {
        "fullUrl": focus,
        "resource": dict(response),
        "request": {"method": "PUT", "url": f"ClaimResponse/{claim_response}" if claim_response else "ClaimResponse"},
        "response": {"status": "200"},
    }
    return _history([_status_entry(base_url, sub_id, status), changed], at)


# --- the outbox ----------------------------------------------------------------------------------------------------


def add_to_outbox(
    conn: Connection,
    sub_id: str,
    kind: str,
    payload: Mapping[str, Any],
    *,
    request_id: str | None = None,
    at: datetime | None = None,
) -> int:
    """Put one notification in the outbox, due now (or ``at``), and note on the subscription that it was sent
    something then (its heartbeat period counts from it); the row's id."""
    now = at or utc_now()  # the wall clock (not the runtime's): the delivery worker compares against it
    conn.execute(update(subscriptions).where(subscriptions.c.id == sub_id).values(last_notified_at=now))
    result = conn.execute(
        insert(outbox).values(
            subscription_id=sub_id,
            kind=kind,
            payload=json.dumps(payload, separators=(",", ":")),
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            request_id=request_id,
        )
    )
    key = result.inserted_primary_key
    return int(key[0]) if key else 0


def enqueue(conn: Connection, rt: Runtime, *, org_identifier: str, bundle: dict[str, Any], request_id: str) -> int:
    """Notify every active subscription whose ``org-identifier`` filter names ``org_identifier`` (exactly, one of
    its comma-separated list) that the PAS response ``bundle`` changed: one outbox row per subscription, in the
    caller's transaction ``conn`` (so a decision and its notifications commit or roll back together). Each
    subscription's event counter is advanced in the same transaction. Sends nothing; returns how many rows.

    :raise ValueError: ``bundle`` is not a Bundle (a programming error of the caller).
    """
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise ValueError("enqueue takes the PAS response Bundle")
    wanted = org_identifier.strip()
    if not wanted or "," in wanted:
        return 0
    rows = conn.execute(
        select(subscriptions.c.id, subscriptions.c.org_identifier).where(
            subscriptions.c.status == "active",
            subscriptions.c.org_identifier.contains(f",{wanted},", autoescape=True),
            or_(subscriptions.c.ends_at.is_(None), subscriptions.c.ends_at > utc_now()),
        )
    ).all()
    at = rt.clock()
    count = 0
    for sub_id, orgs in rows:
        if wanted not in org_ids(orgs):  # LIKE ignores case on SQLite; the filter does not
            continue
        conn.execute(
            update(subscriptions)
            .where(subscriptions.c.id == sub_id)
            .values(events_since_start=subscriptions.c.events_since_start + 1)
        )
        number = conn.execute(select(subscriptions.c.events_since_start).where(subscriptions.c.id == sub_id)).scalar()
        payload = event_bundle(rt.base_url, sub_id, event_number=int(number or 1), response=bundle, at=at)
        add_to_outbox(conn, sub_id, "event", payload, request_id=request_id)
        count += 1
    return count


def notifications_for(conn: Connection, sub_id: str) -> list[dict[str, Any]]:
    """The outbox rows of one subscription, oldest first (tests, audit)."""
    rows = conn.execute(select(outbox).where(outbox.c.subscription_id == sub_id).order_by(outbox.c.id)).mappings()
    return [dict(r) for r in rows]
