"""The store, hardened: one active authorization per reuse key (racing issues share it), no bearer token in the audit
record, and SQLite files readable by their owner only. Against SQLite and PostgreSQL where the database matters."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from builders import condition, hook_request, med_order
from conftest import post_hook
from flask import Flask
from hookcalls import decide
from sqlalchemy import insert, inspect, text
from sqlalchemy.exc import IntegrityError

import cds.app  # noqa: F401  (every table registers on cds.store.metadata)
from cds.store import PriorAuth, Store, metadata, prior_auths, redact_tokens, reuse_index

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TODAY = NOW.date()
TOKEN = "ehr-token-123"


def pa(pa_id: str, **kw: Any) -> PriorAuth:
    base: dict[str, Any] = dict(
        pa_id=pa_id,
        assertion_id=f"a-{pa_id}",
        payer_id="cigna",
        patient_key="pk",
        product="novoseven-rt",
        policy="cigna-ip0356|1",
        valid_from=TODAY,
        valid_to=date(2027, 11, 23),
        doses=None,
    )
    base.update(kw)
    return PriorAuth(**base)


def exchange(store: Store, request: str, hook_instance: str = "hi-1", prior: list[PriorAuth] | None = None) -> None:
    store.record_exchange(
        hook_instance=hook_instance,
        service_id="order-sign",
        client_iss=None,
        received_at=NOW,
        status=200,
        duration_ms=1,
        request=request,
        response="{}",
        queried=[],
        records=[],
        prior=prior or [],
    )


# --- one active authorization per reuse key ---------------------------------------------------------------------------


def test_racing_issues_under_one_key_share_one_authorization(store: Store) -> None:
    start = threading.Barrier(20)
    got: list[str] = []
    errors: list[BaseException] = []

    def issue(n: int) -> None:
        try:
            start.wait()
            got.append(store.issue_prior_auth(pa(f"PA-{n:02d}"), TODAY).pa_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=issue, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 20
    assert len(set(got)) == 1
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM prior_authorizations")).scalar() == 1


def test_the_database_refuses_a_second_active_authorization_for_a_key(store: Store) -> None:
    exchange(store, "{}", prior=[pa("PA-1")])
    with pytest.raises(IntegrityError):  # noqa: B017 - the unique index on the reuse key
        exchange(store, "{}", "hi-2", prior=[pa("PA-2")])
    assert store.exchanges_for("hi-2") == []
    exchange(store, "{}", "hi-3", prior=[pa("PA-3", patient_key="another")])  # another key is fine


def test_an_issue_reuses_the_valid_one_and_replaces_a_lapsed_or_revoked_one(store: Store) -> None:
    first = store.issue_prior_auth(pa("PA-1", valid_from=date(2025, 1, 1), valid_to=date(2025, 12, 31)), TODAY)
    assert first.pa_id == "PA-1"  # stored as given (its dates are the caller's)
    second = store.issue_prior_auth(pa("PA-2"), TODAY)
    assert second.pa_id == "PA-2"  # PA-1 lapsed before today
    assert store.prior_auth("PA-1").status == "expired"  # type: ignore[union-attr]
    assert store.issue_prior_auth(pa("PA-3"), TODAY).pa_id == "PA-2"
    store.set_prior_auth_status("PA-2", "revoked")
    assert store.issue_prior_auth(pa("PA-4"), TODAY).pa_id == "PA-4"
    assert store.active_prior_auth("cigna", "pk", "novoseven-rt", "cigna-ip0356|1", TODAY) == pa("PA-4")
    assert store.active_prior_auth("cigna", "pk", "novoseven-rt", "cigna-ip0356|2", TODAY) is None


FIRST_RELEASE_TABLES = {
    "hook_exchanges",
    "coverage_assertions",
    "prior_authorizations",
    "questionnaires",
    "seen_jwt_ids",
    "card_feedback",
}


def test_an_existing_database_gets_the_index_and_keeps_its_old_rows(store: Store) -> None:
    """A database made before the reuse key: no unique index, no migrations record (those releases predate both),
    and (from the old race, or an expired authorization and its successor) several active rows under one old key,
    whose policy is the bare id."""
    with store.engine.begin() as conn:
        reuse_index.drop(conn)
        conn.execute(text("DROP TABLE alembic_version"))
        for table in reversed(metadata.sorted_tables):  # and none of the tables added since
            if table.name not in FIRST_RELEASE_TABLES:
                table.drop(conn)
        for n in (1, 2):
            old = pa(f"OLD-{n}", policy="cigna-ip0356")
            conn.execute(insert(prior_auths).values(**{**old.__dict__, "created_at": NOW}))
    store.init()
    assert "ux_prior_auth_active_key" in {i["name"] for i in inspect(store.engine).get_indexes("prior_authorizations")}
    assert store.prior_auth("OLD-1") is not None and store.prior_auth("OLD-2") is not None
    assert store.issue_prior_auth(pa("PA-NEW"), TODAY).pa_id == "PA-NEW"  # the old key matches nothing
    assert store.issue_prior_auth(pa("PA-NEWER"), TODAY).pa_id == "PA-NEW"


# --- no bearer token in the audit record ------------------------------------------------------------------------------


def test_an_order_sign_with_fhir_authorization_is_kept_without_the_token(client: Any, app: Flask) -> None:
    body = hook_request([med_order()], conditions=[condition("D68.311")], fhir_server="http://127.0.0.1:9/fhir")
    body["fhirAuthorization"]["refresh_token"] = "ehr-refresh-456"
    decide(client, body)
    rows = app.extensions["cds"].store.exchanges_for(body["hookInstance"])
    assert len(rows) == 1
    everything = json.dumps(rows[0], default=str)
    assert TOKEN not in everything and "ehr-refresh-456" not in everything
    kept = json.loads(rows[0]["request"])
    assert kept["fhirAuthorization"]["access_token"] == "[redacted]"
    assert kept["fhirAuthorization"]["refresh_token"] == "[redacted]"
    assert kept["fhirAuthorization"]["scope"] == "patient/*.read"  # the rest as sent
    assert {k: v for k, v in kept.items() if k != "fhirAuthorization"} == {
        k: v for k, v in body.items() if k != "fhirAuthorization"
    }


def test_a_malformed_body_with_a_token_is_kept_without_it(client: Any, app: Flask) -> None:
    raw = '{"hook": "order-sign", "hookInstance": "x", "fhirAuthorization": {"access_token": "SECRET-1", "scope": '
    resp = client.post("/cds-services/order-sign", data=raw, content_type="application/json")
    assert resp.status_code == 400
    rows = app.extensions["cds"].store.exchanges_for("")
    assert len(rows) == 1 and "SECRET-1" not in rows[0]["request"]
    assert rows[0]["request"].startswith('{"hook": "order-sign", "hookInstance": "x"')  # the rest kept as it came


@pytest.mark.parametrize(
    "raw, secret",
    [
        ('{"fhirAuthorization": {"access_token": "S1"', "S1"),  # cut off after the token
        ('{"fhirAuthorization": {"access_token": "S2-cut-of', "S2-cut-of"),  # cut off inside it
        ('{"a": "b, "fhirAuthorization": {"access_token": "S3"}}', "S3"),  # a lost quote before it
        ('{"fhirAuthorization": {"access\\u005ftoken": "S4"}, }', "S4"),  # its name written with an escape
        ('{"fhirAuthorization": {"refresh_token": "S5", "access_token": 12345}', "12345"),
        ('{"fhirAuthorization": {"access_token": "S6"}, "x": ' + "[" * 10_000 + "]" * 10_000 + "}", "S6"),
        ('{"n": ' + "9" * 5000 + ', "fhirAuthorization": {"access_token": "S7"}}', "S7"),  # too long a number
    ],
)
def test_a_body_that_does_not_parse_is_redacted_by_pattern(raw: str, secret: str) -> None:
    kept = redact_tokens(raw)
    assert secret not in kept and "[redacted]" in kept


def test_a_body_that_parses_is_redacted_in_its_structure() -> None:
    body = {"hook": "order-sign", "fhirAuthorization": {"access_token": "S1", "token_type": "Bearer"}, "é": "ü"}
    kept = json.loads(redact_tokens(json.dumps(body, indent=2)))
    assert kept == {**body, "fhirAuthorization": {"access_token": "[redacted]", "token_type": "Bearer"}}
    # a repeated name: the parser keeps the last, the first may not be kept either
    repeated = '{"fhirAuthorization": {"access_token": "S2"}, "fhirAuthorization": null}'
    assert "S2" not in redact_tokens(repeated)
    escaped = '{"fhirAuthorization": {"access\\u005ftoken": "S3"}, "fhirAuthorization": null}'
    assert "S3" not in redact_tokens(escaped)
    plain = '{"hook": "order-sign",  "context": {}}'
    assert redact_tokens(plain) == plain  # nothing to redact: kept byte for byte


def test_a_deep_body_reaching_the_store_is_kept_without_the_token(store: Store) -> None:
    deep = '{"fhirAuthorization": {"access_token": "DEEP"}, "x": ' + "[" * 10_000 + "]" * 10_000 + "}"
    exchange(store, deep)
    kept = store.exchanges_for("hi-1")[0]["request"]
    assert "DEEP" not in kept and kept.endswith("]" * 10_000 + "}")


# --- SQLite files readable by their owner only ---------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_database_and_the_directories_made_for_it_are_owner_only(tmp_path: Path, umask_022: None) -> None:
    outside = mode(tmp_path)
    db = tmp_path / "made" / "data" / "cds.sqlite3"
    s = Store(f"sqlite:///{db}")
    try:
        s.init()
        exchange(s, "{}")
        assert mode(tmp_path / "made") == 0o700 and mode(tmp_path / "made" / "data") == 0o700
        assert mode(db) == 0o600
        for companion in ("-wal", "-shm"):  # the open WAL database's files, made by SQLite
            assert mode(Path(f"{db}{companion}")) == 0o600, companion
    finally:
        s.dispose()
    assert mode(tmp_path) == outside  # a directory the store did not make is left as it is


def test_an_existing_database_and_its_wal_files_are_tightened(tmp_path: Path, umask_022: None) -> None:
    db = tmp_path / "cds.sqlite3"
    earlier = sqlite3.connect(db)  # as an earlier release left it: 0644, in WAL mode, -wal and -shm open
    try:
        earlier.execute("PRAGMA journal_mode=WAL")
        earlier.execute("CREATE TABLE t (x)")
        earlier.execute("INSERT INTO t VALUES (1)")
        earlier.commit()
        for name in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            os.chmod(name, 0o644)
        s = Store(f"sqlite:///{db}")
        try:
            s.init()
            assert [mode(p) for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))] == [0o600] * 3
        finally:
            s.dispose()
    finally:
        earlier.close()


def test_the_app_makes_its_data_directory_owner_only(
    make_app: Callable[..., Flask], tmp_path: Path, umask_022: None
) -> None:
    app = make_app()
    post_hook(app.test_client(), hook_request([med_order()], conditions=[condition("D68.311")]))
    assert mode(tmp_path / "data") == 0o700
    assert mode(tmp_path / "data" / "cds.sqlite3") == 0o600
