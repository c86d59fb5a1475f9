"""The CDS Hooks HTTP edge: discovery, service calls, feedback. Thin: parse, call the service, record, answer."""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

from flask import Blueprint, Response, current_app, request

from cds import hookrequest
from cds.errors import CdsError, InvalidRequest, NotFound, UnsupportedMedia, to_operation_outcome
from cds.hookrequest import load_json
from cds.registry import ServiceDefinition
from cds.runtime import Runtime

log = logging.getLogger("cds.hooks")
bp = Blueprint("cds_hooks", __name__)


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["cds"]
    return rt


def services() -> dict[str, ServiceDefinition]:
    found: dict[str, ServiceDefinition] = current_app.extensions["cds.services"]
    return found


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")


def _authenticate(rt: Runtime, audience: str, required: bool) -> str | None:
    if not required or rt.verifier is None:
        return None
    claims = rt.verifier.verify(request.headers.get("Authorization"), audience)
    if random.random() < 0.002:  # now and then, forget token ids that have expired
        rt.store.forget_expired_tokens()
    return str(claims["iss"])


def _require_json() -> None:
    ctype = request.mimetype
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMedia(f"Send the request as application/json, not {ctype}")


@bp.get("/cds-services")
def discovery() -> Response:
    rt = runtime()
    _authenticate(rt, f"{rt.base_url}/cds-services", bool(rt.config["discovery_auth_required"]))
    return json_response({"services": [s.discovery() for s in services().values()]})


@bp.post("/cds-services/<service_id>")
def invoke(service_id: str) -> Response:
    rt = runtime()
    service = services().get(service_id)
    if service is None:
        raise NotFound(f"No CDS service '{service_id}' here; GET /cds-services lists them")
    iss = _authenticate(rt, f"{rt.base_url}/cds-services/{service_id}", bool(rt.config["auth_required"]))
    started = time.perf_counter()
    received = rt.clock()
    raw = request.get_data()
    hook_instance = ""
    status = 200
    records: list[Any] = []
    prior: list[Any] = []
    queried: list[str] = []
    try:
        _require_json()
        parsed = hookrequest.parse(raw, service.hook)
        hook_instance = parsed.hook_instance
        outcome = service.handle(rt, parsed)
        body: dict[str, Any] = outcome.body
        if outcome.assessment is not None:
            records = outcome.assessment.records(hook_instance)
            prior = outcome.assessment.new_prior_auths()
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
        prior=prior,
    )
    log.info(
        "hook service=%s status=%s ms=%s hookInstance=%s orders=%s",
        service_id,
        status,
        duration,
        hook_instance or "-",
        len(records),
    )
    return Response(text, status=status, mimetype="application/json")


@bp.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    rt = runtime()
    if service_id not in services():
        raise NotFound(f"No CDS service '{service_id}' here")
    _authenticate(rt, f"{rt.base_url}/cds-services/{service_id}/feedback", bool(rt.config["auth_required"]))
    _require_json()
    raw = load_json(request.get_data())
    items = raw.get("feedback") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidRequest('The body must be {"feedback": [ ... ]} with at least one item', expression="feedback")
    for i, item in enumerate(items):
        where = f"feedback[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("card"), str) or not item["card"]:
            raise InvalidRequest("each item names the card (its uuid)", expression=f"{where}.card")
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise InvalidRequest("outcome is 'accepted' or 'overridden'", expression=f"{where}.outcome")
        if outcome == "accepted" and not (
            isinstance(item.get("acceptedSuggestions"), list) and item["acceptedSuggestions"]
        ):
            raise InvalidRequest(
                "accepted feedback lists acceptedSuggestions", expression=f"{where}.acceptedSuggestions"
            )
        reason = item.get("overrideReason")
        if reason is not None and not (
            isinstance(reason, dict) and (reason.get("reason") or reason.get("userComment"))
        ):
            raise InvalidRequest("overrideReason needs a reason or a userComment", expression=f"{where}.overrideReason")
        if not isinstance(item.get("outcomeTimestamp"), str):
            raise InvalidRequest("outcomeTimestamp is required", expression=f"{where}.outcomeTimestamp")
    rt.store.record_feedback(service_id, items)
    return json_response({"received": len(items)})


@bp.post("/_echo")
def echo() -> Response:
    """A trivial JSON echo, enabled for the benchmark only (the baseline cost of a request on this server)."""
    if not runtime().config["bench_echo"]:
        raise NotFound("No such route")
    return json_response(load_json(request.get_data()))
