"""The quick-start client: a P-384 key generated in the data directory, trusted when ``demo_client`` is on, so
``cds token`` can mint a CDS Hooks JWT for trying the service. Turn ``demo_client`` off in production."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cds.auth import TrustedClient
from cds.constants import LOOPBACK_FHIR_SERVERS
from cds.errors import CdsError
from cds.logsafe import clean

DEMO_ISS = "urn:cds:demo-client"
KEY_FILE = "demo-client-key.pem"


def _load_or_create(data_dir: Path) -> ec.EllipticCurvePrivateKey:
    path = data_dir / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key
    data_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pem)
    tmp.chmod(0o600)
    tmp.replace(path)
    return key


def public_jwk(key: ec.EllipticCurvePrivateKey, kid: str = "demo-1") -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "ES384"})
    return dict(jwk)


def demo_client(data_dir: Path) -> TrustedClient:
    key = _load_or_create(data_dir)
    # the quick start's EHR runs on this machine: the demo client may name a FHIR server on loopback only
    return TrustedClient(iss=DEMO_ISS, jwks={"keys": [public_jwk(key)]}, fhir_servers=LOOPBACK_FHIR_SERVERS)


def mint(data_dir: Path, audience: str, lifetime: int = 300) -> str:
    """A CDS Hooks JWT from the demo client for ``audience`` (the URL being called)."""
    key = _load_or_create(data_dir)
    now = int(time.time())
    claims = {"iss": DEMO_ISS, "aud": audience, "exp": now + lifetime, "iat": now, "jti": secrets.token_hex(32)}
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": "demo-1", "typ": "JWT"})


def mint_assertion(data_dir: Path, token_url: str, lifetime: int = 60) -> str:
    """A SMART Backend Services client assertion from the demo client for the token endpoint ``token_url``."""
    key = _load_or_create(data_dir)
    now = int(time.time())
    claims = {"iss": DEMO_ISS, "sub": DEMO_ISS, "aud": token_url, "exp": now + lifetime, "jti": secrets.token_hex(32)}
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": "demo-1", "typ": "JWT"})


def access_token(data_dir: Path, token_url: str, scope: str) -> str:
    """A SMART access token for the demo client from the running service's token endpoint ``token_url``."""
    import requests

    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": mint_assertion(data_dir, token_url),
    }
    try:
        resp = requests.post(token_url, data=form, timeout=10)
    except requests.RequestException as exc:
        raise CdsError(f"cannot reach {token_url} ({exc.__class__.__name__}); is the service running?") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise CdsError(f"{token_url} answered HTTP {resp.status_code}, not a token response")
    if resp.status_code != 200 or not isinstance(body.get("access_token"), str):
        problem = f"{clean(body.get('error'))}: {clean(body.get('error_description'), 300)}"
        raise CdsError(f"{token_url} refused the demo client (HTTP {resp.status_code}, {problem})")
    return str(body["access_token"])
