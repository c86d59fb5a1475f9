"""The store, against SQLite (embedded default) and PostgreSQL (127.0.0.1:5432, database test)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
from conftest import PG_URL
from sqlalchemy import create_engine, text

from cds.store import AssertionRecord, PriorAuth, Store

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def record(aid: str, **kw: object) -> AssertionRecord:
    base = dict(
        assertion_id=aid,
        hook_instance="hi-1",
        payer_id="cigna",
        patient_key="pk",
        order_ref="MedicationRequest/1",
        policy="cigna-ip0356|1",
        product="novoseven-rt",
        decision="approved",
        covered="covered",
        pa_needed="satisfied",
        satisfied_pa_id="PA-1",
        questionnaire=None,
        extension={"url": "x"},
        trace={"criteria": [{"id": "IP0356-3A", "state": "met"}]},
    )
    base.update(kw)
    return AssertionRecord(**base)  # type: ignore[arg-type]


def test_a_token_id_is_accepted_once(store: Store) -> None:
    exp = NOW + timedelta(minutes=5)
    assert store.remember_token("iss", "jti-1", exp)
    assert not store.remember_token("iss", "jti-1", exp)
    assert store.remember_token("other-iss", "jti-1", exp)


def test_expired_token_ids_are_forgotten(store: Store) -> None:
    store.remember_token("iss", "old", NOW - timedelta(hours=2))
    store.remember_token("iss", "new", NOW + timedelta(hours=2))
    assert store.forget_expired_tokens(NOW) == 1
    assert store.remember_token("iss", "old", NOW + timedelta(minutes=1))
    assert not store.remember_token("iss", "new", NOW + timedelta(minutes=1))


def test_an_exchange_is_stored_with_its_assertions_and_authorizations(store: Store) -> None:
    pa = PriorAuth(
        "PA-1", "a-1", "cigna", "pk", "novoseven-rt", "cigna-ip0356", date(2026, 11, 23), date(2027, 11, 23), None
    )
    store.record_exchange(
        hook_instance="hi-1",
        service_id="order-sign",
        client_iss="iss",
        received_at=NOW,
        status=200,
        duration_ms=3,
        request='{"hook":"order-sign"}',
        response='{"cards":[]}',
        queried=["Patient/1"],
        records=[record("a-1", draft_response={"resourceType": "QuestionnaireResponse"})],
        prior=[pa],
    )
    rows = store.exchanges_for("hi-1")
    assert len(rows) == 1 and rows[0]["status"] == 200 and rows[0]["request"] == '{"hook":"order-sign"}'
    got = store.assertion("a-1")
    assert got is not None and got.trace["criteria"][0]["id"] == "IP0356-3A"
    assert got.draft_response == {"resourceType": "QuestionnaireResponse"}
    assert store.prior_auth("PA-1") == pa


def test_a_failed_exchange_write_keeps_nothing(store: Store) -> None:
    store.record_exchange(
        hook_instance="hi-1",
        service_id="s",
        client_iss=None,
        received_at=NOW,
        status=200,
        duration_ms=1,
        request="{}",
        response="{}",
        queried=[],
        records=[record("dup")],
        prior=[],
    )
    with pytest.raises(Exception):  # noqa: B017 - the duplicate assertion id violates the primary key
        store.record_exchange(
            hook_instance="hi-2",
            service_id="s",
            client_iss=None,
            received_at=NOW,
            status=200,
            duration_ms=1,
            request="{}",
            response="{}",
            queried=[],
            records=[record("dup")],
            prior=[],
        )
    assert store.exchanges_for("hi-2") == []


def test_active_prior_authorization_lookup_respects_validity(store: Store) -> None:
    pa = PriorAuth(
        "PA-9", "a-9", "cigna", "pk", "novoseven-rt", "cigna-ip0356", date(2026, 1, 1), date(2026, 12, 31), None
    )
    store.record_exchange(
        hook_instance="hi",
        service_id="s",
        client_iss=None,
        received_at=NOW,
        status=200,
        duration_ms=1,
        request="{}",
        response="{}",
        queried=[],
        records=[],
        prior=[pa],
    )
    assert store.active_prior_auth("cigna", "pk", "novoseven-rt", "cigna-ip0356", date(2026, 6, 1)) == pa
    assert store.active_prior_auth("cigna", "pk", "novoseven-rt", "cigna-ip0356", date(2027, 1, 1)) is None
    assert store.active_prior_auth("cigna", "other", "novoseven-rt", "cigna-ip0356", date(2026, 6, 1)) is None
    store.set_prior_auth_status("PA-9", "revoked")
    assert store.active_prior_auth("cigna", "pk", "novoseven-rt", "cigna-ip0356", date(2026, 6, 1)) is None


def test_questionnaires_are_saved_once(store: Store) -> None:
    store.save_questionnaire("q-1", "p|1", {"resourceType": "Questionnaire", "id": "q-1"})
    store.save_questionnaire("q-1", "p|1", {"resourceType": "Questionnaire", "id": "q-1"})
    assert store.questionnaire("q-1") == {"resourceType": "Questionnaire", "id": "q-1"}
    assert store.questionnaire("q-2") is None


def test_the_app_runs_on_postgres(make_app: object) -> None:
    """The whole order-sign path against the production store."""
    pytest.importorskip("psycopg")
    from builders import condition, coverage_info, hook_request, med_order
    from conftest import post_hook

    schema = f"cds_app_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        app = make_app(database_url=f"{PG_URL}?options=-csearch_path%3D{schema}")  # type: ignore[operator]
        resp = post_hook(app.test_client(), hook_request([med_order()], conditions=[condition("D68.311")]))
        assert resp.status_code == 200
        info = coverage_info(resp.get_json()["systemActions"][0]["resource"])
        assert app.extensions["cds"].store.prior_auth(info["satisfied-pa-id"][0]) is not None
        app.extensions["cds"].store.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


test_the_app_runs_on_postgres = pytest.mark.postgres(test_the_app_runs_on_postgres)
