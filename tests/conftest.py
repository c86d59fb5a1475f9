from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient

from cds import create_app
from fhir_mappings.loader import Mappings, load_mappings
from policies.loader import PolicySet, load_policies

ROOT = Path(__file__).resolve().parent.parent
BASE = "http://cds.test"
TEST_ISS = "https://ehr.test/cds-client"
FIXED_NOW = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def mappings() -> Mappings:
    return load_mappings()


@pytest.fixture(scope="session")
def policies(mappings: Mappings) -> PolicySet:
    return load_policies(mappings)


class ClientKey:
    """A CDS client's signing key, as an EHR would hold it."""

    def __init__(self, kid: str = "test-es384") -> None:
        self.kid = kid
        self.key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "ES384"})
        self.jwks = {"keys": [jwk]}

    def token(
        self,
        aud: str,
        *,
        iss: str = TEST_ISS,
        lifetime: int = 300,
        headers: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": iss,
            "aud": aud,
            "exp": now + lifetime,
            "iat": now,
            "jti": secrets.token_hex(32),
            **claims,
        }
        for name in drop:
            body.pop(name, None)
        return jwt.encode(body, self.key, algorithm="ES384", headers={"kid": self.kid, "typ": "JWT", **(headers or {})})


@pytest.fixture(scope="session")
def client_key() -> ClientKey:
    return ClientKey()


@pytest.fixture
def make_app(tmp_path: Path, client_key: ClientKey) -> Iterator[Callable[..., Flask]]:
    """Build an app on a fresh SQLite store, a fixed clock and predictable ids. Authentication is off unless asked."""
    apps: list[Flask] = []

    def build(**config: Any) -> Flask:
        counter = itertools.count(1)
        pa_counter = itertools.count(1)
        settings = {
            "data_dir": str(tmp_path / "data"),
            "base_url": BASE,
            "auth_required": False,
            "demo_client": False,
            "clients": [{"iss": TEST_ISS, "jwks": client_key.jwks}],
            "log_level": "WARNING",
            **config,
        }
        app = create_app(
            settings,
            environ={},
            clock=lambda: FIXED_NOW,
            new_id=lambda: f"00000000-0000-4000-8000-{next(counter):012d}",
            new_pa_id=lambda: f"PA-TEST{next(pa_counter):05d}",
        )
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["cds"].store.dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def post_hook(client: FlaskClient, body: dict[str, Any], service: str = "order-sign", **kw: Any) -> Any:
    return client.post(f"/cds-services/{service}", json=body, **kw)
