"""PAS Subscriptions (R4 backport): creation and its validation, owner-only access, the handshake, and which
subscriptions an event reaches, with the notification Bundles Inferno's PAS server suite checks (group 1 and 2.3.2)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_ISS, ClientKey
from flask import Flask
from flask.testing import FlaskClient
from notify_receiver import Receiver, pas_response, subscription
from sqlalchemy import select, update

from cds.pas import notify
from cds.pas.delivery import Delivery
from cds.pas.notify import outbox, subscriptions
from cds.smart import _issue
from cds.store import Store

EXAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "examples" / "pas"  # sources: fixtures/README.md
IG_EXAMPLE = EXAMPLES / "inferno-framework_davinci-pas-test-kit__spec_fixtures_PAS_Subscription_example_v221_good.json"
OTHER_ISS = "https://other-ehr.test/cds-client"
FHIR = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _create(client: FlaskClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/fhir/Subscription", data=json.dumps(body), headers={**FHIR, **headers})


def _rows(app: Flask, sub_id: str) -> list[dict[str, Any]]:
    store: Store = app.extensions["cds"].store
    with store.engine.connect() as conn:
        return notify.notifications_for(conn, sub_id)


def _activate(app: Flask, sub_id: str) -> None:
    with app.extensions["cds"].store.engine.begin() as conn:
        conn.execute(update(subscriptions).where(subscriptions.c.id == sub_id).values(status="active"))


def _params(bundle: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    status = bundle["entry"][0]["resource"]
    out: dict[str, list[dict[str, Any]]] = {}
    for p in status["parameter"]:
        out.setdefault(p["name"], []).append(p)
    return out


def _resolve(bundle: dict[str, Any], reference: str) -> dict[str, Any] | None:
    """How Inferno's subscriptions kit finds a focus (check_bundle_entry_reference)."""
    for entry in bundle["entry"][1:]:
        res = entry["resource"]
        if reference.startswith("urn:") and reference == entry.get("fullUrl"):
            return dict(res)
        if not reference.startswith("urn:") and f"{res['resourceType']}/{res.get('id')}" in reference:
            return dict(res)
    return None


# --- creation ------------------------------------------------------------------------------------------------------


def test_create_answers_201_requested_and_puts_a_handshake_in_the_outbox(app: Flask, client: FlaskClient) -> None:
    resp = _create(client, subscription("https://ehr.example/hook"))
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert resp.mimetype == "application/fhir+json"
    assert body["status"] == "requested"  # Inferno 1.03: rest-hook subscriptions start requested
    assert resp.headers["Location"] == f"http://cds.test/fhir/Subscription/{body['id']}"
    assert notify.PAS_SUBSCRIPTION_PROFILE in body["meta"]["profile"]
    rows = _rows(app, body["id"])
    assert [(r["kind"], r["attempts"], r["delivered_at"]) for r in rows] == [("handshake", 0, None)]
    handshake = json.loads(rows[0]["payload"])
    assert handshake["type"] == "history"
    first = handshake["entry"][0]
    assert first["resource"]["resourceType"] == "Parameters"
    assert first["resource"]["meta"]["profile"] == [notify.STATUS_PROFILE]
    assert first["request"]["url"].endswith(f"Subscription/{body['id']}/$status") and first["response"]
    params = _params(handshake)
    assert params["type"][0]["valueCode"] == "handshake"
    assert params["status"][0]["valueCode"] == "requested"
    assert params["topic"][0]["valueCanonical"] == notify.PAS_TOPIC
    assert params["events-since-subscription-start"][0]["valueString"] == "0"
    assert "notification-event" not in params


def test_the_ig_example_is_accepted(client: FlaskClient) -> None:
    """Inferno's fixture: https endpoint, payload application/json."""
    resp = _create(client, json.loads(IG_EXAMPLE.read_text()))
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["status"] == "requested"


def _without(path: str) -> Callable[[dict[str, Any]], None]:
    def change(sub: dict[str, Any]) -> None:
        *head, last = path.split(".")
        target = sub
        for key in head:
            target = target[key]
        del target[last]

    return change


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(sub: dict[str, Any]) -> None:
        *head, last = path.split(".")
        target = sub
        for key in head:
            target = target[key]
        target[last] = value

    return change


HEARTBEAT = notify.BACKPORT + "backport-heartbeat-period"
HEARTBEAT_PATH = f"Subscription.channel.extension('{HEARTBEAT}')"
FILTER = f"Subscription._criteria.extension('{notify.FILTER_CRITERIA_URL}')"
CONTENT = f"Subscription.channel._payload.extension('{notify.PAYLOAD_CONTENT_URL}')"


@pytest.mark.parametrize(
    ("change", "element"),
    [
        (_set("resourceType", "Basic"), "Subscription.resourceType"),
        (_set("criteria", "ClaimResponse?status=active"), "Subscription.criteria"),
        (_without("criteria"), "Subscription.criteria"),
        (_without("_criteria"), FILTER),
        (_set("_criteria", {"extension": [{"url": "http://other", "valueString": "org-identifier=1"}]}), FILTER),
        (
            _set("_criteria.extension", [{"url": notify.FILTER_CRITERIA_URL, "valueString": "orgIdentifier=1"}]),
            f"{FILTER}.valueString",
        ),  # fmt: skip
        (
            _set("_criteria.extension", [{"url": notify.FILTER_CRITERIA_URL, "valueString": "org-identifier="}]),
            f"{FILTER}.valueString",
        ),  # fmt: skip
        (
            _set("_criteria.extension", [{"url": notify.FILTER_CRITERIA_URL, "valueString": "org-identifier=a b"}]),
            f"{FILTER}.valueString",
        ),  # fmt: skip
        (
            _set("_criteria.extension", [{"url": notify.FILTER_CRITERIA_URL, "valueString": "org-identifier=a,,b"}]),
            f"{FILTER}.valueString",
        ),  # fmt: skip
        (_without("channel"), "Subscription.channel"),
        (_set("channel.type", "websocket"), "Subscription.channel.type"),
        (_without("channel.endpoint"), "Subscription.channel.endpoint"),
        (_set("channel.endpoint", "http://ehr.example/hook"), "Subscription.channel.endpoint"),
        (_set("channel.endpoint", "ftp://ehr.example/hook"), "Subscription.channel.endpoint"),
        (_set("channel.endpoint", "https://user:pw@ehr.example/hook"), "Subscription.channel.endpoint"),
        (_set("channel.endpoint", "https://ehr.example:99999/hook"), "Subscription.channel.endpoint"),
        (_set("channel.endpoint", "https://169.254.169.254/latest"), "Subscription.channel.endpoint"),  # metadata
        (_set("channel.endpoint", "https://10.0.0.5/hook"), "Subscription.channel.endpoint"),
        (_set("channel.endpoint", "https://[fd00::5]/hook"), "Subscription.channel.endpoint"),
        (_set("channel.endpoint", "https://[::ffff:192.168.1.1]/hook"), "Subscription.channel.endpoint"),
        (_set("channel.payload", "application/fhir+xml"), "Subscription.channel.payload"),
        (_without("channel.payload"), "Subscription.channel.payload"),
        (_without("channel._payload"), CONTENT),
        (_set("channel._payload.extension", [{"url": notify.PAYLOAD_CONTENT_URL, "valueCode": "id-only"}]), CONTENT),
        (_set("channel.header", ["no colon"]), "Subscription.channel.header[0]"),
        (_set("channel.header", ["X-Ok: 1", "Content-Type: text/plain"]), "Subscription.channel.header[1]"),
        (_set("channel.header", ["X-Bad: a\r\nX-Injected: 1"]), "Subscription.channel.header[0]"),
        (_set("channel.header", "Authorization: Bearer x"), "Subscription.channel.header"),
        (_set("end", "2020-01-01T00:00:00Z"), "Subscription.end"),  # already passed
        (_set("end", "2099-01-01"), "Subscription.end"),  # a date, not an instant
        (_set("end", "2099-01-01T00:00:00"), "Subscription.end"),  # no time zone
        (_set("end", "9999-12-31T23:59:59-01:00"), "Subscription.end"),  # beyond year 9999 in UTC
        (_set("end", 20990101), "Subscription.end"),
        (_set("channel.extension", [{"url": HEARTBEAT, "valueUnsignedInt": 1}]), HEARTBEAT_PATH),  # too often
        (_set("channel.extension", [{"url": HEARTBEAT, "valueUnsignedInt": "60"}]), HEARTBEAT_PATH),
    ],
)
def test_each_element_outside_the_pas_profile_is_a_400_naming_it(
    app: Flask, client: FlaskClient, change: Callable[[dict[str, Any]], None], element: str
) -> None:
    sub = subscription("https://ehr.example/hook")
    change(sub)
    resp = _create(client, sub)
    assert resp.status_code == 400, resp.get_json()
    issue = resp.get_json()["issue"][0]
    assert resp.get_json()["resourceType"] == "OperationOutcome"
    assert issue["expression"] == [element]
    with app.extensions["cds"].store.engine.connect() as conn:
        assert conn.execute(select(subscriptions.c.id)).first() is None
        assert conn.execute(select(outbox.c.id)).first() is None


def test_loopback_http_and_a_comma_separated_filter_are_accepted(app: Flask, client: FlaskClient) -> None:
    sub = subscription("http://localhost:9/hook", org="1234,5678", header=["Authorization: Bearer abc"])
    resp = _create(client, sub)
    assert resp.status_code == 201, resp.get_json()
    with app.extensions["cds"].store.engine.connect() as conn:
        row = conn.execute(select(subscriptions)).mappings().one()
    assert notify.org_ids(row["org_identifier"]) == ["1234", "5678"]
    assert json.loads(row["headers"]) == ["Authorization: Bearer abc"]


def test_loopback_endpoints_are_refused_when_the_networks_setting_leaves_it_out(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(notify_allowed_networks=[]).test_client()
    resp = _create(client, subscription("http://127.0.0.1:9/hook"))
    assert resp.status_code == 400 and "may not be sent to" in resp.get_json()["issue"][0]["details"]["text"]
    partner = make_app(notify_allowed_networks=["10.20.0.0/16"]).test_client()
    assert _create(partner, subscription("https://10.20.1.2/hook")).status_code == 201
    assert _create(partner, subscription("https://10.21.1.2/hook")).status_code == 400


def test_end_and_heartbeat_period_are_kept(app: Flask, client: FlaskClient) -> None:
    sub = subscription("https://ehr.example/hook", extension=[{"url": HEARTBEAT, "valueUnsignedInt": 60}])
    sub["end"] = "2099-01-31T12:00:00.000Z"
    resp = _create(client, sub)
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["end"] == "2099-01-31T12:00:00.000Z"
    with app.extensions["cds"].store.engine.connect() as conn:
        row = conn.execute(select(subscriptions)).mappings().one()
    assert row["heartbeat_seconds"] == 60
    assert row["ends_at"].replace(tzinfo=None) == datetime(2099, 1, 31, 12, 0)
    assert row["last_notified_at"] is not None  # the handshake


def test_a_body_that_is_not_json_or_not_fhir_json(client: FlaskClient) -> None:
    assert client.post("/fhir/Subscription", data="{", headers=FHIR).status_code == 400
    assert client.post("/fhir/Subscription", data="x", headers={"Content-Type": "text/plain"}).status_code == 415


def test_the_capability_statement_advertises_subscriptions(client: FlaskClient) -> None:
    rest = client.get("/fhir/metadata").get_json()["rest"][0]
    sub = next(r for r in rest["resource"] if r["type"] == "Subscription")
    assert {i["code"] for i in sub["interaction"]} >= {"create", "read", "update", "delete"}
    assert sub["extension"] == [{"url": notify.TOPIC_CANONICAL_URL, "valueCanonical": notify.PAS_TOPIC}]


# --- read, update, delete, $status; owners -------------------------------------------------------------------------


def test_read_update_off_status_and_delete(app: Flask, client: FlaskClient) -> None:
    created = _create(client, subscription("https://ehr.example/hook")).get_json()
    sid = created["id"]
    got = client.get(f"/fhir/Subscription/{sid}")
    assert got.status_code == 200 and got.get_json()["status"] == "requested"
    assert got.get_json()["meta"]["lastUpdated"]
    status = client.get(f"/fhir/Subscription/{sid}/$status").get_json()
    assert status["type"] == "searchset"
    assert _params(status)["type"][0]["valueCode"] == "query-status"
    off = {**created, "status": "off"}
    put = client.put(f"/fhir/Subscription/{sid}", data=json.dumps(off), headers=FHIR)
    assert put.status_code == 200 and put.get_json()["status"] == "off"
    assert [r["kind"] for r in _rows(app, sid)] == ["handshake"]  # turning it off sends nothing new
    wrong = client.put(f"/fhir/Subscription/{sid}", data=json.dumps({**created, "id": "other"}), headers=FHIR)
    assert wrong.status_code == 400 and wrong.get_json()["issue"][0]["expression"] == ["Subscription.id"]
    again = client.put(f"/fhir/Subscription/{sid}", data=json.dumps(created), headers=FHIR)
    assert again.get_json()["status"] == "requested"
    assert [r["kind"] for r in _rows(app, sid)] == ["handshake", "handshake"]  # changed: verified again
    assert client.delete(f"/fhir/Subscription/{sid}").status_code == 204
    assert client.get(f"/fhir/Subscription/{sid}").status_code == 404
    assert {r["last_error"] for r in _rows(app, sid)} == {"the subscription was deleted"}
    assert client.get("/fhir/Subscription/nope").status_code == 404


def test_only_the_owner_sees_or_changes_a_subscription(make_app: Callable[..., Flask], client_key: ClientKey) -> None:
    app = make_app(
        auth_required=True,
        clients=[{"iss": i, "jwks": client_key.jwks, "org_identifiers": ["8189991234"]} for i in (TEST_ISS, OTHER_ISS)],
    )
    client = app.test_client()
    rt = app.extensions["cds"]

    def auth(iss: str, scope: str = "system/Subscription.cruds") -> dict[str, str]:
        return {"Authorization": f"Bearer {_issue(rt, iss, scope)[0]}"}

    sub = subscription("https://ehr.example/hook")
    assert _create(client, sub).status_code == 401
    assert _create(client, sub, **auth(TEST_ISS, "system/Subscription.r")).status_code == 403
    created = _create(client, sub, **auth(TEST_ISS))
    assert created.status_code == 201
    sid = created.get_json()["id"]
    assert client.get(f"/fhir/Subscription/{sid}", headers=auth(TEST_ISS)).status_code == 200
    assert client.get(f"/fhir/Subscription/{sid}", headers=auth(OTHER_ISS)).status_code == 404
    body = json.dumps({**created.get_json(), "status": "off"})
    assert client.put(f"/fhir/Subscription/{sid}", data=body, headers={**FHIR, **auth(OTHER_ISS)}).status_code == 404
    assert client.delete(f"/fhir/Subscription/{sid}", headers=auth(OTHER_ISS)).status_code == 404
    assert client.get(f"/fhir/Subscription/{sid}", headers=auth(TEST_ISS)).get_json()["status"] == "requested"
    with rt.store.engine.connect() as conn:
        assert conn.execute(select(subscriptions.c.owner)).scalar() == TEST_ISS


# --- the handshake over HTTP ---------------------------------------------------------------------------------------


def test_the_handshake_is_delivered_and_the_subscription_becomes_active(
    app: Flask, client: FlaskClient, receiver: Receiver
) -> None:
    sub = subscription(receiver.url, header=["Authorization: Bearer receiver-token"])
    sid = _create(client, sub).get_json()["id"]
    worker = Delivery(app.extensions["cds"].store, poll_seconds=0.05).start()
    try:
        [handshake] = receiver.wait_for(1)
        deadline = time.monotonic() + 5
        while client.get(f"/fhir/Subscription/{sid}").get_json()["status"] != "active":
            assert time.monotonic() < deadline, "the subscription never became active"
            time.sleep(0.02)
    finally:
        worker.stop()
    headers = receiver.received[0][0]
    assert headers["Content-Type"] == "application/fhir+json"
    assert headers["Authorization"] == "Bearer receiver-token"
    assert _params(handshake)["type"][0]["valueCode"] == "handshake"
    assert handshake["entry"][0]["request"]["url"].endswith(f"Subscription/{sid}/$status")
    [row] = _rows(app, sid)
    assert row["delivered_at"] is not None and row["attempts"] == 1


# --- enqueue -------------------------------------------------------------------------------------------------------


def test_enqueue_reaches_the_active_subscriptions_whose_filter_names_the_org(app: Flask, client: FlaskClient) -> None:
    rt = app.extensions["cds"]
    ids = {}
    for name, org in [("a", "ORG-A"), ("ab", "ORG-B,ORG-A"), ("c", "ORG-C"), ("like", "ORG_A"), ("pending", "ORG-A")]:
        ids[name] = _create(client, subscription("https://ehr.example/hook", org=org)).get_json()["id"]
        if name != "pending":
            _activate(app, ids[name])
    off = ids["off"] = _create(client, subscription("https://ehr.example/hook", org="ORG-A")).get_json()["id"]
    with rt.store.engine.begin() as conn:
        conn.execute(update(subscriptions).where(subscriptions.c.id == off).values(status="off"))
    with rt.store.engine.begin() as conn:
        assert notify.enqueue(conn, rt, org_identifier="ORG-A", bundle=pas_response(), request_id="r1") == 2
        assert notify.enqueue(conn, rt, org_identifier="ORG-B", bundle=pas_response(), request_id="r2") == 1
        assert notify.enqueue(conn, rt, org_identifier="org-a", bundle=pas_response(), request_id="r3") == 0
        assert notify.enqueue(conn, rt, org_identifier="ORG%", bundle=pas_response(), request_id="r4") == 0
        assert notify.enqueue(conn, rt, org_identifier="ORG", bundle=pas_response(), request_id="r5") == 0
        assert notify.enqueue(conn, rt, org_identifier="", bundle=pas_response(), request_id="r6") == 0
    events = {name: [r["request_id"] for r in _rows(app, sid) if r["kind"] == "event"] for name, sid in ids.items()}
    assert events == {"a": ["r1"], "ab": ["r1", "r2"], "c": [], "like": [], "pending": [], "off": []}


def test_enqueue_rolls_back_with_the_callers_transaction(app: Flask, client: FlaskClient) -> None:
    rt = app.extensions["cds"]
    sid = _create(client, subscription("https://ehr.example/hook", org="ORG-A")).get_json()["id"]
    _activate(app, sid)
    with pytest.raises(RuntimeError), rt.store.engine.begin() as conn:
        assert notify.enqueue(conn, rt, org_identifier="ORG-A", bundle=pas_response(), request_id="r1") == 1
        raise RuntimeError("the decision failed")
    assert [r["kind"] for r in _rows(app, sid)] == ["handshake"]
    with rt.store.engine.connect() as conn:
        assert conn.execute(select(subscriptions.c.events_since_start)).scalar() == 0


def test_an_event_notification_carries_the_pas_response_as_its_focus(app: Flask, client: FlaskClient) -> None:
    """Inferno 2.3.2: history Bundle, SubscriptionStatus first, full-resource, the focus resolves to an entry that
    is a collection Bundle with a ClaimResponse first (pas_notification_verification.rb)."""
    rt = app.extensions["cds"]
    sid = _create(client, subscription("https://ehr.example/hook", org="8189991234")).get_json()["id"]
    _activate(app, sid)
    response = pas_response(7)
    sent = copy.deepcopy(response)
    with rt.store.engine.begin() as conn:
        notify.enqueue(conn, rt, org_identifier="8189991234", bundle=sent, request_id="req-7")
        notify.enqueue(conn, rt, org_identifier="8189991234", bundle=pas_response(8), request_id="req-8")
    assert sent == response  # the caller's Bundle is not changed
    first, second = (json.loads(r["payload"]) for r in _rows(app, sid) if r["kind"] == "event")
    assert first["type"] == "history"
    params = _params(first)
    assert params["type"][0]["valueCode"] == "event-notification"
    assert params["status"][0]["valueCode"] == "active"
    assert params["topic"][0]["valueCanonical"] == notify.PAS_TOPIC
    assert params["subscription"][0]["valueReference"]["reference"] == f"http://cds.test/fhir/Subscription/{sid}"
    assert params["events-since-subscription-start"][0]["valueString"] == "1"
    [event] = params["notification-event"]
    parts = {p["name"]: p for p in event["part"]}
    assert parts["event-number"]["valueString"] == "1" and parts["timestamp"]["valueInstant"]
    focus = _resolve(first, parts["focus"]["valueReference"]["reference"])
    assert focus == response
    assert focus["type"] == "collection" and focus["entry"][0]["resource"]["resourceType"] == "ClaimResponse"
    for entry in first["entry"]:
        assert entry["request"] and entry["response"]  # history Bundles: both on every entry
    assert first["entry"][1]["request"]["url"] == "ClaimResponse/cr-7"
    assert _params(second)["events-since-subscription-start"][0]["valueString"] == "2"
    assert client.get(f"/fhir/Subscription/{sid}/$status").get_json()["entry"][0]["resource"]["parameter"][4] == {
        "name": "events-since-subscription-start",
        "valueString": "2",
    }


def test_enqueue_takes_a_bundle_only(app: Flask) -> None:
    rt = app.extensions["cds"]
    with rt.store.engine.begin() as conn, pytest.raises(ValueError):
        notify.enqueue(conn, rt, org_identifier="x", bundle={"resourceType": "ClaimResponse"}, request_id="r")


def test_a_client_subscribes_only_to_its_own_sending_systems(
    make_app: Callable[..., Flask], client_key: ClientKey
) -> None:
    """A notification carries the patients of the organisation it is about: a client may follow only the
    org-identifiers listed for it in [[clients]], on create and on update (none listed: none)."""
    app = make_app(
        auth_required=True,
        clients=[
            {"iss": TEST_ISS, "jwks": client_key.jwks, "org_identifiers": ["8189991234"]},
            {"iss": OTHER_ISS, "jwks": client_key.jwks},
        ],
    )
    client = app.test_client()
    rt = app.extensions["cds"]
    mine = {"Authorization": f"Bearer {_issue(rt, TEST_ISS, 'system/Subscription.cruds')[0]}"}
    other = {"Authorization": f"Bearer {_issue(rt, OTHER_ISS, 'system/Subscription.cruds')[0]}"}
    refused = _create(client, subscription("https://ehr.example/hook", org="9990001111"), **mine)
    assert refused.status_code == 403 and "9990001111" in refused.get_json()["issue"][0]["details"]["text"]
    assert _create(client, subscription("https://ehr.example/hook"), **other).status_code == 403
    created = _create(client, subscription("https://ehr.example/hook"), **mine)
    assert created.status_code == 201
    sid = created.get_json()["id"]
    moved = subscription("https://ehr.example/hook", org="9990001111")
    put = client.put(f"/fhir/Subscription/{sid}", data=json.dumps({**moved, "id": sid}), headers={**FHIR, **mine})
    assert put.status_code == 403
    with rt.store.engine.connect() as conn:
        assert conn.execute(select(subscriptions.c.org_identifier)).scalar() == ",8189991234,"
