"""The Subscription endpoints under ``/fhir`` (PAS §spec-55/56, R4 Subscriptions backport): create, read, update,
delete and ``$status``, for the client that owns the subscription only (PAS §spec-59; another client's is "not
found"). Only what the PAS profile allows is accepted: the PAS topic, one or more ``org-identifier=<id>`` filters,
a rest-hook channel to an https endpoint, FHIR JSON, ``full-resource`` content; optionally ``end`` (an instant to
come) and a ``backport-heartbeat-period`` of at least :data:`MIN_HEARTBEAT` seconds. A created (or changed)
subscription is ``requested`` and its handshake is put in the outbox; :mod:`cds.pas.delivery` sends it and makes it
``active``."""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, request
from sqlalchemy import delete, func, select, update

from cds.constants import LOOPBACK_NETWORKS
from cds.errors import Forbidden, InvalidResource, MalformedJson, NotFound, TooLong
from cds.fhir_api import fhir_body, fhir_response
from cds.pas import notify
from cds.pas.bundle import mappings
from cds.pas.notify import outbox, subscriptions
from cds.runtime import Runtime, current, utc_now
from cds.smart import require_scopes
from cds.upstream import AddressPolicy, destination_policy

bp = Blueprint("pas_subscriptions", __name__, url_prefix="/fhir")

MAX_SUBSCRIPTION_BYTES = 64_000
MAX_PER_OWNER = 20  # subscriptions are per sending system (PAS §spec-58): a client needs a handful at most
MAX_HEADERS = 10
MAX_HEADER_CHARS = 4_000
MAX_ENDPOINT_CHARS = 2_000
MAX_ORG_IDS = 50
PAYLOAD_TYPES = ("application/fhir+json", "application/json")
LOOPBACK_HOSTS = ("localhost",)
RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding", "connection"})
_FILTER = re.compile(r"\Aorg-identifier=(\S+)\Z")  # Inferno's check (pas_subscription_verification.rb)
_HEADER_NAME = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an RFC 9110 token

FILTER_PATH = f"Subscription._criteria.extension('{notify.FILTER_CRITERIA_URL}')"
CONTENT_PATH = f"Subscription.channel._payload.extension('{notify.PAYLOAD_CONTENT_URL}')"


HEARTBEAT_URL = notify.BACKPORT + "backport-heartbeat-period"
MIN_HEARTBEAT = 10  # seconds
HEARTBEAT_PATH = f"Subscription.channel.extension('{HEARTBEAT_URL}')"


@dataclass(frozen=True)
class Accepted:
    org_ids: tuple[str, ...]
    endpoint: str
    headers: tuple[str, ...]
    off: bool  # the client asked for status off (update only)
    ends_at: datetime | None = None  # Subscription.end
    heartbeat_seconds: int | None = None  # backport-heartbeat-period


def _end(body: Mapping[str, Any]) -> datetime | None:
    """``Subscription.end`` as an aware time: a FHIR instant (with its zone) still to come."""
    raw = body.get("end")
    if raw is None:
        return None
    try:
        found = datetime.fromisoformat(raw.replace("Z", "+00:00")) if isinstance(raw, str) and "T" in raw else None
        if found is not None and found.tzinfo is not None:
            found = found.astimezone(UTC)
    except (ValueError, OverflowError):  # not a time, or beyond year 9999 in UTC
        found = None
    if found is None or found.tzinfo is None:
        raise InvalidResource(
            "end is an instant with its time zone, e.g. 2027-01-31T00:00:00Z", expression="Subscription.end"
        )
    if found <= utc_now():
        raise InvalidResource("end has already passed", expression="Subscription.end")
    return found


def _heartbeat(channel: Mapping[str, Any]) -> int | None:
    """The backport heartbeat period in seconds (at least :data:`MIN_HEARTBEAT`), or None."""
    found = [e for e in mappings(channel.get("extension")) if e.get("url") == HEARTBEAT_URL]
    if not found:
        return None
    value = found[0].get("valueUnsignedInt")
    if len(found) > 1 or isinstance(value, bool) or not isinstance(value, int) or value < MIN_HEARTBEAT:
        raise InvalidResource(
            f"The heartbeat period is one valueUnsignedInt of at least {MIN_HEARTBEAT} seconds",
            expression=HEARTBEAT_PATH,
        )
    return value


def _body() -> Any:
    if len(request.get_data()) > MAX_SUBSCRIPTION_BYTES:
        raise TooLong(f"A Subscription is at most {MAX_SUBSCRIPTION_BYTES} bytes")
    body = fhir_body()
    if not isinstance(body, dict):
        raise MalformedJson("The request body must be a JSON object")
    return body


def _allowed() -> AddressPolicy:
    return destination_policy(current().config["notify_allowed_networks"])


def _endpoint_problem(url: str, allowed: AddressPolicy) -> str | None:
    """Why a channel endpoint is refused, or None: it must be https (http only to loopback), without credentials or
    fragment, and an address literal must be one notifications may go to (a name is checked each time it is sent
    to: :mod:`cds.pas.delivery`)."""
    shape = "channel.endpoint must be an https URL (http only to this machine's loopback address)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return shape
    if not parts.hostname or parts.username is not None or parts.password is not None or parts.fragment:
        return shape
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(parts.hostname)
    except ValueError:
        literal = None
    if literal is not None and not allowed(str(literal)):
        return "channel.endpoint is an address notifications may not be sent to (a private or internal network)"
    if parts.scheme == "https":
        return None
    if parts.scheme != "http":
        return shape
    if parts.hostname in LOOPBACK_HOSTS or (literal is not None and literal.is_loopback):
        return None
    return shape


def validate(body: Mapping[str, Any], allowed: AddressPolicy | None = None) -> Accepted:
    """What a Subscription asks for, when the PAS profile allows it.

    :raise InvalidResource: 400 naming the element (``expression``) that is missing or not allowed.
    """
    if body.get("resourceType") != "Subscription":
        raise InvalidResource("The body must be a Subscription resource", expression="Subscription.resourceType")
    if body.get("criteria") != notify.PAS_TOPIC:
        raise InvalidResource(f"criteria must be the PAS topic {notify.PAS_TOPIC}", expression="Subscription.criteria")
    extensions = (body.get("_criteria") or {}).get("extension") if isinstance(body.get("_criteria"), Mapping) else None
    filters = [e for e in mappings(extensions) if e.get("url") == notify.FILTER_CRITERIA_URL]
    if not filters:
        raise InvalidResource(
            "A backport-filter-criteria extension on criteria with the value org-identifier=<sending system id> "
            "is required (PAS: one subscription per sending system)",
            expression=FILTER_PATH,
        )
    ids: list[str] = []
    for f in filters:
        found = _FILTER.match(f.get("valueString") or "") if isinstance(f.get("valueString"), str) else None
        parts = [p.strip() for p in found.group(1).split(",")] if found else []
        if not parts or not all(parts) or any(len(p) > 80 for p in parts):
            raise InvalidResource(
                "The filter criteria must read org-identifier=<id> (a comma-separated list of ids is allowed)",
                expression=f"{FILTER_PATH}.valueString",
            )
        ids.extend(p for p in parts if p not in ids)
    if len(ids) > MAX_ORG_IDS:
        raise TooLong(f"At most {MAX_ORG_IDS} org identifiers per subscription", expression=FILTER_PATH)
    channel = body.get("channel")
    if not isinstance(channel, Mapping):
        raise InvalidResource("channel is required", expression="Subscription.channel")
    if channel.get("type") != "rest-hook":
        raise InvalidResource("PAS supports only the rest-hook channel", expression="Subscription.channel.type")
    endpoint = channel.get("endpoint")
    if not isinstance(endpoint, str) or len(endpoint) > MAX_ENDPOINT_CHARS:
        raise InvalidResource(
            f"channel.endpoint must be an https URL of at most {MAX_ENDPOINT_CHARS} characters",
            expression="Subscription.channel.endpoint",
        )
    problem = _endpoint_problem(endpoint, allowed or destination_policy(LOOPBACK_NETWORKS))
    if problem is not None:
        raise InvalidResource(problem, expression="Subscription.channel.endpoint")
    payload = channel.get("payload")
    if not isinstance(payload, str) or payload.split(";")[0].strip().lower() not in PAYLOAD_TYPES:
        raise InvalidResource(
            "channel.payload must be application/fhir+json (or application/json)",
            expression="Subscription.channel.payload",
        )
    payload_ext = (
        (channel.get("_payload") or {}).get("extension") if isinstance(channel.get("_payload"), Mapping) else []
    )
    contents = [e.get("valueCode") for e in mappings(payload_ext) if e.get("url") == notify.PAYLOAD_CONTENT_URL]
    if contents != ["full-resource"]:
        raise InvalidResource(
            "PAS notifications carry the full PAS response Bundle: the payload content must be full-resource",
            expression=CONTENT_PATH,
        )
    headers = channel.get("header") or []
    if not isinstance(headers, list) or len(headers) > MAX_HEADERS:
        raise InvalidResource(
            f"channel.header is a list of at most {MAX_HEADERS}", expression="Subscription.channel.header"
        )
    for i, line in enumerate(headers):
        name, sep, value = line.partition(":") if isinstance(line, str) else ("", "", "")
        if (
            not sep
            or not _HEADER_NAME.match(name.strip())
            or name.strip().lower() in RESERVED_HEADERS
            or len(line) > MAX_HEADER_CHARS
            or any(c in value for c in "\r\n\0")
        ):
            raise InvalidResource(
                "Each header is 'Name: value' (not Content-Type, Host or a length)",
                expression=f"Subscription.channel.header[{i}]",
            )
    off = body.get("status") == "off"
    ends_at, heartbeat = _end(body), _heartbeat(channel)
    return Accepted(tuple(ids), endpoint, tuple(str(h) for h in headers), off, ends_at, heartbeat)


def _resource(body: Mapping[str, Any], sub_id: str) -> dict[str, Any]:
    out = dict(body)
    out["id"] = sub_id
    meta = dict(out.get("meta") or {}) if isinstance(out.get("meta"), Mapping) else {}
    profiles = [p for p in meta.get("profile") or [] if isinstance(p, str)]
    for p in (notify.BACKPORT_SUBSCRIPTION_PROFILE, notify.PAS_SUBSCRIPTION_PROFILE):
        if p not in profiles:
            profiles.append(p)
    meta["profile"] = profiles
    out["meta"] = meta
    return out


def _render(row: Mapping[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = json.loads(row["resource"])
    resource["status"] = row["status"]
    updated = row["updated_at"]
    resource.setdefault("meta", {})["lastUpdated"] = notify._instant(
        updated if updated.tzinfo else updated.replace(tzinfo=utc_now().tzinfo)
    )
    return resource


def _own(rt: Runtime, sub_id: str, owner: str | None) -> dict[str, Any]:
    with rt.store.engine.connect() as conn:
        row = conn.execute(select(subscriptions).where(subscriptions.c.id == sub_id)).mappings().first()
    if row is None or row["owner"] != owner:
        raise NotFound(f"Subscription/{sub_id[:64]} is not known here")
    return dict(row)


def _may_follow(rt: Runtime, owner: str | None, org_ids: Sequence[str]) -> None:
    """A client subscribes only to the sending systems configured for it (``org_identifiers`` in its
    ``[[clients]]`` table): a notification carries another organisation's patients otherwise. Unauthenticated use
    (``auth_required = false``) is not restricted."""
    if owner is None or rt.verifier is None:
        return
    client = rt.verifier.clients.get(owner)
    allowed = set(client.org_identifiers) if client is not None else set()
    refused = [o for o in org_ids if o not in allowed]
    if refused:
        raise Forbidden(
            f"This client may not subscribe to org-identifier {', '.join(refused)[:200]}: list it in the client's "
            "org_identifiers in [[clients]]"
        )


@bp.post("/Subscription")
def create() -> Response:
    rt = current()
    owner = require_scopes(rt, "system/Subscription.c")
    body = _body()
    accepted = validate(body, _allowed())
    _may_follow(rt, owner, accepted.org_ids)
    sub_id = str(uuid.uuid4())
    now = utc_now()
    resource = _resource(body, sub_id)
    with rt.store.engine.begin() as conn:
        held = conn.execute(
            select(func.count()).select_from(subscriptions).where(subscriptions.c.owner == owner)
        ).scalar()
        if owner is not None and int(held or 0) >= MAX_PER_OWNER:
            raise TooLong(f"A client may hold at most {MAX_PER_OWNER} subscriptions; delete one first")
        conn.execute(
            subscriptions.insert().values(
                id=sub_id,
                owner=owner,
                org_identifier=notify.org_list(accepted.org_ids),
                endpoint=accepted.endpoint,
                headers=json.dumps(list(accepted.headers)),
                status="requested",
                created_at=now,
                updated_at=now,
                resource=json.dumps(resource, separators=(",", ":")),
                events_since_start=0,
                ends_at=accepted.ends_at,
                heartbeat_seconds=accepted.heartbeat_seconds,
            )
        )
        notify.add_to_outbox(conn, sub_id, "handshake", notify.handshake_bundle(rt.base_url, sub_id, rt.clock()))
    resource["status"] = "requested"
    resource["meta"]["lastUpdated"] = notify._instant(now)
    answer = fhir_response(resource, 201)
    answer.headers["Location"] = notify.subscription_url(rt.base_url, sub_id)
    return answer


@bp.get("/Subscription/<sub_id>")
def read(sub_id: str) -> Response:
    rt = current()
    owner = require_scopes(rt, "system/Subscription.r")
    return fhir_response(_render(_own(rt, sub_id, owner)))


@bp.put("/Subscription/<sub_id>")
def replace(sub_id: str) -> Response:
    """An update: ``status = off`` turns the subscription off; anything else is validated again and, like a new
    subscription, goes back to ``requested`` with a handshake to the (perhaps new) endpoint."""
    rt = current()
    owner = require_scopes(rt, "system/Subscription.u")
    _own(rt, sub_id, owner)
    body = _body()
    if body.get("id") not in (None, sub_id):
        raise InvalidResource("The Subscription's id must be the one in the URL", expression="Subscription.id")
    accepted = validate(body, _allowed())
    _may_follow(rt, owner, accepted.org_ids)
    status = "off" if accepted.off else "requested"
    now = utc_now()
    resource = _resource(body, sub_id)
    with rt.store.engine.begin() as conn:
        conn.execute(
            update(subscriptions)
            .where(subscriptions.c.id == sub_id, subscriptions.c.owner == owner)
            .values(
                org_identifier=notify.org_list(accepted.org_ids),
                endpoint=accepted.endpoint,
                headers=json.dumps(list(accepted.headers)),
                status=status,
                updated_at=now,
                resource=json.dumps(resource, separators=(",", ":")),
                ends_at=accepted.ends_at,
                heartbeat_seconds=accepted.heartbeat_seconds,
            )
        )
        if status == "requested":
            notify.add_to_outbox(conn, sub_id, "handshake", notify.handshake_bundle(rt.base_url, sub_id, rt.clock()))
    return fhir_response(_render(_own(rt, sub_id, owner)))


@bp.delete("/Subscription/<sub_id>")
def remove(sub_id: str) -> Response:
    """Deletes the subscription; what it still had to deliver is given up (the outbox rows stay, for the audit)."""
    rt = current()
    owner = require_scopes(rt, "system/Subscription.d")
    _own(rt, sub_id, owner)
    with rt.store.engine.begin() as conn:
        conn.execute(delete(subscriptions).where(subscriptions.c.id == sub_id, subscriptions.c.owner == owner))
        conn.execute(
            update(outbox)
            .where(outbox.c.subscription_id == sub_id, outbox.c.delivered_at.is_(None))
            .values(next_attempt_at=None, last_error="the subscription was deleted")
        )
    return Response(status=204)


@bp.get("/Subscription/<sub_id>/$status")
def status(sub_id: str) -> Response:
    """The backport's ``$status``: a searchset Bundle holding the subscription's SubscriptionStatus."""
    rt = current()
    owner = require_scopes(rt, "system/Subscription.r")
    row = _own(rt, sub_id, owner)
    params = notify.status_parameters(
        rt.base_url,
        sub_id,
        status=row["status"],
        type_="query-status",
        events_since_start=int(row["events_since_start"] or 0),
    )
    return fhir_response(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": 1,
            "entry": [{"fullUrl": f"urn:uuid:{params['id']}", "resource": params, "search": {"mode": "match"}}],
        }
    )
