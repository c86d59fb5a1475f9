"""``cds serve``: the production server (gunicorn, several workers, threads for slow EHR reads).

Two things gunicorn does on its own are changed here, both in :class:`Worker`:

* a request gunicorn refuses before the app sees it (a request line over ``limit_request_line``, too many or too
  large headers, bytes that are not HTTP/1.1) is answered in the service's one error shape, a JSON
  ``OperationOutcome``, instead of gunicorn's HTML page, and what the client sent is logged only through
  :func:`cds.logsafe.clean`;
* responses carry no ``Server`` header: naming the server software and its version helps only whoever probes for
  known flaws. gunicorn writes ``Server: gunicorn`` itself (``gunicorn.http.wsgi.Response.default_headers``), drops
  any ``Server`` header the app sets, and has no setting for it, so :func:`_drop_server_header` replaces its
  response class: the only monkeypatch in this code.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import traceback
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from flask import Flask
from gunicorn import glogging, util
from gunicorn.app.base import BaseApplication
from gunicorn.http import errors as http_errors
from gunicorn.http import wsgi
from gunicorn.workers.gthread import ThreadWorker

from cds import metrics, requestlog
from cds.errors import CdsError, status_error, to_operation_outcome
from cds.logsafe import clean
from cds.pas import delivery

LIMIT_REQUEST_LINE = 4094  # bytes of "METHOD target HTTP/1.1" (gunicorn's default, stated so the docs can rely on it)
LIMIT_REQUEST_FIELDS = 100  # headers per request
LIMIT_REQUEST_FIELD_SIZE = 8190  # bytes of one header line


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, options: Mapping[str, Any]) -> None:
        self.application = app
        self.options = dict(options)
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


class _Response(wsgi.Response):  # type: ignore[misc]
    """gunicorn's HTTP/1 response, without its ``Server`` header."""

    def default_headers(self) -> list[str]:
        return [line for line in super().default_headers() if not line.lower().startswith("server:")]


def _drop_server_header() -> None:
    # MONKEYPATCH (the only one): gunicorn.http.wsgi.create() builds every HTTP/1 response from the module global
    # ``Response`` and the gthread worker offers no other way in. Done in each worker process, never at import.
    wsgi.Response = _Response


def parse_error(exc: BaseException, limit_request_line: int = LIMIT_REQUEST_LINE) -> CdsError:
    """The answer to an exception gunicorn raised while reading a request (or, for anything else, a 500).

    The statuses are gunicorn's own; the messages name the problem but never repeat what the client sent."""
    if isinstance(exc, http_errors.LimitRequestLine):
        return status_error(414, f"The request line is longer than {limit_request_line} bytes; shorten the URL")
    if isinstance(exc, http_errors.LimitRequestHeaders):
        return status_error(431, "The request has too many headers, or one too large")
    if isinstance(exc, http_errors.InvalidResponseHeader | http_errors.InvalidResponseHeaderName):
        return status_error(500, "Internal error; nothing about this request was changed")
    if isinstance(exc, http_errors.ConfigurationProblem):
        return status_error(500, "Internal error; nothing about this request was changed")
    if isinstance(exc, http_errors.ForbiddenProxyRequest | ssl.SSLError):
        return status_error(403, "Request forbidden")
    if isinstance(exc, http_errors.UnsupportedTransferCoding):
        return status_error(501, "The request uses a transfer coding this server does not implement")
    if isinstance(exc, http_errors.ExpectationFailed):
        return status_error(417, "The request's Expect header cannot be met")
    if isinstance(exc, http_errors.ParseException):
        return status_error(400, f"The request is not valid HTTP/1.1 ({type(exc).__name__})")
    return status_error(500, "Internal error; nothing about this request was changed")


def error_response(error: CdsError) -> bytes:
    """A complete HTTP/1.1 response (status line, headers, body) carrying ``error`` as an OperationOutcome."""
    body = json.dumps(to_operation_outcome(error), separators=(",", ":")).encode()
    phrase = HTTPStatus(error.http_status).phrase
    head = (
        f"HTTP/1.1 {error.http_status} {phrase}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nDate: {util.http_date()}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class Worker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker, answering the requests it refuses in the service's error shape."""

    def init_process(self) -> None:
        _drop_server_header()
        super().init_process()

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """Replaces gunicorn's handler (HTML page, raw request text in the log); the connection closes after."""
        started = time.perf_counter()
        error = parse_error(exc, int(self.cfg.limit_request_line))
        ip = (addr or ("", -1))[0]
        # never the URI nor the exception's text: gunicorn's quote the request line or header (ids, tokens)
        if error.http_status >= 500:
            frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
            self.log.error("Error handling request: %s\n%s", type(exc).__name__, frames)
        else:
            self.log.warning("Invalid request from ip=%s: %s", clean(ip), type(exc).__name__)
        _refused(self.wsgi, error.http_status, time.perf_counter() - started)
        try:
            util.write_nonblock(client, error_response(error))
        except OSError:
            self.log.debug("Failed to send error message.")


def _refused(app: Flask, status: int, seconds: float) -> None:
    """A request refused before the app saw it is counted and logged too, as route ``(unparsed)``."""
    config = app.extensions["cds"].config
    if config["metrics"]:
        metrics.refused(status, seconds)
    if config["request_log"]:
        requestlog.line(None, requestlog.UNPARSED, status, round(seconds * 1000, 3), uuid.uuid4().hex)


class _JsonLog(glogging.Logger):  # type: ignore[misc]
    """gunicorn's error log, one JSON object a line (``log_format = "json"``)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(requestlog.JsonFormatter())


def _child_exit(_server: Any, worker: Any) -> None:
    metrics.process_exited(worker.pid)


def _post_worker_init(worker: Any) -> None:
    """In each worker, after the fork: start its notification delivery thread (:mod:`cds.pas.delivery`)."""
    delivery.start_for(worker.wsgi)


def serve(app: Flask, host: str, port: int, workers: int, threads: int) -> None:
    """Run ``app`` under gunicorn until interrupted. The app is built once and forked (policies load once); the
    master closes its database connections first, and each worker opens its own (the Store checks the pid)."""
    config = app.extensions["cds"].config
    app.extensions["cds"].store.dispose()
    metrics.prepare_multiprocess(config)  # before the workers fork
    _Gunicorn(
        app,
        {
            "bind": f"{host}:{port}",
            "workers": workers,
            "worker_class": Worker,
            "threads": threads,
            "keepalive": 30,
            "timeout": 60,
            "graceful_timeout": 10,
            "limit_request_line": LIMIT_REQUEST_LINE,
            "limit_request_fields": LIMIT_REQUEST_FIELDS,
            "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "warning",
            "post_worker_init": _post_worker_init,
            "child_exit": _child_exit,
            "logger_class": _JsonLog if config["log_format"] == "json" else glogging.Logger,
        },
    ).run()
