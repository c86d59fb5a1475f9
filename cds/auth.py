"""Verifying the CDS Hooks JWT a client sends with every call (CDS Hooks 2.0 "Trusting CDS Clients").

The token must come from an allow-listed ``iss``, be signed ES384 or RS384 by a key of that client's JWK Set (inline
in the configuration, or fetched from its ``jwks_url`` and cached; a ``jku`` header must name that same URL), be
addressed to the exact URL invoked (``aud``), be current (``exp``, ``iat``), and carry a ``jti`` not seen before.
Any failure is a bare 401: the reason is kept on the exception for tests and never sent or logged with the token.
The same checks (issuer, key set, algorithm and key fit, signature, ``aud``, ``jti`` replay through the store) verify
the SMART Backend Services client assertion at the token endpoint (:meth:`Verifier.verify_assertion`, cds.smart).

A JWK Set is fetched within a hard deadline and size cap (:mod:`cds.upstream`), one fetch per issuer at a time and
never under a lock other issuers wait on: while a set is being refreshed, callers use the one they have.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from cds import jsonsafe
from cds.errors import MalformedJson, Unauthorized
from cds.store import Store
from cds.upstream import Reader, UpstreamError, origin_of

# the key each algorithm must be: a token whose header names one algorithm is never checked with another kind of key
ALGORITHMS: Mapping[str, tuple[str, str | None]] = {"ES384": ("EC", "P-384"), "RS384": ("RSA", None)}
JWKS_SECONDS = 2.0  # the whole fetch of a JWK Set, connect to last byte
JWKS_MAX_BYTES = 256_000
NO_TOKEN = "no bearer token"  # the reason of an Unauthorized for a request that sent no token at all
MAX_TOKEN_CHARS = 8_000  # a CDS Hooks JWT is a few hundred characters
ASSERTION_MAX_SECONDS = 300  # SMART Backend Services: a client assertion's exp is at most five minutes ahead


@dataclass(frozen=True)
class TrustedClient:
    iss: str
    jwks: Mapping[str, Any] | None = None  # inline JWK Set
    jwks_url: str | None = None
    tenant: str | None = None
    fhir_servers: tuple[str, ...] = field(default=())  # FHIR base URLs it may name in fhirServer
    scopes: tuple[str, ...] | None = None  # SMART scopes it may be granted at /auth/token; None: all offered
    # the sending-system ids (PAS org-identifier, X12 ISA06) whose notifications it may subscribe to
    org_identifiers: tuple[str, ...] = field(default=())


def fetch_jwks(url: str) -> Mapping[str, Any]:
    reader = Reader(
        connect_timeout=1.0,
        read_timeout=JWKS_SECONDS,
        budget_seconds=JWKS_SECONDS,
        max_bytes=JWKS_MAX_BYTES,
        headers={"Accept": "application/json"},
    )
    try:
        answer = reader.get(url)
    except UpstreamError as exc:
        raise ValueError(str(exc)) from None
    finally:
        reader.close()
    if answer.status != 200:
        raise ValueError(f"HTTP {answer.status}")
    body = jsonsafe.loads(answer.body, source="The JWK Set")
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise ValueError("not a JWK Set")
    return body


@dataclass(frozen=True)
class _Key:
    key: Any  # the public key PyJWT verifies with
    kty: str
    crv: str | None
    alg: str | None  # the algorithm the JWK itself names, if any

    def fits(self, alg: str) -> bool:
        """Whether this is a key of the kind ``alg`` needs (kty, curve) and, when the JWK names one, for ``alg``."""
        kty, crv = ALGORITHMS[alg]
        return self.kty == kty and (crv is None or self.crv == crv) and self.alg in (None, alg)


@dataclass
class _KeySet:
    keys: dict[str, _Key] | None = None  # by kid; None until the first fetch succeeds
    fetched_at: float = float("-inf")
    tried_at: float = float("-inf")
    fetching: threading.Lock = field(default_factory=threading.Lock)


class Verifier:
    def __init__(
        self,
        clients: list[TrustedClient],
        store: Store,
        *,
        leeway: int,
        max_age: int,
        cache_seconds: int,
        fetch: Callable[[str], Mapping[str, Any]] = fetch_jwks,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.clients = {c.iss: c for c in clients}
        self.store = store
        self.leeway = leeway
        self.max_age = max_age
        self.cache_seconds = cache_seconds
        self.fetch = fetch
        self.clock = clock or (lambda: datetime.now(UTC))
        self._sets: dict[str, _KeySet] = {}
        self._lock = threading.Lock()  # guards the dict only, never held across a fetch

    def _key_set(self, client: TrustedClient, refresh: bool = False) -> dict[str, _Key]:
        """The client's keys. A stale set, or an unknown ``kid`` (at most every 10 s: key rotation, not a fetch per
        token), refetches; one thread fetches while the others use the set they have (or wait for the first)."""
        with self._lock:
            entry = self._sets.setdefault(client.iss, _KeySet())
        if client.jwks is not None:
            if entry.keys is None:
                entry.keys = _parse_jwks(client.jwks)
            return entry.keys
        assert client.jwks_url is not None
        asked = time.monotonic()
        stale = asked - entry.fetched_at >= self.cache_seconds
        # a stale set or an unknown kid refetches, but at most every 10 s: a JWKS host that is down is not asked again
        # on every token (the set held keeps serving)
        due = asked - entry.tried_at > 10
        if entry.keys is not None and not ((stale or refresh) and due):
            return entry.keys
        if entry.keys is not None:
            if not entry.fetching.acquire(blocking=False):
                return entry.keys  # another thread is refreshing it: use what we have
        elif not entry.fetching.acquire(timeout=JWKS_SECONDS + 1):
            raise Unauthorized(f"JWK Set of {client.iss} unavailable (its fetch is still running)")
        try:
            if entry.tried_at > asked:  # fetched by another thread while this one waited
                if entry.keys is None:
                    raise Unauthorized(f"JWK Set of {client.iss} unavailable")
                return entry.keys
            entry.tried_at = time.monotonic()
            try:
                keys = _parse_jwks(self.fetch(client.jwks_url))
            except Exception as exc:  # noqa: BLE001 - any fetch failure is "no key", never a 500
                if entry.keys is not None:
                    return entry.keys
                raise Unauthorized(f"JWK Set of {client.iss} unavailable ({exc.__class__.__name__})") from None
            entry.keys, entry.fetched_at = keys, time.monotonic()
            return keys
        finally:
            entry.fetching.release()

    def verify(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """The verified claims of a CDS Hooks JWT, or :class:`Unauthorized`."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized(NO_TOKEN)
        client, claims = self._signed(authorization[7:].strip(), audience, ("iss", "aud", "exp", "iat", "jti"))
        now = self.clock()
        iat = claims["iat"]
        if not isinstance(iat, int | float) or iat > now.timestamp() + self.leeway:
            raise Unauthorized("issued in the future")
        if now.timestamp() - iat > self.max_age:
            raise Unauthorized("too old")
        if client.tenant is not None and claims.get("tenant") != client.tenant:
            raise Unauthorized("tenant not allowed")
        self._remember(client, claims)
        return claims

    def verify_assertion(self, assertion: str, audience: str) -> TrustedClient:
        """The client a SMART Backend Services client assertion authenticates (``iss`` = ``sub`` = client id,
        ``aud`` = the token endpoint, ``exp`` at most five minutes ahead, a new ``jti``), or :class:`Unauthorized`."""
        client, claims = self._signed(assertion, audience, ("iss", "sub", "aud", "exp", "jti"))
        if claims["sub"] != client.iss:
            raise Unauthorized("sub is not the client id")
        exp = claims["exp"]
        if not isinstance(exp, int | float) or exp > self.clock().timestamp() + ASSERTION_MAX_SECONDS + self.leeway:
            raise Unauthorized("exp more than five minutes ahead")
        self._remember(client, claims)
        return client

    def _signed(self, token: str, audience: str, required: tuple[str, ...]) -> tuple[TrustedClient, dict[str, Any]]:
        """The client that signed ``token`` and its claims: trusted ``iss``, ``typ`` JWT, a ``kid`` of the client's
        JWK Set whose key fits ``alg``, a valid signature, ``aud`` = ``audience``, current ``exp``, ``required``."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("token too long")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jsonsafe.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="), source="The token")
        except (jwt.PyJWTError, MalformedJson, ValueError, IndexError, RecursionError):
            raise Unauthorized("not a JWT") from None
        if not isinstance(unverified, dict):
            raise Unauthorized("not a JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise Unauthorized(f"algorithm {alg!r} not accepted")
        if header.get("typ") != "JWT":
            raise Unauthorized("typ must be JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("kid missing")
        iss = unverified.get("iss")
        client = self.clients.get(iss) if isinstance(iss, str) else None
        if client is None:
            raise Unauthorized("issuer not trusted")
        jku = header.get("jku")
        if jku is not None and jku != client.jwks_url:
            raise Unauthorized("jku is not the issuer's registered JWK Set")
        keys = self._key_set(client)
        if kid not in keys:
            keys = self._key_set(client, refresh=True)
        key = keys.get(kid)
        if key is None:
            raise Unauthorized("unknown kid")
        if not key.fits(alg):
            raise Unauthorized(f"key {kid!r} is not a key for {alg}")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=audience,
                issuer=client.iss,
                leeway=self.leeway,
                options={"require": list(required)},
            )
        except (
            jwt.PyJWTError,
            TypeError,
            ValueError,
        ) as exc:  # defence in depth (key.fits checks first)
            raise Unauthorized(f"rejected: {exc.__class__.__name__}") from None
        return client, claims

    def _remember(self, client: TrustedClient, claims: Mapping[str, Any]) -> None:
        """Record the token's ``jti`` until its ``exp`` (plus leeway) in the store all workers share; a replay fails."""
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise Unauthorized("jti missing")
        expires = datetime.fromtimestamp(float(claims["exp"]), UTC) + timedelta(seconds=self.leeway)
        if not self.store.remember_token(client.iss, jti, expires):
            raise Unauthorized("jti replayed")


def _parse_jwks(raw: Mapping[str, Any]) -> dict[str, _Key]:
    keys: dict[str, _Key] = {}
    for entry in raw.get("keys") or ():
        if not isinstance(entry, Mapping) or not entry.get("kid"):
            continue
        if entry.get("use") not in (None, "sig"):
            continue
        try:
            jwk = jwt.PyJWK(dict(entry))
        except (jwt.PyJWTError, TypeError, ValueError):
            continue
        crv, alg = entry.get("crv"), entry.get("alg")
        keys[str(entry["kid"])] = _Key(
            jwk.key, str(jwk.key_type), crv if isinstance(crv, str) else None, alg if isinstance(alg, str) else None
        )
    return keys


def client_from_config(raw: Mapping[str, Any]) -> TrustedClient:
    """A ``[[clients]]`` table. ``fhir_servers`` defaults to the origin of ``iss`` (none when ``iss`` is no URL)."""
    jwks = raw.get("jwks")
    if isinstance(jwks, str):
        jwks = json.loads(jwks)
    iss = str(raw["iss"])
    servers = raw.get("fhir_servers")
    if servers is None:
        own = origin_of(iss)
        servers = [own] if own else []
    scopes = raw.get("scopes")
    return TrustedClient(
        iss=iss,
        jwks=jwks,
        jwks_url=raw.get("jwks_url"),
        tenant=raw.get("tenant"),
        fhir_servers=tuple(servers),
        scopes=None if scopes is None else tuple(scopes),
        org_identifiers=tuple(str(x) for x in raw.get("org_identifiers") or ()),
    )
