"""Storage: the audit record of every hook exchange, each coverage assertion with its determination and trace,
prior authorizations we issued, Questionnaires we publish, and seen JWT ids.

SQLite under the data directory by default, PostgreSQL when ``database_url`` names it; one code path (SQLAlchemy
Core). The engine is created lazily in each process, so a server that forks workers never shares a connection.
Patient data is stored here (the audit record CRD §found-37 requires) and never written to logs.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
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
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

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
    Column("patient_key", String(128), nullable=False),
    Column("product", String(64), nullable=False),
    Column("policy", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("valid_from", Date, nullable=False),
    Column("valid_to", Date),  # None: valid for its doses, not a period
    Column("doses", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_prior_auth_member", "payer_id", "patient_key", "product"),
)

questionnaires = Table(
    "questionnaires",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("policy", String(128), nullable=False),
    Column("resource", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
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


def _now() -> datetime:
    return datetime.now(UTC)


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
            path = self.url.split("///", 1)[-1]
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            engine = create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": 10, **self.connect_args}
            )
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(
                self.url, pool_size=8, max_overflow=8, pool_pre_ping=True, connect_args=self.connect_args
            )
        return engine

    def init(self) -> None:
        metadata.create_all(self.engine)

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
        prior: list[PriorAuth],
    ) -> None:
        """The audit record of one hook call, with its assertions and any authorization issued, in one transaction."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(exchanges).values(
                    hook_instance=hook_instance,
                    service_id=service_id,
                    client_iss=client_iss,
                    received_at=received_at,
                    status=status,
                    duration_ms=duration_ms,
                    request=request,
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
            for pa in prior:
                conn.execute(
                    insert(prior_auths).values(
                        pa_id=pa.pa_id,
                        assertion_id=pa.assertion_id,
                        payer_id=pa.payer_id,
                        patient_key=pa.patient_key,
                        product=pa.product,
                        policy=pa.policy,
                        status=pa.status,
                        valid_from=pa.valid_from,
                        valid_to=pa.valid_to,
                        doses=pa.doses,
                        created_at=received_at,
                    )
                )

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

    # --- prior authorizations ---------------------------------------------------------------------------------------
    def active_prior_auth(
        self, payer_id: str, patient_key: str, product: str, policy: str, today: date
    ) -> PriorAuth | None:
        """An authorization we issued for this patient and product that is still valid today."""
        with self.engine.connect() as conn:
            rows = (
                conn.execute(
                    select(prior_auths)
                    .where(
                        and_(
                            prior_auths.c.payer_id == payer_id,
                            prior_auths.c.patient_key == patient_key,
                            prior_auths.c.product == product,
                            prior_auths.c.policy == policy,
                            prior_auths.c.status == "active",
                            prior_auths.c.valid_from <= today,
                        )
                    )
                    .order_by(prior_auths.c.created_at.desc())
                )
                .mappings()
                .all()
            )
        for row in rows:
            if row["valid_to"] is None or row["valid_to"] >= today:
                return _prior_auth(row)
        return None

    def prior_auth(self, pa_id: str) -> PriorAuth | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(prior_auths).where(prior_auths.c.pa_id == pa_id)).mappings().first()
        return None if row is None else _prior_auth(row)

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
