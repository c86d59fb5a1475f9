"""Verifying the CDS Hooks JWT a client sends with every call (CDS Hooks 2.0 "Trusting CDS Clients").

The token must come from an allow-listed ``iss``, be signed ES384 or RS384 by a key of that client's JWK Set (inline
in the configuration, or fetched from its ``jwks_url`` and cached; a ``jku`` header must name that same URL), be
addressed to the exact URL invoked (``aud``), be current (``exp``, ``iat``), and carry a ``jti`` not seen before.
Any failure is a bare 401: the reason is kept on the exception for tests and never sent or logged with the token.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import requests

from cds.errors import Unauthorized
from cds.store import Store

ALGORITHMS = ("ES384", "RS384")


@dataclass(frozen=True)
class TrustedClient:
    iss: str
    jwks: Mapping[str, Any] | None = None  # inline JWK Set
    jwks_url: str | None = None
    tenant: str | None = None


def fetch_jwks(url: str) -> Mapping[str, Any]:
    resp = requests.get(url, timeout=(1.0, 2.0), headers={"Accept": "application/json"})
    resp.raise_for_status()
    body = resp.json()
    if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
        raise ValueError("not a JWK Set")
    return body


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
        self._keys: dict[str, tuple[float, dict[str, Any]]] = {}  # iss -> (fetched at, {kid: PyJWK})
        self._lock = threading.Lock()

    def _key_set(self, client: TrustedClient, refresh: bool = False) -> dict[str, Any]:
        if client.jwks is not None:
            cached = self._keys.get(client.iss)
            if cached is None:
                cached = (time.monotonic(), _parse_jwks(client.jwks))
                self._keys[client.iss] = cached
            return cached[1]
        assert client.jwks_url is not None
        with self._lock:
            cached = self._keys.get(client.iss)
            fresh = cached is not None and time.monotonic() - cached[0] < self.cache_seconds
            # a refresh for an unknown kid is allowed at most every 10 seconds (key rotation, not a fetch per token)
            if cached is not None and fresh and not (refresh and time.monotonic() - cached[0] > 10):
                return cached[1]
            try:
                keys = _parse_jwks(self.fetch(client.jwks_url))
            except Exception as exc:  # noqa: BLE001 - any fetch failure is "no key", never a 500
                if cached is not None:
                    return cached[1]
                raise Unauthorized(f"JWK Set of {client.iss} unavailable ({exc.__class__.__name__})") from None
            self._keys[client.iss] = (time.monotonic(), keys)
            return keys

    def verify(self, authorization: str | None, audience: str) -> dict[str, Any]:
        """The verified claims, or :class:`Unauthorized`."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("no bearer token")
        token = authorization[7:].strip()
        try:
            header = jwt.get_unverified_header(token)
            unverified = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        except (jwt.PyJWTError, ValueError, IndexError):
            raise Unauthorized("not a JWT") from None
        if not isinstance(unverified, dict):
            raise Unauthorized("not a JWT")
        alg = header.get("alg")
        if alg not in ALGORITHMS:
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
        now = self.clock()
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=audience,
                issuer=client.iss,
                leeway=self.leeway,
                options={"require": ["iss", "aud", "exp", "iat", "jti"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"rejected: {exc.__class__.__name__}") from None
        iat = claims["iat"]
        if not isinstance(iat, int | float) or iat > now.timestamp() + self.leeway:
            raise Unauthorized("issued in the future")
        if now.timestamp() - iat > self.max_age:
            raise Unauthorized("too old")
        if client.tenant is not None and claims.get("tenant") != client.tenant:
            raise Unauthorized("tenant not allowed")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise Unauthorized("jti missing")
        expires = datetime.fromtimestamp(float(claims["exp"]), UTC) + timedelta(seconds=self.leeway)
        if not self.store.remember_token(client.iss, jti, expires):
            raise Unauthorized("jti replayed")
        return claims


def _parse_jwks(raw: Mapping[str, Any]) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for entry in raw.get("keys") or ():
        if not isinstance(entry, Mapping) or not entry.get("kid"):
            continue
        if entry.get("use") not in (None, "sig"):
            continue
        try:
            keys[str(entry["kid"])] = jwt.PyJWK(dict(entry))
        except jwt.PyJWTError:
            continue
    return keys


def client_from_config(raw: Mapping[str, Any]) -> TrustedClient:
    jwks = raw.get("jwks")
    if isinstance(jwks, str):
        jwks = json.loads(jwks)
    return TrustedClient(iss=str(raw["iss"]), jwks=jwks, jwks_url=raw.get("jwks_url"), tenant=raw.get("tenant"))
