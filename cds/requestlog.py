"""One log line per request, a correlation id on every response, and JSON for every log line.

Each request the app answers writes one line on the ``cds.request`` logger (at INFO, whatever ``log_level``;
``request_log = false`` turns the lines off): ``ts``, ``level``, ``logger``, ``message`` (``request``), ``method``,
``route`` (the URL rule's template, ``(unmatched)`` when none matched), ``status``, ``duration_ms``,
``correlation_id``, and where known ``service`` (the CDS service id), ``hook_instance``, ``client_id`` (the verified
client: a token's ``iss``), ``orders`` (orders assessed) and ``incident`` (a 500's incident id); absent ones are null.
Never the path's values, the query string, a header, a token or a body: nothing about the patient.

The correlation id is the request's ``X-Request-ID`` (or ``X-Correlation-ID``) when it is well formed (1 to 128
characters of letters, digits and ``._:-``), else a new one; it is sent back on every response as ``X-Request-ID``
and every other log line written while the request is answered carries it too. The id is the client's own: it must
not carry patient data (it is logged as given).

With ``log_format = "json"`` (the default) every line of the service's log is one JSON object (:class:`JsonFormatter`:
the app's lines here, gunicorn's error log in :mod:`cds.server`); an exception is logged with its type and the stack's
frames, never its message (which may quote request data). ``"text"`` keeps the classic one-line format.
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, has_request_context, request

from cds.config import Config

log = logging.getLogger("cds.request")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # used with fullmatch
INCOMING = ("X-Request-ID", "X-Correlation-ID")
UNMATCHED = "(unmatched)"
UNPARSED = "(unparsed)"  # a request gunicorn refused before the app saw it (cds.server)
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# what a view may add to its request's line (annotate); everything else about a request stays out of the log
EXTRA_FIELDS = ("service", "hook_instance", "client_id", "orders", "incident")
FIELDS = ("method", "route", "status", "duration_ms", "correlation_id", *EXTRA_FIELDS)
MAX_FIELD = 128  # characters of an annotated text value
PROBES = frozenset(("/healthz", "/readyz", "/metrics"))  # their successes are left out without request_log_probes


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON: ``ts`` (UTC, milliseconds), ``level``, ``logger``, ``message``, the
    request's fields (the request line) or its ``correlation_id`` (any line written while a request is answered),
    and for an exception ``exc_type`` and ``stack`` (frames only)."""

    _second: tuple[int, str] = (-1, "")  # the last second formatted, and its text (strftime is a third of the cost)

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        out: dict[str, Any] = {
            "ts": f"{self._second[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "cds_request", None)
        if isinstance(fields, Mapping):
            out["message"] = "request"
            out.update(fields)
        else:
            out["message"] = record.getMessage()
            if has_request_context() and g.get("correlation_id"):
                out["correlation_id"] = g.correlation_id
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            tb = record.exc_info[2]
            out["stack"] = traceback.format_list(traceback.extract_tb(tb)) if tb is not None else []
        return json.dumps(out, separators=(",", ":"), default=str)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(config: Config) -> None:
    """The process's logging, once (a no-op when the root logger already has a handler, e.g. under pytest): one
    stderr handler in ``log_format``, at ``log_level``; request lines at INFO whatever the level."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(str(config["log_format"])))
    logging.basicConfig(level=str(config["log_level"]).upper(), handlers=[handler])
    log.setLevel(logging.INFO)


# --- per request -----------------------------------------------------------------------------------------------------


def _incoming() -> str | None:
    for name in INCOMING:
        value = request.headers.get(name)
        if value is not None and REQUEST_ID.fullmatch(value):
            return value
    return None


def correlation_id() -> str | None:
    """The correlation id of the request being answered (None outside a request)."""
    return g.get("correlation_id") if has_request_context() else None


def annotate(**fields: Any) -> None:
    """Add known facts to the request's line: ``service``, ``hook_instance``, ``client_id``, ``orders``,
    ``incident`` (text is cut at :data:`MAX_FIELD` characters). Outside a request, nothing happens."""
    if not has_request_context():
        return
    extra = g.setdefault("cds_log_fields", {})
    for key, value in fields.items():
        if key not in EXTRA_FIELDS:
            raise ValueError(f"{key!r} is not a request log field")
        extra[key] = value[:MAX_FIELD] if isinstance(value, str) else value


def _started() -> None:
    g.cds_log_started = time.perf_counter()
    g.correlation_id = _incoming() or uuid.uuid4().hex


def _tag(resp: Response) -> Response:
    resp.headers["X-Request-ID"] = g.get("correlation_id") or uuid.uuid4().hex
    return resp


def line(method: str | None, route: str, status: int, duration_ms: float | None, cid: str, **extra: Any) -> None:
    """Write one request line (also for requests the app never saw, :mod:`cds.server`)."""
    fields: dict[str, Any] = {
        "method": method if method is None or method in METHODS else "other",
        "route": route,
        "status": status,
        "duration_ms": duration_ms,
        "correlation_id": cid,
        **{k: extra.get(k) for k in EXTRA_FIELDS},
    }
    shown = f"{duration_ms:.1f}ms" if duration_ms is not None else "-"
    known = "".join(f" {k}={fields[k]}" for k in EXTRA_FIELDS if fields[k] is not None)  # the text format's tail
    log.info(
        "request %s %s %s %s id=%s%s", fields["method"], route, status, shown, cid, known, extra={"cds_request": fields}
    )


def _logged(resp: Response) -> Response:
    started = g.get("cds_log_started")
    duration = round((time.perf_counter() - started) * 1000, 3) if started is not None else None
    rule = request.url_rule
    line(
        request.method,
        rule.rule if rule is not None else UNMATCHED,
        resp.status_code,
        duration,
        str(g.get("correlation_id")),
        **g.get("cds_log_fields", {}),
    )
    return resp


def _logged_unless_probe(resp: Response) -> Response:
    """:func:`_logged`, except for a probe's success (``request_log_probes`` off)."""
    rule = request.url_rule
    if rule is not None and rule.rule in PROBES and resp.status_code < 400:
        return resp
    return _logged(resp)


def register(app: Flask) -> None:
    """The correlation id on every response of ``app`` and, unless ``request_log`` is off, one line per request
    (without ``request_log_probes``, not for a probe's success). Register before the other request hooks: a request
    one of them refuses is logged too."""
    app.before_request(_started)
    config = app.extensions["cds"].config
    if config["request_log"]:
        app.after_request(_logged if config["request_log_probes"] else _logged_unless_probe)
    app.after_request(_tag)
