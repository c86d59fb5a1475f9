"""Liveness and readiness (/healthz, /readyz) and the app-wide security headers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, text

from cds import migrate
from cds.headers import DEFAULT_CSP

REVIEWER = {"username": "rev", "name": "A Reviewer", "password_hash": "pbkdf2:sha256:1000$salt$00"}


def test_healthz_answers_without_io(client: Any) -> None:
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_readyz_is_ready_on_a_migrated_store_with_policies(client: Any) -> None:
    resp = client.get("/readyz")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json() == {"status": "ready", "checks": {"store": "ok", "policies": "ok", "migrations": "ok"}}
    assert resp.headers["Cache-Control"] == "no-store"


def test_readyz_needs_no_token(make_app: Callable[..., Flask]) -> None:
    client = make_app(auth_required=True, discovery_auth_required=True).test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_readyz_names_an_unreachable_store(app: Flask, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = app.extensions["cds"].store
    store.engine  # noqa: B018 (made now, so the replacement below is the one used in this process)
    bad = create_engine(f"sqlite:///{tmp_path}/no/such/dir/cds.sqlite3")
    monkeypatch.setattr(store, "_engine", bad)
    resp = app.test_client().get("/readyz")
    body = resp.get_json()
    assert resp.status_code == 503
    assert body["status"] == "unavailable" and body["failing"] == ["store"]
    assert body["checks"]["store"] == "unreachable (OperationalError)" and body["checks"]["policies"] == "ok"
    assert body["checks"]["migrations"] == "not checked (store unreachable)"
    assert "Traceback" not in resp.get_data(as_text=True) and str(tmp_path) not in resp.get_data(as_text=True)
    bad.dispose()


def test_readyz_names_a_database_behind_the_migrations_head(app: Flask) -> None:
    engine = app.extensions["cds"].store.engine
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    resp = app.test_client().get("/readyz")
    body = resp.get_json()
    assert resp.status_code == 503 and body["failing"] == ["migrations"]
    assert body["checks"]["migrations"] == f"database at 0001, code expects {migrate.head()}"
    assert body["checks"]["store"] == "ok" and body["checks"]["policies"] == "ok"


# --- security headers -----------------------------------------------------------------------------------------------


def _html(resp: Any) -> None:
    assert resp.mimetype == "text/html", resp.get_data(as_text=True)[:200]
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Referrer-Policy"] == "no-referrer"


def test_policy_pages_carry_the_default_csp_and_no_inline_style_or_script(client: Any) -> None:
    for path in ("/policies", "/policies/cigna-ip0356"):
        resp = client.get(path)
        assert resp.status_code == 200
        _html(resp)
        assert resp.headers["Content-Security-Policy"] == DEFAULT_CSP
        page = resp.get_data(as_text=True)
        assert "<style" not in page and "style=" not in page and "<script" not in page
    with client.get("/static/policies/policy.css") as css:
        assert css.status_code == 200 and css.mimetype == "text/css" and b".muted" in css.data
        assert css.headers["X-Content-Type-Options"] == "nosniff"


def test_the_dtr_page_keeps_its_own_csp(client: Any) -> None:
    from cds.dtr.page import PAGE_CSP

    resp = client.get("/dtr/00000000-0000-4000-8000-000000000001?t=not-a-link")
    _html(resp)
    assert resp.headers["Content-Security-Policy"] == PAGE_CSP and "'unsafe-inline'" in PAGE_CSP
    assert resp.headers["Cache-Control"] == "no-store"


def test_the_review_sign_in_page_keeps_its_own_headers(client: Any) -> None:
    from cds.pas.review import PAGE_CSP

    resp = client.get("/review/signin")
    assert resp.status_code == 200
    _html(resp)
    assert resp.headers["Content-Security-Policy"] == PAGE_CSP
    assert resp.headers["Cache-Control"] == "no-store"


def test_json_answers_and_errors_carry_nosniff(client: Any) -> None:
    for resp in (
        client.get("/cds-services"),
        client.get("/fhir/metadata"),
        client.get("/no/such/route"),
        client.post("/cds-services/order-sign", data="{", content_type="application/json"),
    ):
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Cache-Control"] == "no-store"
        assert "json" in resp.mimetype
        assert "X-Frame-Options" not in resp.headers and "Content-Security-Policy" not in resp.headers


def test_answers_with_patient_data_are_never_cached(client: Any) -> None:
    from builders import condition, hook_request, med_order

    resp = client.post("/cds-services/order-sign", json=hook_request([med_order()], conditions=[condition("D68.2")]))
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    for path in ("/policies", "/fhir/QuestionnaireResponse/unknown"):
        assert client.get(path).headers["Cache-Control"] == "no-store"


def test_static_assets_keep_their_own_caching(client: Any) -> None:
    with client.get("/static/policies/policy.css") as css:
        assert css.headers["Cache-Control"] == "no-cache"  # revalidated by ETag, never no-store
    with client.get("/dtr/assets/lforms/webcomponent/lhc-forms.js") as js:
        assert "immutable" in js.headers["Cache-Control"]
