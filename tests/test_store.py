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


def test_a_replacement_supersedes_only_its_key_and_revocation_only_active_ones(store: Store) -> None:
    def pa(pa_id: str, product: str, end: date) -> PriorAuth:
        return PriorAuth(pa_id, "a", "cigna", "pk", product, "cigna-ip0356|3", date(2026, 1, 1), end, None)

    first, other = pa("PA-1", "novoseven-rt", date(2026, 12, 31)), pa("PA-2", "sevenfact", date(2026, 12, 31))
    assert store.issue_prior_auth(first, date(2026, 6, 1)) == first
    assert store.issue_prior_auth(other, date(2026, 6, 1)) == other
    with store.engine.begin() as conn:
        assert store.replace_prior_auth(conn, pa("PA-3", "novoseven-rt", date(2026, 8, 31))) == ["PA-1"]
    found = store.active_prior_auth("cigna", "pk", "novoseven-rt", "cigna-ip0356|3", date(2026, 6, 1))
    assert found is not None and (found.pa_id, found.valid_to) == ("PA-3", date(2026, 8, 31))
    assert [store.prior_auth(i).status for i in ("PA-1", "PA-2")] == ["superseded", "active"]  # type: ignore[union-attr]
    with store.engine.begin() as conn:
        assert store.revoke_prior_auths(conn, ["PA-1", "PA-3", "PA-3", "PA-404"]) == ["PA-3"]
    assert store.active_prior_auth("cigna", "pk", "novoseven-rt", "cigna-ip0356|3", date(2026, 6, 1)) is None
    assert store.prior_auth("PA-1").status == "superseded"  # type: ignore[union-attr]


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
