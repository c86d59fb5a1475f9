from __future__ import annotations

import itertools
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from cds import create_app
from cds.store import Store
from fhir_mappings.loader import Mappings, load_mappings
from policies.loader import PolicySet, load_policies

ROOT = Path(__file__).resolve().parent.parent
BASE = "http://cds.test"
TEST_ISS = "https://ehr.test/cds-client"
FIXED_NOW = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
PG_URL = os.environ.get("CDS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


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
    """Build an app on a fresh SQLite store, a fixed clock and predictable ids. Authentication is off unless asked.
    ``clock`` replaces the fixed clock, ``new_id`` the predictable ids, ``pa_prefix`` starts the PA ids (apps that
    share one data directory need their own)."""
    apps: list[Flask] = []

    def build(
        *,
        clock: Callable[[], Any] | None = None,
        new_id: Callable[[], str] | None = None,
        pa_prefix: str = "TEST",
        **config: Any,
    ) -> Flask:
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
            clock=clock or (lambda: FIXED_NOW),
            new_id=new_id or (lambda: f"00000000-0000-4000-8000-{next(counter):012d}"),
            new_pa_id=lambda: f"PA-{pa_prefix}{next(pa_counter):05d}",
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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store on SQLite and, in its own schema, on PostgreSQL (the production store)."""
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/cds.sqlite3")
        s.init()
        yield s
        s.dispose()
        return
    schema = f"cds_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    s = Store(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        s.init()
        yield s
    finally:
        s.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def post_hook(client: FlaskClient, body: dict[str, Any], service: str = "order-sign", **kw: Any) -> Any:
    return client.post(f"/cds-services/{service}", json=body, **kw)


# --- the browser tests (Debian's chromium driven by Playwright) ---------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    import shutil

    from browsing import CHROMIUM, CHROMIUM_ARGS
    from playwright import sync_api as playwright_api  # a dev dependency: missing, the browser tests fail

    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed (scripts/test installs it: apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def console() -> Any:
    from browsing import Console

    return Console()


@pytest.fixture
def context(browser: Any, console: Any) -> Iterator[Any]:
    from browsing import WAIT_MS

    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    ctx.set_default_timeout(WAIT_MS)
    ctx.on("page", console.watch)
    yield ctx
    ctx.close()
