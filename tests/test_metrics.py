"""GET /metrics: what is counted, under which labels (never a path's values, a query or patient data), who may scrape,
the gauges read from the store, and, against a real `cds serve` with two workers, one count whichever answers."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from builders import condition, ehr_chart, hook_request, med_order
from conftest import FIXED_NOW, ClientKey, post_hook
from fake_ehr import FakeEHR
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert
from test_dtr import completed, d68_2_order, draft_of
from test_dtr import submit as submit_form
from test_e2e import Server
from test_pas import pas_bundle, signed_order
from test_pas import submit as submit_claim

from cds import metrics
from cds.pas import service
from cds.pas.notify import outbox
from cds.pas.tables import pas_requests
from cds.store import Store

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(client: FlaskClient, **kw: Any) -> Samples:
    resp = client.get("/metrics", **kw)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "text/plain"
    return parse(resp.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(client: FlaskClient, action: Callable[[], Any], name: str, **labels: str) -> float:
    """How much one series grew over ``action`` (the metrics live per process; other tests count too)."""
    before = value(scrape(client), name, **labels)
    action()
    return value(scrape(client), name, **labels) - before


# --- requests ------------------------------------------------------------------------------------------------------


def test_a_request_counts_under_its_route_template_never_its_path_or_query(client: FlaskClient) -> None:
    path = "/fhir/QuestionnaireResponse/assert-4711-secret?patient=pat-0815&t=tok-99"
    route = "/fhir/QuestionnaireResponse/<assertion_id>"
    before = scrape(client)
    status = str(client.get(path).status_code)
    text = client.get("/metrics").get_data(as_text=True)
    after = parse(text)
    labels = {"route": route, "method": "GET", "status": status}
    assert value(after, "cds_http_requests_total", **labels) - value(before, "cds_http_requests_total", **labels) == 1
    count = "cds_http_request_duration_seconds_count"
    assert value(after, count, **labels) - value(before, count, **labels) == 1
    assert value(after, "cds_http_request_duration_seconds_bucket", le="+Inf", **labels) >= 1
    for secret in ("assert-4711-secret", "pat-0815", "tok-99"):
        assert secret not in text


def test_unmatched_paths_and_odd_methods_share_fixed_labels(client: FlaskClient) -> None:
    unmatched = {"route": "(unmatched)", "method": "GET", "status": "404"}
    assert delta(client, lambda: client.get("/no/such/Patient/pat-0815"), "cds_http_requests_total", **unmatched) == 1
    odd = {"route": "(unmatched)", "method": "other", "status": "405"}
    assert delta(client, lambda: client.open("/healthz", method="BREW"), "cds_http_requests_total", **odd) == 1
    assert "pat-0815" not in client.get("/metrics").get_data(as_text=True)


def test_the_histogram_buckets_span_milliseconds_to_seconds(client: FlaskClient) -> None:
    client.get("/healthz")
    les = {
        dict(labels)["le"]
        for (name, labels) in scrape(client)
        if name == "cds_http_request_duration_seconds_bucket" and dict(labels)["route"] == "/healthz"
    }
    assert {"0.001", "0.005", "0.01", "0.015", "1.0", "10.0", "+Inf"} <= les


# --- decisions -----------------------------------------------------------------------------------------------------


def test_an_order_sign_counts_one_crd_decision_by_policy_and_outcome(client: FlaskClient) -> None:
    met = hook_request([med_order()], conditions=[condition("D68.311")])
    labels = {"standard": "crd", "policy": "cigna-ip0356", "outcome": "covered:satisfied"}
    assert delta(client, lambda: post_hook(client, met), "cds_decisions_total", **labels) == 1
    no_policy = hook_request([med_order(code="J9999")])
    labels = {"standard": "crd", "policy": "(none)", "outcome": "covered:no-auth"}
    assert delta(client, lambda: post_hook(client, no_policy), "cds_decisions_total", **labels) == 1


def test_a_settled_form_counts_a_dtr_decision(client: FlaskClient) -> None:
    from builders import coverage_info

    resp = post_hook(client, d68_2_order())
    info = coverage_info(resp.get_json()["systemActions"][0]["resource"])
    qr = completed(draft_of(client, info))
    labels = {"standard": "dtr", "policy": "cigna-ip0356", "outcome": "covered:satisfied"}
    assert delta(client, lambda: submit_form(client, qr), "cds_decisions_total", **labels) == 1


def test_pas_items_and_reviewer_decisions_are_counted(client: FlaskClient, app: Flask) -> None:
    order = signed_order(client, d68_2_order())  # the indication is open: A4 pended
    pended = {"standard": "pas", "policy": "cigna-ip0356", "outcome": "A4"}
    assert delta(client, lambda: submit_claim(client, pas_bundle(order)), "cds_decisions_total", **pended) == 1
    rt = app.extensions["cds"]
    queued = service.pended(rt)[0]["id"]
    denied = {"policy": "cigna-ip0356", "outcome": "A3"}
    decide = lambda: service.decide(rt, queued, action="deny", reviewer="rev-1", reason="no")  # noqa: E731
    assert delta(client, decide, "cds_review_decisions_total", **denied) == 1


def test_decision_labels_come_from_closed_sets() -> None:
    assert metrics.coverage_outcome("covered", "satisfied") == "covered:satisfied"
    assert metrics.coverage_outcome("not-covered", None) == "not-covered"
    assert metrics.coverage_outcome("Jane Doe", None) == "other"
    assert metrics.coverage_outcome("covered", "123-45-6789") == "covered:other"
    assert metrics.resource_type("Condition?patient=pat-1") == "Condition"
    assert metrics.resource_type("Practitioner/pract-1") == "Practitioner"
    assert metrics.resource_type("http://ehr/fhir/Condition?page=2&patient=pat-1") == "other"
    assert metrics.resource_type("Smith/John") == "other"
    with pytest.raises(ValueError):
        metrics.decided("x12", None, "A1")


# --- EHR queries ---------------------------------------------------------------------------------------------------


def test_ehr_queries_are_timed_by_resource_type_and_failures_counted(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    with FakeEHR() as ehr:
        ehr.add(*ehr_chart())
        body = hook_request([med_order()], omit=("conditions",), fhir_server=ehr.base)
        ok = {"resource_type": "Condition", "outcome": "ok"}
        name = "cds_ehr_query_duration_seconds_count"
        assert delta(client, lambda: post_hook(client, body), name, **ok) == 1
        ehr.fail_status = 500
        body = hook_request([med_order()], omit=("conditions",), fhir_server=ehr.base)
        failed = {"resource_type": "Condition", "reason": "error"}
        assert delta(client, lambda: post_hook(client, body), "cds_ehr_query_failures_total", **failed) == 1
    text = client.get("/metrics").get_data(as_text=True)
    assert "pat-1" not in text and "127.0.0.1" not in text and "ehr-token-123" not in text


# --- who may scrape, and off ---------------------------------------------------------------------------------------


def test_a_metrics_token_is_required_when_set(make_app: Callable[..., Flask]) -> None:
    client = make_app(metrics_token="s3cret-scrape-token").test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-scrape-token"}):
        resp = client.get("/metrics", headers=headers)
        assert resp.status_code == 401 and resp.get_json()["resourceType"] == "OperationOutcome"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert scrape(client, headers={"Authorization": "Bearer s3cret-scrape-token"})


def test_metrics_off_serves_no_route_and_counts_nothing(make_app: Callable[..., Flask]) -> None:
    app = make_app(metrics=False)
    client = app.test_client()
    assert client.get("/metrics").status_code == 404
    assert all(b.name != "metrics" for b in app.blueprints.values())
    assert client.get("/healthz").status_code == 200


# --- the gauges read from the store --------------------------------------------------------------------------------


def _request_row(
    rid: str, *, status: str, priority: str, due_in: timedelta, superseded: bool = False
) -> dict[str, Any]:
    return {
        "id": rid,
        "submitter": "s",
        "bundle_key": rid,
        "claim_key": rid,
        "patient_key": "k",
        "payer_id": "cigna",
        "member_id": "m",
        "provider_key": "p",
        "org_identifier": "o",
        "status": status,
        "priority": priority,
        "drug": "d",
        "policy": "",
        "received_at": FIXED_NOW - timedelta(days=1),
        "due_at": FIXED_NOW + due_in,
        "updated_at": FIXED_NOW,
        "superseded_by": "later" if superseded else None,
        "request": "{}",
        "response": "{}",
        "explanation": "{}",
    }


def _outbox_row(*, pending: bool, delivered: bool = False, age: timedelta = timedelta(0)) -> dict[str, Any]:
    return {
        "subscription_id": "sub-1",
        "kind": "event",
        "payload": "{}",
        "attempts": 0,
        "next_attempt_at": FIXED_NOW if pending else None,
        "delivered_at": FIXED_NOW if delivered else None,
        "created_at": FIXED_NOW - age,
    }


def test_the_store_gauges_count_the_outbox_and_the_reviewer_queue(store: Store, app: Flask) -> None:
    hour = timedelta(hours=1)
    with store.engine.begin() as conn:
        conn.execute(
            insert(outbox),
            [
                _outbox_row(pending=True, age=90 * timedelta(seconds=1)),
                _outbox_row(pending=True, age=timedelta(seconds=5)),
                _outbox_row(pending=False),  # given up
                _outbox_row(pending=False, delivered=True),
            ],
        )
        conn.execute(
            insert(pas_requests),
            [
                _request_row("a", status="pended", priority="expedited", due_in=-hour),  # overdue
                _request_row("b", status="partial", priority="standard", due_in=hour),
                _request_row("c", status="pended", priority="standard", due_in=-hour),  # overdue
                _request_row("d", status="certified", priority="standard", due_in=-hour),  # not in the queue
                _request_row("e", status="pended", priority="standard", due_in=-hour, superseded=True),
            ],
        )
    rt = SimpleNamespace(store=store, clock=lambda: FIXED_NOW, policies=app.extensions["cds"].policies)
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in metrics.StoreCollector(rt).collect()
        for s in m.samples
    }  # type: ignore[arg-type]
    assert found[("cds_store_up", ())] == 1
    assert found[("cds_outbox_notifications", (("state", "pending"),))] == 2
    assert found[("cds_outbox_notifications", (("state", "given_up"),))] == 1
    assert found[("cds_outbox_oldest_pending_age_seconds", ())] == 90
    assert found[("cds_review_queue_requests", (("priority", "expedited"),))] == 1
    assert found[("cds_review_queue_requests", (("priority", "standard"),))] == 2
    assert found[("cds_review_queue_overdue_requests", (("priority", "expedited"),))] == 1
    assert found[("cds_review_queue_overdue_requests", (("priority", "standard"),))] == 1
    assert found[("cds_policy_info", (("policy", "cigna-ip0356"), ("version", "2")))] == 1


def test_a_store_that_does_not_answer_is_store_up_0_not_a_failed_scrape(app: Flask) -> None:
    class Down:
        @property
        def engine(self) -> Any:
            raise OSError("connection refused")

    rt = SimpleNamespace(store=Down(), clock=lambda: FIXED_NOW, policies=app.extensions["cds"].policies)
    found = [(s.name, s.value) for m in metrics.StoreCollector(rt).collect() for s in m.samples]  # type: ignore[arg-type]
    assert found == [("cds_store_up", 0)]


# --- several workers -----------------------------------------------------------------------------------------------


def _workers(master: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                found.append(int(entry))
    return sorted(found)


def _served(base: str) -> float:
    resp = requests.get(f"{base}/metrics", timeout=5, headers={"Connection": "close"})
    assert resp.status_code == 200
    return value(parse(resp.text), "cds_http_requests_total", route="/healthz", method="GET", status="200")


@pytest.mark.e2e
def test_two_workers_report_one_count_whichever_answers(tmp_path: Path, client_key: ClientKey) -> None:
    """One worker stopped (SIGSTOP) while the other serves the requests, then the other way round for the scrape:
    the scrape reads exactly what the other worker counted. A worker killed and replaced keeps its counts."""
    server = Server(tmp_path, client_key, demo_client=False)
    try:
        deadline = time.monotonic() + 20
        while len(workers := _workers(server.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) == 2, workers
        first, second = workers

        def healthz(n: int) -> None:
            for _ in range(n):
                assert requests.get(f"{server.base}/healthz", timeout=5, headers={"Connection": "close"}).ok

        os.kill(second, signal.SIGSTOP)
        try:
            healthz(7)  # all answered by the first
        finally:
            os.kill(second, signal.SIGCONT)
        os.kill(first, signal.SIGSTOP)
        try:
            assert _served(server.base) == 7  # scraped from the second
        finally:
            os.kill(first, signal.SIGCONT)
        healthz(5)
        assert [_served(server.base) for _ in range(6)] == [12] * 6
        os.kill(first, signal.SIGKILL)  # gunicorn starts another; what the dead one counted stays counted
        deadline = time.monotonic() + 20
        while (first in _workers(server.proc.pid) or len(_workers(server.proc.pid)) < 2) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert [_served(server.base) for _ in range(4)] == [12] * 4
    finally:
        server.stop()
