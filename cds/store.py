"""Storage: the audit record of every hook exchange, each coverage assertion with its determination and trace,
prior authorizations we issued, Questionnaires we publish, and seen JWT ids.

SQLite under the data directory by default, PostgreSQL when ``database_url`` names it; one code path (SQLAlchemy
Core). The engine is created lazily in each process, so a server that forks workers never shares a connection.
Patient data is stored here (the audit record CRD §found-37 requires) and never written to logs; the EHR's bearer tokens
are not stored (:func:`redact_tokens`), and the SQLite files are readable by their owner only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    insert,
    make_url,
    select,
    update,
)
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from cds import migrate

log = logging.getLogger("cds.store")
PG_CONNECT_TIMEOUT = 3  # seconds to open a PostgreSQL connection
PG_POOL_TIMEOUT = 10  # seconds a request waits for a pooled connection when all are busy
metadata = MetaData()

exchanges = Table(
    "hook_exchanges",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hook_instance", String(128), nullable=False, index=True),
    Column("service_id", String(64), nullable=False),
    Column("client_iss", String(512)),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("status", Integer, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("request", Text, nullable=False),
    Column("response", Text, nullable=False),
    Column("queried", Text),  # the EHR reads made for this exchange (JSON list)
)

assertions = Table(
    "coverage_assertions",
    metadata,
    Column("assertion_id", String(64), primary_key=True),
    Column("hook_instance", String(128), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("payer_id", String(64), nullable=False),
    Column("patient_key", String(128), nullable=False, index=True),
    Column("order_ref", String(128), nullable=False),
    Column("policy", String(128)),  # policy|version, or empty when no policy applies
    Column("product", String(64)),
    Column("decision", String(32), nullable=False),
    Column("covered", String(32), nullable=False),
    Column("pa_needed", String(32)),
    Column("satisfied_pa_id", String(64)),
    Column("questionnaire", String(512)),
    Column("extension", Text, nullable=False),  # the coverage-information extension as sent
    Column("trace", Text, nullable=False),  # every criterion with its state and evidence
    Column("draft_response", Text),  # the prepopulated QuestionnaireResponse, when one was made
)

prior_auths = Table(
    "prior_authorizations",
    metadata,
    Column("pa_id", String(64), primary_key=True),
    Column("assertion_id", String(64), nullable=False),
    Column("payer_id", String(64), nullable=False),
    Column("patient_key", String(128), nullable=False),  # the patient under one Coverage, hashed (cds.crd)
    Column("product", String(64), nullable=False),
    Column("policy", String(128), nullable=False),  # policy|version
    # active; expired (lapsed, when a successor is issued); superseded (a reviewer granted another under its key);
    # revoked (the PAS request that carried it was cancelled)
    Column("status", String(16), nullable=False),
    Column("valid_from", Date, nullable=False),
    Column("valid_to", Date),  # None: valid for its doses, not a period
    Column("doses", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_prior_auth_member", "payer_id", "patient_key", "product"),
)

# The reuse key of an authorization is payer, patient_key, product and policy|version, and at most one authorization
# per key is active: of racing first signs of one order, one insert wins and the others read it back
# (Store.issue_prior_auth). Rows written before the key named the policy version hold the bare policy id (and a
# patient_key of the member id alone): no lookup matches them any more, and they may repeat a key (an expired
# authorization and its successor were both left "active"), so they are outside the index.
_KEYED_ACTIVE = and_(prior_auths.c.status == "active", prior_auths.c.policy.like("%|%"))
reuse_index = Index(
    "ux_prior_auth_active_key",
    prior_auths.c.payer_id,
    prior_auths.c.patient_key,
    prior_auths.c.product,
    prior_auths.c.policy,
    unique=True,
    sqlite_where=_KEYED_ACTIVE,
    postgresql_where=_KEYED_ACTIVE,
)

questionnaires = Table(
    "questionnaires",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("policy", String(128), nullable=False),
    Column("resource", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# the record an assertion was made on (cds.records): patient data, read again only when answers settle it
assertion_records = Table(
    "assertion_records",
    metadata,
    Column("assertion_id", String(64), primary_key=True),
    Column("record", Text, nullable=False),
)

# answered DTR forms: each QuestionnaireResponse that settled an assertion, with what it settled it to
responses = Table(
    "questionnaire_responses",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("assertion_id", String(64), nullable=False, index=True),
    Column("questionnaire", String(512), nullable=False),
    Column("via", String(32), nullable=False),  # form (the page), fhir (POST QuestionnaireResponse), adaptive
    Column("decision", String(32), nullable=False),
    Column("resource", Text, nullable=False),  # the response as stored, with its coverage-information
    Column("received_at", DateTime(timezone=True), nullable=False),
)

# what DTR clients could not do with our forms ($log-questionnaire-errors; no patient data by DTR §oper-2)
form_errors = Table(
    "form_errors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("client_iss", String(512)),
    Column("questionnaires", Text, nullable=False),  # JSON list of canonicals
    Column("outcomes", Text, nullable=False),  # JSON list of OperationOutcomes
    Column("received_at", DateTime(timezone=True), nullable=False),
)

seen_tokens = Table(
    "seen_jwt_ids",
    metadata,
    Column("iss", String(512), primary_key=True),
    Column("jti", String(256), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)

feedback = Table(
    "card_feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service_id", String(64), nullable=False),
    Column("card", String(128), nullable=False, index=True),
    Column("outcome", String(16), nullable=False),
    Column("body", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class AssertionRecord:
    assertion_id: str
    hook_instance: str
    payer_id: str
    patient_key: str
    order_ref: str
    policy: str | None
    product: str | None
    decision: str
    covered: str
    pa_needed: str | None
    satisfied_pa_id: str | None
    questionnaire: str | None
    extension: Mapping[str, Any]
    trace: Any
    draft_response: Mapping[str, Any] | None = None
    record: Mapping[str, Any] | None = None  # the record it was made on (cds.records.snapshot), to settle it later


@dataclass(frozen=True)
class PriorAuth:
    pa_id: str
    assertion_id: str
    payer_id: str
    patient_key: str
    product: str
    policy: str
    valid_from: date
    valid_to: date | None
    doses: int | None
    status: str = "active"


def _prior_auth(row: RowMapping) -> PriorAuth:
    return PriorAuth(
        row["pa_id"],
        row["assertion_id"],
        row["payer_id"],
        row["patient_key"],
        row["product"],
        row["policy"],
        row["valid_from"],
        row["valid_to"],
        row["doses"],
        row["status"],
    )


def _key_is(payer_id: str, patient_key: str, product: str, policy: str) -> Any:
    return and_(
        prior_auths.c.payer_id == payer_id,
        prior_auths.c.patient_key == patient_key,
        prior_auths.c.product == product,
        prior_auths.c.policy == policy,
    )


def _prior_auth_row(pa: PriorAuth, created_at: datetime) -> dict[str, Any]:
    return {
        "pa_id": pa.pa_id,
        "assertion_id": pa.assertion_id,
        "payer_id": pa.payer_id,
        "patient_key": pa.patient_key,
        "product": pa.product,
        "policy": pa.policy,
        "status": pa.status,
        "valid_from": pa.valid_from,
        "valid_to": pa.valid_to,
        "doses": pa.doses,
        "created_at": created_at,
    }


def _now() -> datetime:
    return datetime.now(UTC)


# --- tokens out of the audit record ----------------------------------------------------------------------------------

REDACTED = "[redacted]"
TOKEN_KEYS = frozenset({"access_token", "refresh_token", "id_token"})
# a token member by its plain name, found without relying on where strings start (a malformed body may have lost a
# quote before it), and its value: a string (perhaps cut off by the end of the body) or any other scalar
_TOKEN_MEMBER = re.compile(r'((?:access|refresh|id)_token"\s*:\s*)("(?:[^"\\]|\\.)*"?|[^\s,}\]{\["]*)', re.IGNORECASE)
# any member and its value, the name as written: names with escapes ("access\u005ftoken") are decoded and compared.
# The two alternatives for a character of a string never overlap, so the scan is linear.
_MEMBER = re.compile(r'("((?:[^"\\]|\\.)*)"\s*:\s*)("(?:[^"\\]|\\.)*"?|[^\s,}\]{\["]*)')


def redact_tokens(text: str) -> str:
    """A hook request as it may be kept: every ``access_token``, ``refresh_token`` and ``id_token`` value (those of
    ``fhirAuthorization``, and any other a body carries) replaced by "[redacted]", the rest byte for byte.

    By pattern, in one linear pass, whether or not the body parses (what reaches the store may be hostile: malformed,
    nested too deep): a token member is found by its plain name, also after a lost quote, and by a name written with
    escapes. Parsing the body again here would cost more than the whole pattern pass."""
    text = _TOKEN_MEMBER.sub(lambda m: f'{m.group(1)}"{REDACTED}"', text)
    if "\\" not in text:
        return text

    def member(m: re.Match[str]) -> str:
        name = m.group(2)
        if "\\" not in name:
            return m.group(0)
        try:
            decoded = json.loads(f'"{name}"')
        except ValueError:
            return m.group(0)
        return f'{m.group(1)}"{REDACTED}"' if decoded.lower() in TOKEN_KEYS else m.group(0)

    return _MEMBER.sub(member, text)


# --- SQLite ---------------------------------------------------------------------------------------------------------


def _private_sqlite_file(path: str) -> None:
    """Make the SQLite database readable by its owner only, before anything connects: the directories the store
    creates are 0700, a new database file is created 0600, an existing one and its -wal and -shm files are tightened
    to 0600. (SQLite gives the -wal, -shm and -journal files it creates the database file's mode.)"""
    directory = os.path.dirname(os.path.abspath(path))
    missing: list[str] = []
    probe = directory
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        missing.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for created in missing:
        os.chmod(created, 0o700)  # makedirs applies the umask to the leaf and gives the parents it makes 0777 & ~umask
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    for name in (path, f"{path}-wal", f"{path}-shm"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            continue
        except PermissionError:
            log.warning("cannot make %s readable by its owner only: it belongs to another user", name)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class Store:
    def __init__(self, url: str, connect_args: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.connect_args = dict(connect_args or {})
        self._engine: Engine | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._published: set[str] = set()  # Questionnaire ids this process has saved (they never change)

    @property
    def engine(self) -> Engine:
        if self._engine is None or self._pid != os.getpid():
            with self._lock:
                if self._engine is None or self._pid != os.getpid():
                    self._engine = self._create_engine()
                    self._pid = os.getpid()
        return self._engine

    def _create_engine(self) -> Engine:
        if self.url.startswith("sqlite"):
            path = make_url(self.url).database
            if path and path != ":memory:" and not path.startswith("file:"):
                _private_sqlite_file(path)
            engine = create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": 10, **self.connect_args}
            )
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            # a database that does not answer fails a request (and /readyz) within seconds, not at the OS's TCP
            # timeout: libpq's connect_timeout for a new connection, the pool's timeout for a free one
            engine = create_engine(
                self.url,
                pool_size=8,
                max_overflow=8,
                pool_pre_ping=True,
                pool_timeout=PG_POOL_TIMEOUT,
                connect_args={"connect_timeout": PG_CONNECT_TIMEOUT, **self.connect_args},
            )
        return engine

    def init(self) -> None:
        """Bring the database to the current schema (:func:`cds.migrate.upgrade`: an existing one keeps its data)."""
        migrate.upgrade(self.engine, reuse_index)

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- JWT replay -------------------------------------------------------------------------------------------
    def remember_token(self, iss: str, jti: str, expires_at: datetime) -> bool:
        """Record a token id; False when it was seen before (a replay)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(seen_tokens).values(iss=iss, jti=jti, expires_at=expires_at))
        except IntegrityError:
            return False
        return True

    def forget_expired_tokens(self, now: datetime | None = None) -> int:
        with self.engine.begin() as conn:
            return conn.execute(delete(seen_tokens).where(seen_tokens.c.expires_at < (now or _now()))).rowcount

    # --- exchanges and assertions ----------------------------------------------------------------------------------
    def record_exchange(
        self,
        *,
        hook_instance: str,
        service_id: str,
        client_iss: str | None,
        received_at: datetime,
        status: int,
        duration_ms: int,
        request: str,
        response: str,
        queried: list[str],
        records: list[AssertionRecord],
        prior: tuple[PriorAuth, ...] = (),
    ) -> None:
        """The audit record of one hook call, with its assertions and any authorization given, in one transaction.
        The request is kept without the EHR's bearer tokens (:func:`redact_tokens`). The service itself stores the
        authorizations it issues when it issues them (:meth:`issue_prior_auth`) and gives none here."""
        kept = redact_tokens(request)
        with self.engine.begin() as conn:
            conn.execute(
                insert(exchanges).values(
                    hook_instance=hook_instance,
                    service_id=service_id,
                    client_iss=client_iss,
                    received_at=received_at,
                    status=status,
                    duration_ms=duration_ms,
                    request=kept,
                    response=response,
                    queried=json.dumps(queried) if queried else None,
                )
            )
            if records:
                conn.execute(
                    insert(assertions),
                    [
                        {
                            "assertion_id": r.assertion_id,
                            "hook_instance": r.hook_instance,
                            "created_at": received_at,
                            "payer_id": r.payer_id,
                            "patient_key": r.patient_key,
                            "order_ref": r.order_ref,
                            "policy": r.policy,
                            "product": r.product,
                            "decision": r.decision,
                            "covered": r.covered,
                            "pa_needed": r.pa_needed,
                            "satisfied_pa_id": r.satisfied_pa_id,
                            "questionnaire": r.questionnaire,
                            "extension": json.dumps(r.extension),
                            "trace": json.dumps(r.trace),
                            "draft_response": json.dumps(r.draft_response) if r.draft_response else None,
                        }
                        for r in records
                    ],
                )
            kept_records = [r for r in records if r.record is not None]
            if kept_records:
                conn.execute(
                    insert(assertion_records),
                    [{"assertion_id": r.assertion_id, "record": json.dumps(r.record)} for r in kept_records],
                )
            for pa in prior:
                conn.execute(insert(prior_auths).values(**_prior_auth_row(pa, received_at)))

    def exchanges_for(self, hook_instance: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(exchanges).where(exchanges.c.hook_instance == hook_instance).order_by(exchanges.c.id)
                )
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]

    def assertion(self, assertion_id: str) -> AssertionRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(assertions).where(assertions.c.assertion_id == assertion_id)).mappings().first()
        if row is None:
            return None
        return AssertionRecord(
            assertion_id=row["assertion_id"],
            hook_instance=row["hook_instance"],
            payer_id=row["payer_id"],
            patient_key=row["patient_key"],
            order_ref=row["order_ref"],
            policy=row["policy"],
            product=row["product"],
            decision=row["decision"],
            covered=row["covered"],
            pa_needed=row["pa_needed"],
            satisfied_pa_id=row["satisfied_pa_id"],
            questionnaire=row["questionnaire"],
            extension=json.loads(row["extension"]),
            trace=json.loads(row["trace"]),
            draft_response=json.loads(row["draft_response"]) if row["draft_response"] else None,
        )

    def assertion_record(self, assertion_id: str) -> dict[str, Any] | None:
        """The record snapshot an assertion was made on (None when it was kept without one)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(assertion_records.c.record).where(assertion_records.c.assertion_id == assertion_id)
            ).first()
        return json.loads(row[0]) if row else None

    def settle_assertion(
        self,
        assertion_id: str,
        *,
        was: str,
        response: Mapping[str, Any],
        questionnaire: str,
        via: str,
        decision: str,
        covered: str,
        pa_needed: str | None,
        satisfied_pa_id: str | None,
        still_asked: str | None,
        extension: Mapping[str, Any],
        trace: Any,
        received_at: datetime,
    ) -> bool:
        """Store an answered form and what it settled the assertion to, in one transaction: the response, and the
        assertion's new determination under the same id. ``was`` is the questionnaire canonical the assertion named
        when the answers were read; False (nothing stored) when another response settled it since."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(assertions)
                .where(and_(assertions.c.assertion_id == assertion_id, assertions.c.questionnaire == was))
                .values(
                    decision=decision,
                    covered=covered,
                    pa_needed=pa_needed,
                    satisfied_pa_id=satisfied_pa_id,
                    questionnaire=still_asked,
                    extension=json.dumps(extension),
                    trace=json.dumps(trace),
                )
            ).rowcount
            if changed != 1:
                return False
            conn.execute(
                insert(responses).values(
                    assertion_id=assertion_id,
                    questionnaire=questionnaire,
                    via=via,
                    decision=decision,
                    resource=json.dumps(response),
                    received_at=received_at,
                )
            )
        return True

    def responses_for(self, assertion_id: str) -> list[dict[str, Any]]:
        """The answered forms of an assertion, oldest first (each with its resource parsed)."""
        with self.engine.connect() as conn:
            rows = (
                conn.execute(select(responses).where(responses.c.assertion_id == assertion_id).order_by(responses.c.id))
                .mappings()
                .all()
            )
        return [{**dict(r), "resource": json.loads(r["resource"])} for r in rows]

    # --- prior authorizations ---------------------------------------------------------------------------------------
    def active_prior_auth(
        self, payer_id: str, patient_key: str, product: str, policy: str, today: date
    ) -> PriorAuth | None:
        """An authorization we issued under this reuse key (payer, patient_key, product, policy|version) that is still
        valid today."""
        for pa in self._active(payer_id, patient_key, product, policy):
            if pa.valid_from <= today and (pa.valid_to is None or pa.valid_to >= today):
                return pa
        return None

    def issue_prior_auth(self, candidate: PriorAuth, today: date) -> PriorAuth:
        """The authorization to answer with under the candidate's reuse key: the active one that is valid today, else
        the candidate, stored now (an active one that lapsed before today is marked "expired" in the same
        transaction). Compare the PA id with the candidate's to know whether it was issued by this call.

        At most one authorization per key is active (the unique index ``ux_prior_auth_active_key``): of calls that
        race to issue one, one insert wins and the others read the winner back, so all of them answer with one PA id.
        That is why it is stored here, before the answer is sent, and not with the exchange."""
        key = (candidate.payer_id, candidate.patient_key, candidate.product, candidate.policy)
        found = self.active_prior_auth(*key, today)
        if found is not None:
            return found
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    update(prior_auths)
                    .where(and_(_key_is(*key), prior_auths.c.status == "active", prior_auths.c.valid_to < today))
                    .values(status="expired")
                )
                conn.execute(insert(prior_auths).values(**_prior_auth_row(candidate, _now())))
        except IntegrityError:
            winner = next(iter(self._active(*key)), None)
            if winner is None:
                raise  # not the reuse key: e.g. the PA id is taken
            return winner
        return candidate

    def _active(self, payer_id: str, patient_key: str, product: str, policy: str) -> list[PriorAuth]:
        """The active authorizations under a reuse key, newest first."""
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(prior_auths)
                    .where(and_(_key_is(payer_id, patient_key, product, policy), prior_auths.c.status == "active"))
                    .order_by(prior_auths.c.created_at.desc())
                )
                .mappings()
                .all()
            )
        return [_prior_auth(row) for row in rows]

    def prior_auth(self, pa_id: str) -> PriorAuth | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(prior_auths).where(prior_auths.c.pa_id == pa_id)).mappings().first()
        return None if row is None else _prior_auth(row)

    def replace_prior_auth(self, conn: Connection, candidate: PriorAuth) -> list[str]:
        """Within the caller's transaction: store the candidate as the one active authorization under its reuse key,
        whatever was active under that key marked "superseded" (their ids are returned). For a reviewer's decision,
        which grants its own period whatever was issued before.

        :raise IntegrityError: an authorization under the key was issued meanwhile (the caller's transaction fails)."""
        key = _key_is(candidate.payer_id, candidate.patient_key, candidate.product, candidate.policy)
        found = conn.execute(select(prior_auths.c.pa_id).where(and_(key, prior_auths.c.status == "active"))).scalars()
        before = [str(pa_id) for pa_id in found]
        if before:
            conn.execute(update(prior_auths).where(prior_auths.c.pa_id.in_(before)).values(status="superseded"))
        conn.execute(insert(prior_auths).values(**_prior_auth_row(candidate, _now())))
        return before

    def revoke_prior_auths(self, conn: Connection, pa_ids: Iterable[str]) -> list[str]:
        """Within the caller's transaction: mark these authorizations "revoked" where they are active; the ids that
        were."""
        wanted = sorted(set(pa_ids))
        if not wanted:
            return []
        active = and_(prior_auths.c.pa_id.in_(wanted), prior_auths.c.status == "active")
        found = [str(pa_id) for pa_id in conn.execute(select(prior_auths.c.pa_id).where(active)).scalars()]
        if found:
            conn.execute(update(prior_auths).where(prior_auths.c.pa_id.in_(found)).values(status="revoked"))
        return found

    def set_prior_auth_status(self, pa_id: str, status: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(prior_auths).where(prior_auths.c.pa_id == pa_id).values(status=status))

    # --- questionnaires ---------------------------------------------------------------------------------------------
    def save_questionnaire(self, qid: str, policy: str, resource: Mapping[str, Any]) -> None:
        """Publish a Questionnaire; its id is a hash of its content, so saving it again changes nothing."""
        if qid in self._published:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(questionnaires).values(
                        id=qid, policy=policy, resource=json.dumps(resource), created_at=_now()
                    )
                )
        except IntegrityError:
            pass
        self._published.add(qid)

    def questionnaire_created(self, qid: str) -> datetime | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(questionnaires.c.created_at).where(questionnaires.c.id == qid)).first()
        if row is None:
            return None
        made: datetime = row[0]
        return made if made.tzinfo else made.replace(tzinfo=UTC)  # SQLite gives naive datetimes back

    def record_form_errors(
        self, client_iss: str | None, questionnaires_: list[str], outcomes: str, received_at: datetime
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(form_errors).values(
                    client_iss=client_iss,
                    questionnaires=json.dumps(questionnaires_),
                    outcomes=outcomes,
                    received_at=received_at,
                )
            )

    def questionnaire(self, qid: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(questionnaires.c.resource).where(questionnaires.c.id == qid)).first()
        return json.loads(row[0]) if row else None

    # --- feedback ---------------------------------------------------------------------------------------------------
    def record_feedback(self, service_id: str, items: list[Mapping[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(feedback),
                [
                    {
                        "service_id": service_id,
                        "card": str(item.get("card")),
                        "outcome": str(item.get("outcome")),
                        "body": json.dumps(item),
                        "received_at": _now(),
                    }
                    for item in items
                ],
            )
