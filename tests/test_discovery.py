"""Discovery is built from the same registry as the routes, and is valid CDS Hooks 2.0 / CRD 2.2."""

from __future__ import annotations

import re
from typing import Any

from builders import hook_request, med_order
from flask import Flask
from flask.testing import FlaskClient

ROOT_TOKEN = re.compile(r"\{\{([^}]*)\}\}")
CARD_TYPES = {
    "coverage-info",
    "guideline",
    "therapy-alternatives-opt",
    "request-form-completion",
    "unsolicited-determ",
    "max-cards",
}


def discovery(client: FlaskClient) -> list[dict[str, Any]]:
    resp = client.get("/cds-services")
    assert resp.status_code == 200
    return resp.get_json()["services"]


def test_services_for_order_sign_and_order_select(client: FlaskClient) -> None:
    hooks = {s["hook"]: s for s in discovery(client)}
    assert set(hooks) >= {"order-sign", "order-select"}
    for s in hooks.values():
        assert s["id"] and s["description"] and s["title"]


def test_prefetch_tokens_are_root_level_context_fields_only(client: FlaskClient) -> None:
    for service in discovery(client):
        for key, template in service["prefetch"].items():
            for token in ROOT_TOKEN.findall(template):
                assert re.fullmatch(r"context\.[A-Za-z]+", token.strip()), (key, token)
        assert service["prefetch"]["coverage"] == "Coverage?patient={{context.patientId}}&status=active"
        assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"


def test_crd_extensions(client: FlaskClient) -> None:
    for service in discovery(client):
        ext = service["extension"]
        assert ext["davinci-crd.version"] == ["2.2"]
        assert all(re.fullmatch(r"[1-9]\d*\.[1-9]\d*", v) for v in ext["davinci-crd.version"])
        options = ext["davinci-crd.configuration-options"]
        assert {o["code"] for o in options} == CARD_TYPES
        for o in options:
            assert o["type"] in ("boolean", "integer") and o["name"] and o["description"]
            assert isinstance(o["default"], bool) == (o["type"] == "boolean")
        assert len({o["name"] for o in options}) == len(options)


def test_every_card_topic_the_service_returns_has_a_boolean_option(client: FlaskClient) -> None:
    from builders import condition, role
    from conftest import post_hook

    options = {
        o["code"]
        for o in discovery(client)[0]["extension"]["davinci-crd.configuration-options"]
        if o["type"] == "boolean"
    }
    topics = set()
    for kwargs in ({}, {"roles": [role("207RX0202X")]}):
        body = post_hook(
            client,
            hook_request(
                [med_order(days=14), med_order(oid="mr-2", code="J7212")], conditions=[condition("D68.311")], **kwargs
            ),
        ).get_json()
        topics |= {c["source"]["topic"]["code"] for c in body["cards"]}
    assert topics and topics <= options


def test_routes_and_discovery_come_from_one_registry(app: Flask, client: FlaskClient) -> None:
    advertised = {s["id"] for s in discovery(client)}
    assert advertised == set(app.extensions["cds.services"])
    for service in discovery(client):
        body = hook_request([med_order()], hook=service["hook"])
        assert client.post(f"/cds-services/{service['id']}", json=body).status_code == 200


def test_no_empty_values_in_discovery(client: FlaskClient) -> None:
    def walk(v: Any) -> None:
        assert v not in (None, "", [], {}), "CDS Hooks: no null or empty JSON values"
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        if isinstance(v, list):
            for x in v:
                walk(x)

    walk(client.get("/cds-services").get_json())
