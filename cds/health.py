"""Liveness and readiness, for a load balancer or an orchestrator: no authentication, no patient data, cheap.

``GET /healthz`` answers 200 ``{"status": "ok"}`` whenever the process serves requests (no I/O at all).
``GET /readyz`` answers 200 ``{"status": "ready", "checks": {...}}`` when the store answers a trivial query, the
policies are loaded and the database is at the migrations' head; otherwise 503 ``{"status": "unavailable",
"failing": [...], "checks": {...}}`` naming each failing check (with the store unreachable, the migrations are not
checked). A failure is described by its exception's type only
(never its message or a stack trace: a driver's message may carry the database URL).
"""

from __future__ import annotations

import json
import logging
from functools import cache
from typing import Any

from flask import Blueprint, Response
from sqlalchemy import text

from cds import migrate
from cds.runtime import Runtime, current

log = logging.getLogger("cds.health")
bp = Blueprint("health", __name__)

OK = "ok"
NOT_CHECKED = "not checked (store unreachable)"  # what the migrations check says when the store is not there


@cache
def _head() -> str:
    """The migrations' head: fixed for the life of the process (read from the code's migration scripts once)."""
    return migrate.head()


def _answer(body: dict[str, Any], status: int) -> Response:
    resp = Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/healthz")
def healthz() -> Response:
    return _answer({"status": "ok"}, 200)


def _checks(rt: Runtime) -> dict[str, str]:
    checks: dict[str, str] = {}
    count = len(rt.policies.policies)
    checks["policies"] = OK if count > 0 else "no policies loaded"
    try:
        engine = rt.store.engine
        with engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
    except Exception as exc:  # any failure to reach the store means not ready; only its type is told
        log.warning("readyz: store unreachable (%s)", type(exc).__name__)
        checks["store"] = f"unreachable ({type(exc).__name__})"
        checks["migrations"] = NOT_CHECKED
        return checks
    checks["store"] = OK
    try:
        at = migrate.current(engine)
    except Exception as exc:
        log.warning("readyz: migration version unreadable (%s)", type(exc).__name__)
        checks["migrations"] = f"version unreadable ({type(exc).__name__})"
        return checks
    head = _head()
    checks["migrations"] = OK if at == head else f"database at {at or 'no revision'}, code expects {head}"
    return checks


@bp.get("/readyz")
def readyz() -> Response:
    rt = current()
    checks = _checks(rt)
    checks = {name: checks[name] for name in ("store", "policies", "migrations")}
    failing = [name for name, result in checks.items() if result not in (OK, NOT_CHECKED)]
    if failing:
        return _answer({"status": "unavailable", "failing": failing, "checks": checks}, 503)
    return _answer({"status": "ready", "checks": checks}, 200)
