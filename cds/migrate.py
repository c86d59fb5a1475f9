"""Bringing a store to the current schema: the Alembic migrations in ``cds/migrations``, applied on start.

One code path for SQLite and PostgreSQL. A database made before migrations existed (its tables made by
``create_all``) is recognised by its tables and no ``alembic_version``: it is stamped at the revision its tables
match (0001, the CRD releases' schema with the reuse index they added on start; 0002 with DTR's) and upgraded from
there, so its data stays. On PostgreSQL an advisory lock keeps two processes starting at once from migrating
together; on SQLite the database's write lock does the same.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Index, inspect, text

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# what releases before migrations left, by the revision that describes it: a database is stamped at the newest one
# whose tables it has (create_all made every table of its release), then upgraded
MADE_BEFORE_MIGRATIONS = (
    ("0001", {"hook_exchanges", "coverage_assertions", "prior_authorizations", "questionnaires", "seen_jwt_ids"}),
    ("0002", {"assertion_records", "questionnaire_responses", "form_errors"}),
)
_LOCK = 7_221_084_001  # pg_advisory_lock key of this service's migrations


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this code knows."""
    found = ScriptDirectory.from_config(_config()).get_current_head()
    assert found is not None
    return found


def current(engine: Engine) -> str | None:
    """The revision a database is at (None: not migrated yet)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, reuse_index: Index | None = None) -> None:
    """Apply every migration the database lacks. ``reuse_index`` is created first on a database from before
    migrations that lacks it (releases before the reuse key created it on start)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and "coverage_assertions" in tables:
            if reuse_index is not None:
                reuse_index.create(conn, checkfirst=True)
            command.stamp(_config(conn), _made_before(tables))
        command.upgrade(_config(conn), "head")


def _made_before(tables: set[str]) -> str:
    """The revision a database from before migrations is at: the newest whose tables (and its predecessors') it has."""
    found, needed = MADE_BEFORE_MIGRATIONS[0][0], set()
    for revision, made in MADE_BEFORE_MIGRATIONS:
        needed |= made
        if not needed <= tables:
            break
        found = revision
    return found
