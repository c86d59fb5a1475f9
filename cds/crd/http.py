"""The CDS Hooks HTTP edge: discovery, service calls, feedback. Thin: parse, call the service, record, answer."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Mapping
from datetime import date
from typing import Any

from flask import Blueprint, Response, current_app, request

from cds import metrics, requestlog, smart
from cds.crd import hookrequest
from cds.crd.hookrequest import load_json
from cds.crd.registry import ServiceDefinition
from cds.errors import CdsError, InvalidRequest, NotFound, TooLong, UnsupportedMedia, to_operation_outcome
from cds.logsafe import clean
from cds.runtime import Runtime, current

bp = Blueprint("cds_hooks", __name__)

# Card feedback limits. An EHR sends one item per card a user acted on, so 100 per call is far above real use;
# a card id is the uuid this service gave the card (36 characters; 64 allowed, the store column holds 128); a user's
# override comment is a sentence or two, 1,000 characters leaves room for a paragraph.
MAX_FEEDBACK_ITEMS = 100
MAX_CARD_ID = 64
MAX_USER_COMMENT = 1000
CARD_ID = re.compile(rf"[A-Za-z0-9\-.]{{1,{MAX_CARD_ID}}}")  # used with fullmatch: "$" would allow a final "\n"
INSTANT = re.compile(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)"
    r"(\.[0-9]{1,9})?(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)


def services() -> dict[str, ServiceDefinition]:
    found: dict[str, ServiceDefinition] = current_app.extensions["cds.services"]
    return found


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")


def _authenticate(rt: Runtime, audience: str, required: bool) -> str | None:
    if not required or rt.verifier is None:
        return None
    claims = smart.verify_client_jwt(rt, audience)
    if random.random() < 0.002:  # now and then, forget token ids that have expired
        rt.store.forget_expired_tokens()
    return str(claims["iss"])


def _require_json() -> None:
    ctype = request.mimetype
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMedia(f"Send the request as application/json, not {ctype}")


@bp.get("/cds-services")
def discovery() -> Response:
    rt = current()
    _authenticate(rt, f"{rt.base_url}/cds-services", bool(rt.config["discovery_auth_required"]))
    return json_response({"services": [s.discovery() for s in services().values()]})


@bp.post("/cds-services/<service_id>")
def invoke(service_id: str) -> Response:
    rt = current()
    service = services().get(service_id)
    if service is None:
        raise NotFound(f"No CDS service '{service_id}' here; GET /cds-services lists them")
    requestlog.annotate(service=service_id)
    iss = _authenticate(rt, f"{rt.base_url}/cds-services/{service_id}", bool(rt.config["auth_required"]))
    started = time.perf_counter()
    received = rt.clock()
    raw = request.get_data()
    hook_instance = ""
    status = 200
    records: list[Any] = []
    queried: list[str] = []
    try:
        _require_json()
        parsed = hookrequest.parse(raw, service.hook, client=iss)
        hook_instance = parsed.hook_instance
        outcome = service.handle(rt, parsed)
        body: dict[str, Any] = outcome.body
        if outcome.assessment is not None:
            records = outcome.assessment.records(hook_instance)
            metrics.crd_decided(outcome.assessment)
            queried = list(outcome.assessment.queried)
    except CdsError as exc:
        status = exc.http_status
        body = to_operation_outcome(exc)
    text = json.dumps(body, separators=(",", ":"))
    duration = int((time.perf_counter() - started) * 1000)
    rt.store.record_exchange(
        hook_instance=hook_instance,
        service_id=service_id,
        client_iss=iss,
        received_at=received,
        status=status,
        duration_ms=duration,
        request=raw.decode("utf-8", "replace"),
        response=text,
        queried=queried,
        records=records,
    )
    requestlog.annotate(
        hook_instance=clean(hook_instance) if hook_instance else None, client_id=iss, orders=len(records)
    )
    return Response(text, status=status, mimetype="application/json")


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    rt = current()
    if service_id not in services():
        raise NotFound(f"No CDS service '{service_id}' here")
    _authenticate(rt, f"{rt.base_url}/cds-services/{service_id}/feedback", bool(rt.config["auth_required"]))
    _require_json()
    items = _feedback_items(load_json(request.get_data()))
    rt.store.record_feedback(service_id, items)
    return json_response({"received": len(items)})


def _feedback_items(raw: Any) -> list[Mapping[str, Any]]:
    """The items of a CDS Hooks feedback body, each checked; at most MAX_FEEDBACK_ITEMS of them."""
    items = raw.get("feedback") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidRequest('The body must be {"feedback": [ ... ]} with at least one item', expression="feedback")
    if len(items) > MAX_FEEDBACK_ITEMS:
        raise TooLong(
            f"{len(items)} feedback items in one call; at most {MAX_FEEDBACK_ITEMS} are accepted", expression="feedback"
        )
    for i, item in enumerate(items):
        _check_feedback_item(item, f"feedback[{i}]")
    return items


def _check_feedback_item(item: Any, where: str) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("card"), str) or not item["card"]:
        raise InvalidRequest("each item names the card (its uuid)", expression=f"{where}.card")
    if len(item["card"]) > MAX_CARD_ID:
        raise TooLong(f"card is a card's uuid, at most {MAX_CARD_ID} characters", expression=f"{where}.card")
    if not CARD_ID.fullmatch(item["card"]):
        raise InvalidRequest(
            "card is the uuid of a card this service returned (letters, digits, '-' and '.')",
            expression=f"{where}.card",
        )
    outcome = item.get("outcome")
    if outcome not in ("accepted", "overridden"):
        raise InvalidRequest("outcome is 'accepted' or 'overridden'", expression=f"{where}.outcome")
    if outcome == "accepted" and not (
        isinstance(item.get("acceptedSuggestions"), list) and item["acceptedSuggestions"]
    ):
        raise InvalidRequest("accepted feedback lists acceptedSuggestions", expression=f"{where}.acceptedSuggestions")
    reason = item.get("overrideReason")
    if reason is not None:
        _check_override_reason(reason, f"{where}.overrideReason")
    stamp = item.get("outcomeTimestamp")
    if not isinstance(stamp, str):
        raise InvalidRequest("outcomeTimestamp is required", expression=f"{where}.outcomeTimestamp")
    if not _is_instant(stamp):
        raise InvalidRequest(
            "outcomeTimestamp is a FHIR instant: YYYY-MM-DDThh:mm:ss[.sss] with Z or +hh:mm",
            expression=f"{where}.outcomeTimestamp",
        )


def _check_override_reason(reason: Any, where: str) -> None:
    if not (isinstance(reason, dict) and (reason.get("reason") or reason.get("userComment"))):
        raise InvalidRequest("overrideReason needs a reason or a userComment", expression=where)
    comment = reason.get("userComment")
    if comment is not None and not isinstance(comment, str):
        raise InvalidRequest("userComment is text", expression=f"{where}.userComment")
    if comment is not None and len(comment) > MAX_USER_COMMENT:
        raise TooLong(
            f"userComment has {len(comment)} characters; at most {MAX_USER_COMMENT} are accepted",
            expression=f"{where}.userComment",
        )


def _is_instant(value: str) -> bool:
    """A FHIR instant (seconds and a zone required, fraction optional) on a real calendar day."""
    if not INSTANT.fullmatch(value):
        return False
    try:
        date.fromisoformat(value[:10])
    except ValueError:
        return False
    return True


@bp.post("/_echo")
def echo() -> Response:
    """A trivial JSON echo, enabled for the benchmark only (the baseline cost of a request on this server)."""
    if not current().config["bench_echo"]:
        raise NotFound("No such route")
    return json_response(load_json(request.get_data()))
