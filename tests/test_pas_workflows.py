"""Inferno's PAS server workflow "pended, then notified" (pas_server_pended_use_case_group, 2.3.2;
cross_suite/pas_notification_verification.rb), through the service's own pieces: a subscription for the sending
system, a pended `$submit`, a reviewer's decision, the outbox delivered to the subscriber's endpoint, and the
notification's focus, a PAS response Bundle whose ClaimResponse carries the reviewer's A1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from notify_receiver import Receiver, subscription
from test_pas import claim_response, d68_2_order, pas_bundle, review_codes, signed_order, submit

from cds.pas import service
from cds.pas import store as pas_store
from cds.pas.delivery import Delivery

FHIR = "application/fhir+json"
SENDER = "1234567893"  # the provider Organization's NPI in test_pas.pas_bundle: the sending system's id


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def deliver_all(app: Flask) -> int:
    worker = Delivery(app.extensions["cds"].store, backoff_base=0.01)
    sent = 0
    for _ in range(10):
        done = worker.run_once()
        if not done:
            break
        sent += done
    return sent


def test_a_pended_request_is_decided_by_a_reviewer_and_the_subscriber_is_notified(
    make_app: Any, receiver: Receiver
) -> None:
    app = make_app()
    client = app.test_client()
    created = client.post(
        "/fhir/Subscription", data=json.dumps(subscription(receiver.url, org=SENDER)), content_type=FHIR
    )
    assert created.status_code == 201, created.get_data(as_text=True)
    assert deliver_all(app) == 1  # the handshake
    assert client.get(f"/fhir/Subscription/{created.get_json()['id']}").get_json()["status"] == "active"

    order = signed_order(client, d68_2_order())  # the indication is open: pended
    pended = submit(client, pas_bundle(order, ident="TX-notify")).get_json()
    assert review_codes(pended) == {1: "A4"}
    assert deliver_all(app) == 0, "a pended answer is sent to the submitter, not notified"

    rt = app.extensions["cds"]
    request_id = service.pended(rt)[0]["id"]
    service.decide(rt, request_id, action="approve", reviewer="dr-r", period_end="2027-06-30")
    assert deliver_all(app) == 1
    _headers, notification, _at = receiver.received[-1]
    assert notification["resourceType"] == "Bundle" and notification["type"] == "history"
    status = notification["entry"][0]["resource"]
    assert status["resourceType"] == "Parameters"
    parts = {p["name"]: p for p in status["parameter"]}
    assert parts["type"]["valueCode"] == "event-notification"
    focus = next(p for p in parts["notification-event"]["part"] if p["name"] == "focus")["valueReference"]
    target = next(e["resource"] for e in notification["entry"] if e.get("fullUrl") == focus["reference"])
    assert target["resourceType"] == "Bundle" and target["type"] == "collection"  # Inferno's PAS check
    assert review_codes(target) == {1: "A1"} and claim_response(target)["preAuthPeriod"]["end"] == "2027-06-30"
    audited = [(e["kind"], e["detail"].get("outcome")) for e in pas_store.audit_for(rt, request_id)]
    assert audited == [
        ("submit", None),
        ("decision", None),
        ("prior-auth-granted", None),
        ("notification", "delivered"),
    ]


def test_a_decision_for_another_sending_system_is_not_sent_to_this_subscriber(
    make_app: Any, receiver: Receiver
) -> None:
    app = make_app()
    client = app.test_client()
    sub = subscription(receiver.url, org="someone-else")
    assert client.post("/fhir/Subscription", data=json.dumps(sub), content_type=FHIR).status_code == 201
    deliver_all(app)
    order = signed_order(client, d68_2_order())
    submit(client, pas_bundle(order, ident="TX-other"))
    rt = app.extensions["cds"]
    service.decide(rt, service.pended(rt)[0]["id"], action="deny", reviewer="dr-r", reason="not necessary")
    assert deliver_all(app) == 0 and len(receiver.received) == 1  # the handshake only
