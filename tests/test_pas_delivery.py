"""The notification delivery worker: retries with backoff, giving up, bounded POSTs, durability across a restart,
one delivery per row however many workers race (SQLite and PostgreSQL), and a request path that never waits on a
subscriber. The gunicorn server starts one worker per process and delivers a handshake end to end."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from conftest import ClientKey
from flask import Flask
from notify_receiver import Receiver, pas_response, subscription
from sqlalchemy import select

from cds.pas import notify
from cds.pas.delivery import Delivery, start_for
from cds.pas.notify import outbox, subscriptions
from cds.store import Store
from cds.upstream import destination_policy


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/cds.sqlite3")
    s.init()
    yield s
    s.dispose()


def _subscribe(store: Store, endpoint: str, status: str = "active") -> str:
    sid = str(uuid.uuid4())
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(
            subscriptions.insert().values(
                id=sid,
                owner=None,
                org_identifier=notify.org_list(["ORG"]),
                endpoint=endpoint,
                headers="[]",
                status=status,
                created_at=now,
                updated_at=now,
                resource=json.dumps(subscription(endpoint)),
                events_since_start=0,
            )
        )
    return sid


def _put(store: Store, sid: str, payload: Any, kind: str = "event") -> int:
    with store.engine.begin() as conn:
        row_id: int = notify.add_to_outbox(conn, sid, kind, payload)
    return row_id


def _row(store: Store, row_id: int) -> dict[str, Any]:
    with store.engine.connect() as conn:
        return dict(conn.execute(select(outbox).where(outbox.c.id == row_id)).mappings().one())


def _status(store: Store, sid: str) -> str:
    with store.engine.connect() as conn:
        return str(conn.execute(select(subscriptions.c.status).where(subscriptions.c.id == sid)).scalar())


def _until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_backoff_doubles_up_to_its_cap_with_jitter(sqlite_store: Store) -> None:
    d = Delivery(sqlite_store, backoff_base=2.0, backoff_cap=600.0, rng=random.Random(7))
    for attempts, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (9, 512.0), (10, 600.0), (200, 600.0)]:
        waits = [d.backoff(attempts) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1  # jittered


def test_a_receiver_failing_twice_gets_it_on_the_third_try_after_backing_off(
    sqlite_store: Store, receiver: Receiver
) -> None:
    sid = _subscribe(sqlite_store, receiver.url)
    row_id = _put(sqlite_store, sid, pas_response())
    receiver.fail_next = 2
    worker = Delivery(sqlite_store, poll_seconds=0.02, backoff_base=0.2, backoff_cap=2.0).start()
    try:
        receiver.wait_for(1)
    finally:
        worker.stop()
    first, second, third = receiver.attempts
    assert second - first >= 0.1  # at least half of 0.2 s
    assert third - second >= 0.2  # at least half of 0.4 s
    row = _row(sqlite_store, row_id)
    assert row["attempts"] == 3 and row["delivered_at"] is not None and row["last_error"] is None
    assert receiver.bodies() == [pas_response()]
    assert receiver.received[0][0]["Content-Type"] == "application/fhir+json"


def test_after_the_last_attempt_the_row_is_given_up_and_the_subscription_is_in_error(
    sqlite_store: Store, receiver: Receiver
) -> None:
    sid = _subscribe(sqlite_store, receiver.url)
    row_id = _put(sqlite_store, sid, {"n": 1})
    receiver.fail_next = 100
    worker = Delivery(sqlite_store, poll_seconds=0.02, max_attempts=3, backoff_base=0.02)
    for _ in range(3):
        _until(lambda: worker.run_once() > 0)
    row = _row(sqlite_store, row_id)
    assert (row["attempts"], row["next_attempt_at"], row["last_error"]) == (3, None, "HTTP 500")
    assert _status(sqlite_store, sid) == "error"
    later = _put(sqlite_store, sid, {"n": 2})
    assert worker.run_once() == 1
    assert _row(sqlite_store, later)["last_error"] == "the subscription is error"
    assert len(receiver.attempts) == 3  # nothing more was sent


def test_a_handshake_that_fails_is_retried_and_then_activates(sqlite_store: Store, receiver: Receiver) -> None:
    sid = _subscribe(sqlite_store, receiver.url, status="requested")
    _put(sqlite_store, sid, notify.handshake_bundle("http://cds.test", sid, datetime.now(UTC)), kind="handshake")
    receiver.fail_next = 1
    worker = Delivery(sqlite_store, backoff_base=0.02)
    _until(lambda: worker.run_once() > 0)
    assert _status(sqlite_store, sid) == "requested"
    _until(lambda: worker.run_once() > 0)
    assert _status(sqlite_store, sid) == "active"


def test_an_unreachable_or_slow_receiver_costs_one_bounded_attempt(sqlite_store: Store, receiver: Receiver) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    gone = _put(sqlite_store, _subscribe(sqlite_store, closed), {"n": 1})
    worker = Delivery(sqlite_store, timeout=0.5, backoff_base=30.0)
    assert worker.deliver(gone)
    assert _row(sqlite_store, gone)["last_error"] == "not delivered (ConnectionError)"
    slow = _put(sqlite_store, _subscribe(sqlite_store, receiver.url), {"n": 2})
    receiver.delay = 3.0
    started = time.monotonic()
    assert worker.deliver(slow)
    assert time.monotonic() - started < 2.0  # cut at the deadline, not when the receiver answers
    row = _row(sqlite_store, slow)
    assert row["attempts"] == 1 and row["delivered_at"] is None and row["last_error"].startswith("not delivered")


def test_the_address_policy_admits_public_and_listed_networks_only() -> None:
    allowed = destination_policy(["127.0.0.0/8", "10.20.0.0/16"])
    yes = ["8.8.8.8", "2606:4700:4700::1111", "127.0.0.1", "10.20.3.4", "::ffff:127.0.0.1"]
    no = ["10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1"]
    no += ["::1", "fe80::1", "fd00::1", "::ffff:10.0.0.1", "::", "not an address"]
    assert [a for a in yes if not allowed(a)] == [] and [a for a in no if allowed(a)] == []
    assert not destination_policy([])("127.0.0.1")


def test_a_name_that_resolves_to_a_refused_address_is_never_connected_to(
    sqlite_store: Store, receiver: Receiver
) -> None:
    """The endpoint's name is resolved at delivery: "localhost" passes the create check, and with loopback left out
    of the allowed networks nothing reaches the receiver on it."""
    endpoint = receiver.url.replace("127.0.0.1", "localhost")
    row_id = _put(sqlite_store, _subscribe(sqlite_store, endpoint), {"n": 1})
    worker = Delivery(sqlite_store, backoff_base=30.0, allowed=destination_policy([]))
    assert worker.deliver(row_id)
    row = _row(sqlite_store, row_id)
    assert row["delivered_at"] is None and "address is not allowed" in row["last_error"]
    assert receiver.attempts == []
    allowed = Delivery(sqlite_store, backoff_base=30.0, allowed=destination_policy(["127.0.0.0/8", "::1/128"]))
    again = _put(sqlite_store, _subscribe(sqlite_store, endpoint), {"n": 2})
    assert allowed.deliver(again) and _row(sqlite_store, again)["delivered_at"] is not None
    assert receiver.bodies() == [{"n": 2}]


class FakeClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def _set_sub(store: Store, sid: str, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(subscriptions.update().where(subscriptions.c.id == sid).values(**values))


def test_an_ended_subscription_is_sent_nothing_more_and_turned_off(store: Store, receiver: Receiver) -> None:
    now = datetime.now(UTC)
    sid = _subscribe(store, receiver.url)
    first, second = _put(store, sid, {"n": 1}), _put(store, sid, {"n": 2})
    _set_sub(store, sid, ends_at=now - timedelta(seconds=1))
    worker = Delivery(store, backoff_base=30.0)
    assert worker.deliver(first)
    assert _row(store, first)["last_error"] == "the subscription ended"
    assert worker.sweep() == (1, 0)
    assert _status(store, sid) == "off"
    assert _row(store, second)["next_attempt_at"] is None  # given up by the sweep
    assert receiver.attempts == []
    rt = SimpleNamespace(clock=lambda: now, base_url="http://cds.test")
    live = _subscribe(store, receiver.url)
    ended = _subscribe(store, receiver.url)
    _set_sub(store, ended, ends_at=now - timedelta(seconds=1))
    _set_sub(store, live, ends_at=now + timedelta(days=1))
    with store.engine.begin() as conn:
        assert notify.enqueue(conn, rt, org_identifier="ORG", bundle=pas_response(), request_id="r-1") == 1  # type: ignore[arg-type]
        assert [r["kind"] for r in notify.notifications_for(conn, ended)] == []


def test_a_heartbeat_goes_to_a_subscription_sent_nothing_for_its_period(store: Store, receiver: Receiver) -> None:
    start = datetime.now(UTC)
    sid = _subscribe(store, receiver.url)
    _set_sub(store, sid, heartbeat_seconds=60, last_notified_at=start, events_since_start=3)
    quiet = _subscribe(store, receiver.url)  # no heartbeat period: never one
    clock = FakeClock(start + timedelta(seconds=30))
    one, other = Delivery(store, clock=clock, base_url="http://cds.test"), Delivery(store, clock=clock)
    assert one.sweep() == (0, 0)
    clock.at = start + timedelta(seconds=61)
    assert (one.sweep(), other.sweep()) == ((0, 1), (0, 0))  # one heartbeat, however many workers
    with store.engine.connect() as conn:
        (row,) = notify.notifications_for(conn, sid)
        assert notify.notifications_for(conn, quiet) == []
    assert row["kind"] == "heartbeat" and one.deliver(int(row["id"]))
    (body,) = receiver.bodies()
    status = {p["name"]: p for p in body["entry"][0]["resource"]["parameter"]}
    assert status["type"]["valueCode"] == "heartbeat" and "notification-event" not in status
    assert status["events-since-subscription-start"]["valueString"] == "3"
    assert status["subscription"]["valueReference"]["reference"] == f"http://cds.test/fhir/Subscription/{sid}"
    # an event counts as something sent: the next heartbeat is a period after it
    with store.engine.begin() as conn:
        notify.add_to_outbox(conn, sid, "event", pas_response(), at=start + timedelta(seconds=100))
    clock.at = start + timedelta(seconds=150)
    assert one.sweep() == (0, 0)
    clock.at = start + timedelta(seconds=161)
    assert one.sweep() == (0, 1)


def test_a_row_survives_a_restart_and_is_delivered_once(tmp_path: Path, receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path}/restart.sqlite3"
    first = Store(url)
    first.init()
    sid = _subscribe(first, receiver.url)
    failed_once, claimed = _put(first, sid, {"n": 1}), _put(first, sid, {"n": 2})
    receiver.fail_next = 1
    old = Delivery(first, backoff_base=0.3, lease_seconds=0.5)
    assert old.deliver(failed_once)  # attempt 1 failed: waits for its backoff
    assert old.claim(claimed) is not None  # claimed, then the process dies before sending
    first.dispose()

    second = Store(url)  # the restarted server
    new = Delivery(second, poll_seconds=0.02, lease_seconds=0.5)
    assert new.run_once() == 0  # neither is due yet: one backs off, the other's lease holds
    new.start()
    try:
        bodies = receiver.wait_for(2)
        time.sleep(0.3)
    finally:
        new.stop()
        second.dispose()
    assert sorted(b["n"] for b in bodies) == [1, 2]
    assert len(receiver.received) == 2  # each once


def test_two_workers_never_deliver_one_row_twice(store: Store, receiver: Receiver) -> None:
    """Two workers, each with its own engine (as two processes would have), race on one database."""
    sid = _subscribe(store, receiver.url)
    rows = [_put(store, sid, {"n": i}) for i in range(40)]
    other = Store(store.url, connect_args=store.connect_args)
    workers = [Delivery(store), Delivery(other)]
    start = threading.Barrier(2)
    claimed = [0, 0]

    def run(i: int) -> None:
        start.wait()
        for _ in range(200):
            claimed[i] += workers[i].run_once()
            if len(receiver.received) >= len(rows):
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    other.dispose()
    numbers = sorted(b["n"] for b in receiver.bodies())
    assert numbers == list(range(40))  # every row once, none twice
    assert sum(claimed) == 40
    assert all(_row(store, r)["attempts"] == 1 for r in rows)


def test_a_hanging_subscriber_never_slows_a_request(make_app: Callable[..., Flask], receiver: Receiver) -> None:
    app = make_app()
    client = app.test_client()
    rt = app.extensions["cds"]
    receiver.delay = 3.0
    worker = Delivery(rt.store, poll_seconds=0.01, timeout=3.0).start()
    try:
        headers = {"Content-Type": "application/fhir+json"}
        sid = client.post("/fhir/Subscription", data=json.dumps(subscription(receiver.url)), headers=headers)
        sid = sid.get_json()["id"]
        _until(lambda: len(receiver.attempts) == 1)  # the worker is stuck in the handshake
        with rt.store.engine.begin() as conn:
            conn.execute(subscriptions.update().where(subscriptions.c.id == sid).values(status="active"))
        started = time.monotonic()
        for _ in range(5):
            resp = client.post("/fhir/Subscription", data=json.dumps(subscription(receiver.url)), headers=headers)
            assert resp.status_code == 201
            with rt.store.engine.begin() as conn:
                assert notify.enqueue(conn, rt, org_identifier="8189991234", bundle=pas_response(), request_id="r")
        assert time.monotonic() - started < 1.0  # five creations and five decisions' worth, while it hangs
    finally:
        worker.stop()


def test_start_for_starts_one_worker_per_process_and_obeys_the_setting(make_app: Callable[..., Flask]) -> None:
    off = make_app(notify_delivery=False)
    assert start_for(off) is None
    app = make_app(notify_poll_seconds=0.05)
    worker = start_for(app)
    try:
        assert worker is not None and worker.running and worker.poll_seconds == 0.05
        assert start_for(app) is worker
    finally:
        assert worker is not None
        worker.stop()


def test_cds_serve_delivers_the_handshake_from_its_workers(
    tmp_path: Path, client_key: ClientKey, receiver: Receiver
) -> None:
    from test_e2e import Server

    server = Server(tmp_path, client_key, auth_required=False, notify_poll_seconds=0.1)
    try:
        resp = requests.post(
            f"{server.base}/fhir/Subscription",
            data=json.dumps(subscription(receiver.url)),
            headers={"Content-Type": "application/fhir+json"},
            timeout=5,
        )
        assert resp.status_code == 201, resp.text
        sid = resp.json()["id"]
        [handshake] = receiver.wait_for(1, 15)
        assert handshake["entry"][0]["request"]["url"].endswith(f"Subscription/{sid}/$status")

        def active() -> bool:
            got = requests.get(f"{server.base}/fhir/Subscription/{sid}", timeout=5).json()
            return bool(got["status"] == "active")

        _until(active)
        time.sleep(0.5)
        assert len(receiver.received) == 1  # two gunicorn workers, one delivery
    finally:
        server.stop()
