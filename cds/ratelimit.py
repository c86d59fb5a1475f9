"""Rate limits that hold across every worker and process: a sliding window counted in the store.

A :class:`Limit` allows ``events`` per ``window`` seconds for one key (a client id, a network address) in one
``bucket``. :func:`check` raises :class:`RateLimited` (429, with the seconds to wait) when the key has used them all in
the last ``window`` seconds; :func:`record` counts one more. They are separate so that a caller can count only what
it means to limit (the token endpoint counts tokens issued per client, and refused requests per address).

Keys are stored as SHA-256 digests: the store never holds a client's address in the clear. Rows older than the window
are deleted as new ones are written, so the table stays as small as the traffic of one window.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Column, DateTime, Index, Integer, String, Table, delete, func, insert, select

from cds.errors import ClientError
from cds.runtime import Runtime, as_utc
from cds.store import metadata

rate_events = Table(
    "rate_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("bucket", String(32), nullable=False),
    Column("key_hash", String(64), nullable=False),  # SHA-256 of the key, hex
    Column("at", DateTime(timezone=True), nullable=False),
    Index("ix_rate_events", "bucket", "key_hash", "at"),
)


@dataclass(frozen=True)
class Limit:
    bucket: str
    events: int  # 0 turns the limit off
    window: int  # seconds


class RateLimited(ClientError):
    """Too many requests for one key; ``retry_after`` is how many seconds until one more is allowed."""

    http_status = 429
    issue_code = "throttled"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check(rt: Runtime, limit: Limit, key: str, message: str) -> None:
    """Nothing when ``key`` may make one more request now.

    :raise RateLimited: ``limit.events`` were recorded for ``key`` within the last ``limit.window`` seconds."""
    if limit.events <= 0:
        return
    now = as_utc(rt.clock())
    since = now - timedelta(seconds=limit.window)
    where = (rate_events.c.bucket == limit.bucket, rate_events.c.key_hash == _digest(key), rate_events.c.at > since)
    with rt.store.engine.connect() as conn:
        used, oldest = conn.execute(
            select(func.count(), func.min(rate_events.c.at)).select_from(rate_events).where(*where)
        ).one()
    if used < limit.events:
        return
    wait = (as_utc(oldest) + timedelta(seconds=limit.window) - now).total_seconds()
    raise RateLimited(message, max(1, math.ceil(wait)))


def record(rt: Runtime, limit: Limit, key: str) -> None:
    """Count one request of ``key`` now (and forget this bucket's requests older than the window)."""
    if limit.events <= 0:
        return
    now = as_utc(rt.clock())
    since = now - timedelta(seconds=limit.window)
    with rt.store.engine.begin() as conn:
        conn.execute(delete(rate_events).where(rate_events.c.bucket == limit.bucket, rate_events.c.at <= since))
        conn.execute(insert(rate_events).values(bucket=limit.bucket, key_hash=_digest(key), at=now))
