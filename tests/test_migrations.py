"""Schema migrations (issue 9 item 7): a database made by the releases before migrations is upgraded in place with
its data, a new one is made by the migrations alone, and the migrations describe exactly the tables the code uses."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import PG_URL
from sqlalchemy import Engine, create_engine, insert, inspect, select, text

import cds.app  # noqa: F401  (every module with tables is imported, so each registers on cds.store.metadata)
from cds import migrate
from cds.store import (
    Store,
    assertions,
    exchanges,
    feedback,
    metadata,
    prior_auths,
    questionnaires,
    reuse_index,
    seen_tokens,
)

# the tables the releases before migrations (through issue 11) made with create_all, unchanged since
PREVIOUS_RELEASE = [exchanges, assertions, prior_auths, questionnaires, seen_tokens, feedback]
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """An empty database: a SQLite file, or a schema of its own on PostgreSQL. (url, connect_args)"""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/old.sqlite3", {}
        return
    schema = f"cds_mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield PG_URL, {"options": f"-csearch_path={schema}"}
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def previous_release(url: str, connect_args: dict[str, str]) -> Engine:
    """A database as the previous release left it, with an assertion and an authorization in it."""
    engine = create_engine(url, connect_args=connect_args)
    metadata.create_all(engine, tables=[t for t in PREVIOUS_RELEASE])
    reuse_index.create(engine, checkfirst=True)
    with engine.begin() as conn:
        conn.execute(
            insert(assertions).values(
                assertion_id="old-1",
                hook_instance="h-1",
                created_at=NOW,
                payer_id="cigna",
                patient_key="k",
                order_ref="MedicationRequest/mr-1",
                policy="cigna-ip0356|2",
                product="novoseven-rt",
                decision="approved",
                covered="covered",
                pa_needed="satisfied",
                satisfied_pa_id="PA-OLD",
                questionnaire=None,
                extension=json.dumps({"url": "x"}),
                trace=json.dumps({"decision": "approved"}),
            )
        )
        conn.execute(
            insert(prior_auths).values(
                pa_id="PA-OLD",
                assertion_id="old-1",
                payer_id="cigna",
                patient_key="k",
                product="novoseven-rt",
                policy="cigna-ip0356|2",
                status="active",
                valid_from=date(2026, 11, 30),
                valid_to=date(2027, 11, 29),
                created_at=NOW,
            )
        )
    return engine


def test_a_database_of_the_previous_release_is_upgraded_with_its_data(database: tuple[str, dict[str, str]]) -> None:
    url, args = database
    old = previous_release(url, args)
    assert migrate.current(old) is None
    store = Store(url, connect_args=args)
    store.init()
    try:
        assert migrate.current(store.engine) == migrate.head()
        assert {"assertion_records", "questionnaire_responses", "form_errors"} <= set(
            inspect(store.engine).get_table_names()
        )
        kept = store.assertion("old-1")
        assert kept is not None and kept.satisfied_pa_id == "PA-OLD"
        assert store.active_prior_auth("cigna", "k", "novoseven-rt", "cigna-ip0356|2", date(2026, 12, 1)) is not None
        store.init()  # a second start changes nothing
        assert migrate.current(store.engine) == migrate.head()
    finally:
        store.dispose()
        old.dispose()


def test_the_migrations_make_exactly_the_schema_the_code_uses(database: tuple[str, dict[str, str]]) -> None:
    """A new database made by the migrations alone matches the tables, columns and indexes of cds.store.metadata:
    a table the code adds without a migration fails here."""
    url, args = database
    engine = create_engine(url, connect_args=args)
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
            version = conn.execute(select(text("version_num")).select_from(text("alembic_version"))).scalar()
        assert diff == [], diff
        assert version == migrate.head()
    finally:
        engine.dispose()
