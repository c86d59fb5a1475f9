"""The application factory.

``create_app(config)`` builds the Flask application: configuration in layers (:mod:`cds.config`), the reviewed
mappings and the policies (loaded strictly, once), storage, the JWT verifier, and the hook services.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, RequestURITooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from cds import fhir_api, headers, health, metrics, openapi, pages, requestlog, smart
from cds.auth import Verifier, client_from_config, fetch_jwks
from cds.bodylimit import BoundedBody
from cds.config import Config, load_config
from cds.crd import hooks
from cds.crd import http as routes
from cds.crd.prefetch import order_prefetch
from cds.demo import demo_client
from cds.dtr import http as dtr_http
from cds.dtr import page as dtr_page
from cds.errors import CdsError, ConfigError, status_error, to_operation_outcome
from cds.pas import http as pas_http
from cds.pas import review, subscriptions_http
from cds.payers import PayerRegistry
from cds.runtime import Runtime, random_id, random_pa_id, utc_now
from cds.store import Store
from fhir_mappings.loader import load_mappings
from policies.loader import load_policies

log = logging.getLogger("cds")

MAX_REQUEST_TARGET = 4000  # characters of path and query; CDS Hooks and FHIR URLs are a few hundred at most


def _check_payers(config: Config, known: set[str]) -> None:
    for payer in config["payers"]:
        for pid in payer.get("policies", ()):
            if pid not in known:
                raise ConfigError(
                    f"payer '{payer['id']}' names policy '{pid}', which is not loaded "
                    f"(known: {', '.join(sorted(known))})"
                )


def build_runtime(
    config: Config,
    *,
    clock: Callable[[], datetime] | None = None,
    new_id: Callable[[], str] | None = None,
    new_pa_id: Callable[[], str] | None = None,
    jwks_fetch: Callable[[str], Mapping[str, Any]] | None = None,
) -> Runtime:
    mappings = load_mappings()
    policy_dir = Path(config["policy_dir"]) if config["policy_dir"] else None
    policies = load_policies(mappings, policy_dir)
    _check_payers(config, set(policies.policies))
    store = Store(config.database_url)
    store.init()
    clients = [client_from_config(c) for c in config["clients"]]
    if config["demo_client"]:
        clients.append(demo_client(Path(config["data_dir"])))
    verifier = None
    if config["auth_required"] or config["discovery_auth_required"]:
        verifier = Verifier(
            clients,
            store,
            leeway=int(config["jwt_leeway"]),
            max_age=int(config["jwt_max_age"]),
            cache_seconds=int(config["jwks_cache_seconds"]),
            fetch=jwks_fetch or fetch_jwks,
        )
    return Runtime(
        config=config,
        mappings=mappings,
        policies=policies,
        payers=PayerRegistry.from_config(config["payers"]),
        store=store,
        verifier=verifier,
        templates=order_prefetch(mappings),
        clock=clock or utc_now,
        new_id=new_id or random_id,
        new_pa_id=new_pa_id or random_pa_id,
    )


def create_app(
    config: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None, **hooks_for_tests: Any
) -> Flask:
    """The application. ``config`` overrides every other layer (tests pass it); ``environ`` replaces os.environ."""
    cfg = load_config(config, environ)
    requestlog.configure(cfg)
    rt = build_runtime(cfg, **hooks_for_tests)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(cfg["max_request_bytes"])
    app.wsgi_app = BoundedBody(app.wsgi_app, int(cfg["max_request_bytes"]))  # type: ignore[method-assign]
    if int(cfg["proxy_hops"]):  # the client's address (rate limits, logs) from X-Forwarded-For, set by our proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=int(cfg["proxy_hops"]))  # type: ignore[method-assign]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["cds"] = rt
    app.extensions["cds.services"] = {s.id: s for s in hooks.services(rt.templates)}
    app.register_blueprint(routes.bp)
    app.register_blueprint(fhir_api.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(smart.bp)
    app.register_blueprint(dtr_http.bp)
    app.register_blueprint(dtr_page.bp)
    app.register_blueprint(pas_http.bp)
    app.register_blueprint(review.bp)
    app.register_blueprint(subscriptions_http.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    requestlog.register(app)  # before the other request hooks: a request they refuse is logged and counted too
    metrics.register(app)
    headers.register(app)
    _register_errors(app)
    return app


def _error(error: CdsError) -> Response:
    """Every error in one shape: an OperationOutcome (as FHIR JSON under /fhir, plain JSON elsewhere)."""
    if request.path.startswith("/fhir"):
        return fhir_api.fhir_response(to_operation_outcome(error), error.http_status)
    return routes.json_response(to_operation_outcome(error), error.http_status)


def _limit_request_target() -> None:
    """414 for a request target (path and query) over MAX_REQUEST_TARGET characters, whatever server runs the app.

    Under ``cds serve`` gunicorn refuses a request line over 4,094 bytes before the app sees it (in the same shape,
    see :mod:`cds.server`); this limit sits just below that, so the answer does not depend on the server's."""
    env = request.environ
    target = env.get("RAW_URI") or env.get("REQUEST_URI") or request.full_path
    if len(target) > MAX_REQUEST_TARGET:
        raise RequestURITooLarge(
            f"The request target has {len(target)} characters; at most {MAX_REQUEST_TARGET} are accepted"
        )


def _register_errors(app: Flask) -> None:
    app.before_request(_limit_request_target)

    @app.errorhandler(CdsError)
    def cds_error(exc: CdsError) -> Response:
        return _error(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            limit = app.config["MAX_CONTENT_LENGTH"]
            return _error(status_error(413, f"The request body is over {limit} bytes, the most accepted"))
        resp = _error(status_error(exc.code or 500, exc.description or exc.name))
        allowed = getattr(exc, "valid_methods", None) if exc.code == 405 else None
        if allowed:  # RFC 9110 §15.5.6: a 405 says which methods the resource has
            resp.headers["Allow"] = ", ".join(sorted(allowed))
        return resp

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        incident = random_id()
        frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
        # the exception's message may quote request data, so only its type and where it happened are logged
        log.error("unhandled %s (incident %s)\n%s", type(exc).__name__, incident, frames)
        requestlog.annotate(incident=incident)
        return _error(CdsError(f"Internal error (incident {incident}); nothing about this request was changed"))
