"""The delivery worker: sends what :mod:`cds.pas.notify` put in the outbox, from a daemon thread in each server
process (started after gunicorn forks, :func:`start_for`).

* **Claim with a lease.** A due row (not delivered, ``next_attempt_at <= now``) is claimed by moving its
  ``next_attempt_at`` ahead by the lease, in one conditional ``UPDATE … WHERE id = ? AND next_attempt_at <= now``:
  of workers racing for a row (threads, processes, hosts sharing one database) exactly one updates it, the same on
  SQLite and PostgreSQL. The lease is longer than a delivery may take (a hard deadline cuts the connection), so a
  row is never sent by two workers at once; the result is recorded only while the claim still holds.
* **Durable.** Nothing is held in memory: a worker stopped or killed mid-way leaves the row claimed until its lease
  ends, then any worker sends it (at least once: a crash after the receiver answered and before the result was
  written sends it again; ``events-since-subscription-start`` lets the receiver see that).
* **Retries.** A 2xx answer is delivered (a handshake makes its subscription ``active``). Anything else (another
  status, no connection, too slow) counts an attempt and waits ``min(cap, base * 2 ** (attempts - 1))``, of which
  a random half (jitter), before the next; after ``notify_max_attempts`` the row is given up and the subscription is
  ``error``. Rows of a subscription that is off, in error or deleted are given up when their turn comes.
* **Bounded.** One POST at a time per process, ``notify_timeout_seconds`` in all (connect, send, answer), no
  redirects followed, no proxy from the environment, the answer's body never read.
* **Lifetime.** Each poll (at most every :data:`SWEEP_SECONDS`) turns ``off`` the subscriptions whose ``end`` has
  passed (what they still had to receive is given up), and puts a ``heartbeat`` in the outbox for each active one
  with a heartbeat period that was sent nothing for that long; of workers racing, one puts it there (a conditional
  update of ``last_notified_at``).
* **Only to allowed addresses.** The endpoint's name is resolved when it is sent to and only global addresses, or
  those in ``notify_allowed_networks``, are connected to (:func:`cds.upstream.destination_policy`): a subscriber
  cannot make the service POST to its own network (cloud metadata, databases, admin consoles).

Logs name outbox rows and subscriptions, never the endpoint, the headers or what was sent.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import requests
from flask import Flask
from sqlalchemy import select, update

from cds.constants import LOOPBACK_NETWORKS
from cds.pas import notify
from cds.pas.notify import outbox, subscriptions
from cds.pas.store import audit
from cds.runtime import as_utc, utc_now
from cds.store import Store
from cds.upstream import AddressPolicy, CuttableAdapter, DestinationRefused, destination_policy

log = logging.getLogger("cds.pas.delivery")

BACKOFF_BASE = 2.0  # seconds before the second attempt
BACKOFF_CAP = 600.0  # at most ten minutes between attempts
BATCH = 20  # rows looked at per poll
MAX_CONNECT = 3.0
SWEEP_SECONDS = 5.0  # how often a worker looks for ended subscriptions and due heartbeats


class Delivery:
    def __init__(
        self,
        store: Store,
        *,
        poll_seconds: float = 1.0,
        max_attempts: int = 12,
        timeout: float = 5.0,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        lease_seconds: float | None = None,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        allowed: AddressPolicy | None = None,
        base_url: str = "",
    ) -> None:
        self.store = store
        self.base_url = base_url  # the subscriptions' references in heartbeats
        self._swept: datetime | None = None
        self.allowed = allowed or destination_policy(LOOPBACK_NETWORKS)
        self.poll_seconds = poll_seconds
        self.max_attempts = max(1, max_attempts)
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.lease = timedelta(seconds=lease_seconds if lease_seconds is not None else timeout + 30.0)
        self.clock = clock
        self.rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the thread ------------------------------------------------------------------------------------------------
    def start(self) -> Delivery:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="pas-delivery", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop and wait for it (a delivery in flight ends within its deadline)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5.0 if timeout is None else timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:  # the database away for a moment: try again at the next poll
                log.warning("notification delivery poll failed: %s", type(exc).__name__)
                busy = 0
            if not busy:
                self._stop.wait(self.poll_seconds)

    # --- one poll --------------------------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Sweep when it is time (:meth:`sweep`), then try every due row (up to a batch); how many this worker
        claimed."""
        now = self.clock()
        if self._swept is None or (now - self._swept).total_seconds() >= SWEEP_SECONDS:
            self._swept = now
            self.sweep()
        with self.store.engine.connect() as conn:
            due = (
                conn.execute(
                    select(outbox.c.id)
                    .where(outbox.c.delivered_at.is_(None), outbox.c.next_attempt_at <= now)
                    .order_by(outbox.c.next_attempt_at, outbox.c.id)
                    .limit(BATCH)
                )
                .scalars()
                .all()
            )
        claimed = 0
        for row_id in due:
            if self._stop.is_set():
                break
            if self.deliver(int(row_id)):
                claimed += 1
        return claimed

    def sweep(self) -> tuple[int, int]:
        """Turn off the subscriptions whose end has passed and put due heartbeats in the outbox; how many of each."""
        now = self.clock()
        live = subscriptions.c.status.in_(("requested", "active", "error"))
        with self.store.engine.begin() as conn:
            ended = [
                str(sid)
                for sid in conn.execute(
                    select(subscriptions.c.id).where(live, subscriptions.c.ends_at <= now)
                ).scalars()
            ]
            if ended:
                conn.execute(
                    update(subscriptions)
                    .where(subscriptions.c.id.in_(ended), live)
                    .values(status="off", updated_at=now)
                )
                conn.execute(
                    update(outbox)
                    .where(outbox.c.subscription_id.in_(ended), outbox.c.delivered_at.is_(None))
                    .values(next_attempt_at=None, last_error="the subscription ended")
                )
        for sid in ended:
            log.info("subscription %s ended and is off", sid)
        with self.store.engine.connect() as conn:
            wanted = [subscriptions.c[n] for n in ("id", "heartbeat_seconds", "last_notified_at", "created_at")]
            candidates = conn.execute(
                select(*wanted).where(
                    subscriptions.c.status == "active", subscriptions.c.heartbeat_seconds.is_not(None)
                )
            ).all()
        beats = 0
        for sid, period, last, created in candidates:
            if (now - as_utc(last or created)).total_seconds() >= int(period):
                beats += self._heartbeat(str(sid), last, now)
        return len(ended), beats

    def _heartbeat(self, sub_id: str, last: datetime | None, now: datetime) -> int:
        """Put one heartbeat in the outbox unless another worker did since ``last`` was read; 1 when this one did."""
        since = subscriptions.c.last_notified_at
        with self.store.engine.begin() as conn:
            claimed = conn.execute(
                update(subscriptions)
                .where(subscriptions.c.id == sub_id, since.is_(None) if last is None else since == last)
                .values(last_notified_at=now)
            ).rowcount
            if claimed != 1:
                return 0
            count = conn.execute(
                select(subscriptions.c.events_since_start).where(subscriptions.c.id == sub_id)
            ).scalar()
            payload = notify.heartbeat_bundle(self.base_url, sub_id, events_since_start=int(count or 0), at=now)
            notify.add_to_outbox(conn, sub_id, "heartbeat", payload, at=now)
        return 1

    def claim(self, row_id: int) -> datetime | None:
        """Claim one due row; the lease's end (the claim's token), or None when it is not due or another has it."""
        now = self.clock()
        until = now + self.lease
        with self.store.engine.begin() as conn:
            result = conn.execute(
                update(outbox)
                .where(outbox.c.id == row_id, outbox.c.delivered_at.is_(None), outbox.c.next_attempt_at <= now)
                .values(next_attempt_at=until)
            )
        return until if result.rowcount == 1 else None

    def deliver(self, row_id: int) -> bool:
        """Claim ``row_id`` and send it once; False when another worker has it or it is not due."""
        until = self.claim(row_id)
        if until is None:
            return False
        with self.store.engine.connect() as conn:
            row = conn.execute(
                select(
                    outbox.c.kind,
                    outbox.c.payload,
                    outbox.c.attempts,
                    outbox.c.subscription_id,
                    subscriptions.c.endpoint,
                    subscriptions.c.headers,
                    subscriptions.c.status,
                    subscriptions.c.resource,
                    subscriptions.c.ends_at,
                )
                .select_from(outbox.outerjoin(subscriptions, subscriptions.c.id == outbox.c.subscription_id))
                .where(outbox.c.id == row_id)
            ).first()
        if row is None:
            return True
        kind, payload, attempts, sub_id, endpoint, headers, status, resource, ends_at = row
        if status not in ("requested", "active"):
            self._give_up(row_id, until, f"the subscription is {status or 'deleted'}")
            return True
        if ends_at is not None and as_utc(ends_at) <= self.clock():
            self._give_up(row_id, until, "the subscription ended")
            return True
        error = self._post(endpoint, payload.encode(), _headers(headers, resource))
        if error is None:
            self._delivered(row_id, until, kind, sub_id)
        else:
            self._failed(row_id, until, int(attempts or 0) + 1, sub_id, error)
        return True

    # --- results ---------------------------------------------------------------------------------------------------
    def _held(self, row_id: int, until: datetime) -> Any:
        return (outbox.c.id == row_id) & (outbox.c.next_attempt_at == until) & outbox.c.delivered_at.is_(None)

    def _delivered(self, row_id: int, until: datetime, kind: str, sub_id: str) -> None:
        with self.store.engine.begin() as conn:
            done = conn.execute(
                update(outbox)
                .where(self._held(row_id, until))
                .values(delivered_at=self.clock(), attempts=outbox.c.attempts + 1, last_error=None)
            ).rowcount
            if done and kind == "handshake":
                conn.execute(
                    update(subscriptions)
                    .where(subscriptions.c.id == sub_id, subscriptions.c.status == "requested")
                    .values(status="active", updated_at=utc_now())
                )
            if done:
                self._audit(conn, row_id, sub_id, kind, "delivered")
        if done:
            log.info("notification %s (%s) delivered for subscription %s", row_id, kind, sub_id)
        else:
            log.warning("notification %s was delivered after its lease ended", row_id)

    def _failed(self, row_id: int, until: datetime, attempts: int, sub_id: str, error: str) -> None:
        final = attempts >= self.max_attempts
        retry_at = None if final else self.clock() + timedelta(seconds=self.backoff(attempts))
        with self.store.engine.begin() as conn:
            held = conn.execute(
                update(outbox)
                .where(self._held(row_id, until))
                .values(attempts=attempts, next_attempt_at=retry_at, last_error=error[:500])
            ).rowcount
            if held and final:
                conn.execute(
                    update(subscriptions)
                    .where(subscriptions.c.id == sub_id, subscriptions.c.status.in_(("requested", "active")))
                    .values(status="error", updated_at=utc_now())
                )
                self._audit(conn, row_id, sub_id, "notification", "given up", attempts=attempts)
        if not held:
            log.warning("notification %s: attempt %s ended after its lease (%s)", row_id, attempts, error)
        elif final:
            log.warning("notification %s given up after %s attempts (%s)", row_id, attempts, error)
            log.warning("subscription %s is in error", sub_id)
        else:
            log.info("notification %s attempt %s failed (%s); retried later", row_id, attempts, error)

    def _audit(self, conn: Any, row_id: int, sub_id: str, kind: str, outcome: str, **more: Any) -> None:
        """The audit event of a notification's fate (delivered, given up), about the PAS request it concerns; in
        the transaction that records it on the outbox row."""
        request_id = conn.execute(select(outbox.c.request_id).where(outbox.c.id == row_id)).scalar()
        audit(
            conn,
            kind="notification",
            actor="delivery",
            subject=request_id,
            at=self.clock(),
            detail={"outbox": row_id, "subscription": sub_id, "kind": kind, "outcome": outcome, **more},
        )

    def _give_up(self, row_id: int, until: datetime, why: str) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(update(outbox).where(self._held(row_id, until)).values(next_attempt_at=None, last_error=why))

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure: exponential, capped, the second half jittered."""
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** min(attempts - 1, 30))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    # --- the POST --------------------------------------------------------------------------------------------------
    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> str | None:
        """Send once within the deadline; None on a 2xx answer, else what went wrong (safe to store and log)."""
        adapter = CuttableAdapter(self.allowed)
        session = requests.Session()
        session.trust_env = False
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        timer = threading.Timer(self.timeout, adapter.cut)
        timer.daemon = True
        timer.start()
        try:
            resp = session.post(
                url,
                data=body,
                headers=headers,
                timeout=(min(MAX_CONNECT, self.timeout), self.timeout),
                allow_redirects=False,
                stream=True,  # the answer's body is not read
            )
            resp.close()
        except requests.RequestException as exc:
            if isinstance(getattr(exc.args[0] if exc.args else None, "reason", None), DestinationRefused):
                return "not delivered (the endpoint's address is not allowed: notify_allowed_networks)"
            return f"not delivered ({type(exc).__name__})"
        finally:
            timer.cancel()
            session.close()
        if 200 <= resp.status_code < 300:
            return None
        return f"HTTP {resp.status_code}"


def _headers(stored: str, resource: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in json.loads(stored or "[]"):
        name, _, value = str(line).partition(":")
        out[name.strip()] = value.strip()
    try:
        payload = str(json.loads(resource).get("channel", {}).get("payload") or "")
    except (ValueError, AttributeError):
        payload = ""
    # the type the subscriber asked for: application/fhir+json, or application/json (Inferno's endpoint takes only
    # that); validated when the subscription was accepted
    out["Content-Type"] = payload.split(";")[0].strip() or "application/fhir+json"
    out["Accept"] = "application/fhir+json, application/json"
    return out


# --- one worker per process ------------------------------------------------------------------------------------------

_workers: dict[int, Delivery] = {}
_workers_lock = threading.Lock()


def start_for(app: Flask) -> Delivery | None:
    """Start this process's delivery worker for ``app`` (once per process: call it after gunicorn forks, in each
    worker); None when ``notify_delivery`` is off."""
    rt = app.extensions["cds"]
    if not rt.config["notify_delivery"]:
        return None
    with _workers_lock:
        worker = _workers.get(os.getpid())
        if worker is None or not worker.running:
            worker = Delivery(
                rt.store,
                poll_seconds=float(rt.config["notify_poll_seconds"]),
                max_attempts=int(rt.config["notify_max_attempts"]),
                timeout=float(rt.config["notify_timeout_seconds"]),
                allowed=destination_policy(rt.config["notify_allowed_networks"]),
                base_url=rt.base_url,
            ).start()
            _workers[os.getpid()] = worker
        return worker
