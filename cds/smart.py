"""SMART Backend Services (SMART App Launch 2 "Backend Services"): the authorization DTR requires of its FHIR
endpoints (and PAS reuses).

``POST /auth/token`` exchanges a client assertion (``client_credentials`` grant, ``private_key_jwt``) for an access
token. The assertion is checked by :meth:`cds.auth.Verifier.verify_assertion`: the clients, JWK Sets, algorithm and
key fit, signature and ``jti`` replay store are the ones the CDS Hooks JWT uses. The access token is self-contained:
an HS256 JWT (``typ`` ``at+jwt``) signed with a key derived from the service secret (``token_secret``, or a random
secret made once in ``data_dir``), carrying the client id, the granted scope, ``exp`` and a ``jti``.

FHIR endpoints call :func:`require_scopes`. Errors of the token endpoint are RFC 6749 §5.2 JSON
(:class:`cds.errors.OAuthError`); every other error is the service's OperationOutcome.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import threading
from pathlib import Path
from typing import Any

import jwt
from flask import Blueprint, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState

from cds import ratelimit, requestlog, scopes
from cds.auth import MAX_TOKEN_CHARS, NO_TOKEN, Verifier, client_from_config
from cds.config import Config
from cds.demo import demo_client
from cds.errors import ConfigError, Forbidden, OAuthError, Unauthorized, to_oauth_error
from cds.logsafe import clean
from cds.runtime import Runtime, current

log = logging.getLogger("cds.smart")
bp = Blueprint("smart", __name__)

TOKEN_PATH = "/auth/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# what a client with no `scopes` of its own may be granted: DTR's and PAS's
SCOPES: tuple[str, ...] = (
    "system/Questionnaire.rs",
    "system/Library.rs",
    "system/ValueSet.rs",
    "system/QuestionnaireResponse.cu",  # answered DTR forms (POST /fhir/QuestionnaireResponse)
    "system/Subscription.cruds",  # PAS notifications (/fhir/Subscription)
    "system/Claim.cr",  # PAS Claim/$submit (c) and Claim/$inquire (r)
)
ACCESS_TYP = "at+jwt"  # RFC 9068: an access token is never mistaken for another JWT
SECRET_FILE = "token-secret"
MIN_SECRET_CHARS = 32
MAX_SCOPE_CHARS = 2_000  # a few dozen scopes
ASSERTION_REFUSED = (
    "The client assertion was not accepted: it must be a JWT (typ JWT, a kid) signed ES384 or RS384 by a key of the "
    "client's registered JWK Set, with iss = sub = the client id, aud = the token endpoint URL, exp at most five "
    "minutes ahead, and a jti not used before"
)

_secrets: dict[str, bytes] = {}  # by data_dir: read or made once per process
_secrets_lock = threading.Lock()


# --- the service secret -----------------------------------------------------------------------------------------------
def service_key(rt: Runtime, purpose: str) -> bytes:
    """The HMAC key for one use of the service secret (``access-token``, ``form-link``): derived per use, so a MAC
    made for one is never accepted as another."""
    return hmac.new(_secret(rt.config), purpose.encode(), hashlib.sha256).digest()


def _secret(config: Config) -> bytes:
    configured = str(config["token_secret"])
    if configured:
        return configured.encode()
    where = str(Path(config["data_dir"]).resolve())
    with _secrets_lock:
        found = _secrets.get(where)
        if found is None:
            found = _secrets[where] = _load_or_create(Path(where))
        return found


def _load_or_create(data_dir: Path) -> bytes:
    """``{data_dir}/token-secret``, made on first use with mode 0600. Made under a temporary name and linked into
    place, so concurrent starters agree on one secret and nobody reads a half-written file."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"{path}: the token secret is shorter than {MIN_SECRET_CHARS} characters; delete the file")
    return secret.encode()


# --- setup ------------------------------------------------------------------------------------------------------------
@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    rt = state.app.extensions.get("cds")
    if not isinstance(rt, Runtime):
        raise RuntimeError("register cds.smart.bp after app.extensions['cds'] holds the Runtime")
    cfg = rt.config
    if cfg["token_secret"] and len(str(cfg["token_secret"])) < MIN_SECRET_CHARS:
        raise ConfigError(f"token_secret: use at least {MIN_SECRET_CHARS} random characters")
    for name in ("access_token_seconds", "form_link_seconds"):
        if int(cfg[name]) < 1:
            raise ConfigError(f"{name}: must be at least 1 second")
    service_key(rt, "access-token")  # the secret file is made now, before gunicorn forks the workers
    state.app.extensions["cds.smart"] = rt.verifier or _own_verifier(rt)


def _own_verifier(rt: Runtime) -> Verifier:
    """The token endpoint's verifier when the hooks run without one (``auth_required`` off): same clients."""
    clients = [client_from_config(c) for c in rt.config["clients"]]
    if rt.config["demo_client"]:
        clients.append(demo_client(Path(rt.config["data_dir"])))
    return Verifier(
        clients,
        rt.store,
        leeway=int(rt.config["jwt_leeway"]),
        max_age=int(rt.config["jwt_max_age"]),
        cache_seconds=int(rt.config["jwks_cache_seconds"]),
    )


def _verifier() -> Verifier:
    found: Verifier = current_app.extensions["cds.smart"]
    return found


# --- the token endpoint -----------------------------------------------------------------------------------------------
def _oauth_json(body: Any, status: int) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")),
        status=status,
        mimetype="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


def _limits(rt: Runtime) -> tuple[ratelimit.Limit, ratelimit.Limit]:
    """(tokens issued per client, refused requests per network address), each per minute."""
    return (
        ratelimit.Limit("token-issued", int(rt.config["token_requests_per_minute"]), 60),
        ratelimit.Limit("token-refused", int(rt.config["token_refusals_per_minute"]), 60),
    )


@bp.post(TOKEN_PATH)
def token() -> Response:
    """Exchange a signed client assertion for an access token (SMART Backend Services, ``client_credentials``).

    Rate limited (:mod:`cds.ratelimit`): refused requests per network address are counted and, over
    ``token_refusals_per_minute``, every request from that address is answered 429 before its assertion is checked;
    tokens issued per verified client are limited to ``token_requests_per_minute``. Counting refusals by address and
    not by the client an assertion claims to be means no one can lock a client out by sending bad assertions in its
    name. A 429 carries ``Retry-After`` and the RFC 6749 error shape."""
    rt = current()
    _, refused = _limits(rt)
    address = request.remote_addr or "unknown"
    try:
        ratelimit.check(rt, refused, address, "Too many refused token requests from this address; try again later")
        body = _exchange(rt, _verifier())
    except ratelimit.RateLimited as exc:
        log.info("token request throttled (%s s)", exc.retry_after)
        resp = _oauth_json({"error": "invalid_request", "error_description": str(exc)}, 429)
        resp.headers["Retry-After"] = str(exc.retry_after)
        return resp
    except OAuthError as exc:
        log.info("token request refused: %s (%s)", exc.error, clean(exc.reason, 120))
        ratelimit.record(rt, refused, address)
        return _oauth_json(to_oauth_error(exc), exc.http_status)
    if random.random() < 0.002:  # now and then, forget token ids that have expired
        rt.store.forget_expired_tokens()
    return _oauth_json(body, 200)


def _exchange(rt: Runtime, verifier: Verifier) -> dict[str, Any]:
    if request.mimetype != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "Send the token request as application/x-www-form-urlencoded")
    form = request.form
    for name in ("grant_type", "client_assertion_type", "client_assertion", "scope", "client_id"):
        if len(form.getlist(name)) > 1:
            raise OAuthError("invalid_request", f"{name} is given more than once")
    grant_type = form.get("grant_type")
    if not grant_type:
        raise OAuthError("invalid_request", "grant_type is required (client_credentials)")
    if grant_type != "client_credentials":
        raise OAuthError("unsupported_grant_type", "Only grant_type=client_credentials is supported")
    assertion_type = form.get("client_assertion_type")
    if not assertion_type:
        raise OAuthError("invalid_request", f"client_assertion_type is required ({ASSERTION_TYPE})")
    if assertion_type != ASSERTION_TYPE:
        raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = form.get("client_assertion")
    if not assertion:
        raise OAuthError("invalid_request", "client_assertion is required (a JWT signed by the client)")
    requested = form.get("scope") or ""
    if not requested.strip():
        raise OAuthError("invalid_scope", "scope is required: space-separated SMART scopes, e.g. system/Library.rs")
    if len(requested) > MAX_SCOPE_CHARS:
        raise OAuthError("invalid_scope", f"scope is longer than {MAX_SCOPE_CHARS} characters")
    try:
        client = verifier.verify_assertion(assertion, f"{rt.base_url}{TOKEN_PATH}")
    except Unauthorized as exc:
        raise OAuthError("invalid_client", ASSERTION_REFUSED, status=401, reason=exc.reason) from None
    if form.get("client_id") not in (None, client.iss):
        raise OAuthError("invalid_client", "client_id is not the assertion's iss", status=401, reason="client_id")
    allowed = [s for s in map(scopes.parse, client.scopes if client.scopes is not None else SCOPES) if s is not None]
    granted = " ".join(scopes.grant(requested.split(), allowed))
    if not granted:
        raise OAuthError(
            "invalid_scope", "None of the requested scopes can be granted to this client", reason=requested
        )
    issued, _ = _limits(rt)
    ratelimit.check(rt, issued, client.iss, "This client was issued too many access tokens lately; reuse the last one")
    access_token, lifetime = _issue(rt, client.iss, granted)
    ratelimit.record(rt, issued, client.iss)
    log.info("access token issued to %s: %s", clean(client.iss), clean(granted, 200))
    return {"access_token": access_token, "token_type": "bearer", "expires_in": lifetime, "scope": granted}


def _issue(rt: Runtime, client_id: str, scope: str) -> tuple[str, int]:
    lifetime = int(rt.config["access_token_seconds"])
    now = int(rt.clock().timestamp())
    claims = {
        "iss": rt.base_url,
        "aud": rt.base_url,
        "sub": client_id,
        "client_id": client_id,
        "scope": scope,
        "iat": now,
        "exp": now + lifetime,
        "jti": secrets.token_urlsafe(16),
    }
    signed = jwt.encode(claims, service_key(rt, "access-token"), algorithm="HS256", headers={"typ": ACCESS_TYP})
    return signed, lifetime


# --- discovery --------------------------------------------------------------------------------------------------------
@bp.get("/.well-known/smart-configuration")
@bp.get("/fhir/.well-known/smart-configuration")  # SMART clients look it up under the FHIR base
def smart_configuration() -> Response:
    rt = current()
    body = {
        "token_endpoint": f"{rt.base_url}{TOKEN_PATH}",
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES384", "RS384"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": list(SCOPES),
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }
    return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")


# --- FHIR endpoints ---------------------------------------------------------------------------------------------------
def require_scopes(rt: Runtime, *needed: str) -> str | None:
    """The client id of the request's access token (``Authorization: Bearer``) when it grants every scope in
    ``needed`` (``system/*.rs`` and ``system/Questionnaire.read`` both grant ``system/Questionnaire.rs``; types match
    case-insensitively). None, checking nothing, when ``auth_required`` is off.

    :raise Unauthorized: no token, or one expired, forged, of another service or for a client no longer trusted:
        401 OperationOutcome with ``WWW-Authenticate: Bearer``.
    :raise Forbidden: a valid token without a needed scope: 403 OperationOutcome (issue code ``forbidden``).
    """
    if not rt.config["auth_required"]:
        return None
    wanted = [(text, scopes.parse(text)) for text in needed]
    for text, scope in wanted:
        if scope is None:
            raise ValueError(f"{text!r} is not a SMART system scope")
    try:
        claims = _access_claims(rt, request.headers.get("Authorization"))
    except Unauthorized as exc:
        challenge(rt, "" if exc.reason == NO_TOKEN else 'error="invalid_token"')
        raise
    granted = [s for s in map(scopes.parse, str(claims["scope"]).split()) if s is not None]
    missing = [text for text, scope in wanted if scope is not None and not scopes.covers(granted, scope)]
    if missing:
        challenge(rt, f'error="insufficient_scope", scope="{" ".join(missing)}"')
        raise Forbidden(f"The access token does not grant {' '.join(missing)}")
    requestlog.annotate(client_id=str(claims["client_id"]))
    return str(claims["client_id"])


def _access_claims(rt: Runtime, authorization: str | None) -> dict[str, Any]:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(NO_TOKEN)
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("token too long")
    try:
        if jwt.get_unverified_header(token).get("typ") != ACCESS_TYP:
            raise Unauthorized("not an access token")
        claims: dict[str, Any] = jwt.decode(
            token,
            service_key(rt, "access-token"),
            algorithms=["HS256"],
            audience=rt.base_url,
            issuer=rt.base_url,
            # time is the runtime's clock, checked below (PyJWT would use the wall clock)
            options={
                "require": ["iss", "aud", "exp", "jti", "client_id", "scope"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except (jwt.PyJWTError, TypeError, ValueError):
        raise Unauthorized("access token rejected") from None
    exp = claims["exp"]
    if not isinstance(exp, int | float) or exp <= rt.clock().timestamp():
        raise Unauthorized("access token expired")
    client_id, scope = claims["client_id"], claims["scope"]
    if not isinstance(client_id, str) or not isinstance(scope, str):
        raise Unauthorized("access token claims malformed")
    if client_id not in _verifier().clients:
        raise Unauthorized("client no longer trusted")
    return claims


def challenge(rt: Runtime, params: str = "") -> None:
    """The ``WWW-Authenticate`` header (RFC 6750 §3) for the 401 or 403 about to be raised (the app renders the
    error itself; :func:`_add_challenge` adds the header to that response, whichever blueprint answers)."""
    realm = rt.base_url.replace("\\", "").replace('"', "")
    g.cds_www_authenticate = f'Bearer realm="{realm}"' + (f", {params}" if params else "")


def verify_client_jwt(rt: Runtime, audience: str) -> dict[str, Any]:
    """The claims of the request's CDS client JWT (:meth:`cds.auth.Verifier.verify`) addressed to ``audience``,
    for the routes a CDS client calls directly (hooks, discovery, the draft QuestionnaireResponse).

    :raise Unauthorized: as the verifier does; the 401 carries a ``Bearer`` challenge (RFC 7235 §3.1)."""
    assert rt.verifier is not None
    try:
        return rt.verifier.verify(request.headers.get("Authorization"), audience)
    except Unauthorized as exc:
        challenge(rt, "" if exc.reason == NO_TOKEN else 'error="invalid_token"')
        raise


@bp.after_app_request
def _add_challenge(response: Response) -> Response:
    challenge = g.pop("cds_www_authenticate", None)
    if challenge and response.status_code in (401, 403):
        response.headers["WWW-Authenticate"] = challenge
    return response
