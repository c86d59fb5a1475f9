"""order-select (secondary): the selected orders only; never asks for clinical documentation; never issues a PA."""

from __future__ import annotations

from typing import Any

from builders import condition, coverage_info, hook_request, med_order, role
from conftest import post_hook
from flask.testing import FlaskClient
from hookcalls import check_response_shape
from test_error_shape import assert_operation_outcome


def select(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    resp = post_hook(client, body, "order-select")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    data = resp.get_json()
    check_response_shape(data, "order-select")
    return data


def test_only_the_selected_orders_are_assessed(client: FlaskClient) -> None:
    orders = [med_order(oid="mr-a"), med_order(oid="mr-b", code="J7212")]
    body = select(
        client,
        hook_request(
            orders, hook="order-select", selections=["MedicationRequest/mr-b"], conditions=[condition("D68.311")]
        ),
    )
    assert [a["resource"]["id"] for a in body["systemActions"]] == ["mr-b"]


def test_criteria_met_on_select_issue_no_pa(client: FlaskClient, app: Any) -> None:
    body = select(client, hook_request([med_order()], hook="order-select", conditions=[condition("D68.311")]))
    info = coverage_info(body["systemActions"][0]["resource"])
    assert info["pa-needed"] == ["auth-needed"] and "satisfied-pa-id" not in info
    assert "signed" in info["reason"][0]["text"]
    assert app.extensions["cds"].store.prior_auth("PA-TEST00001") is None


def test_missing_documentation_is_announced_but_not_asked(client: FlaskClient) -> None:
    body = select(
        client,
        hook_request([med_order()], hook="order-select", conditions=[condition("D68.311")], roles=[role("207RX0202X")]),
    )
    info = coverage_info(body["systemActions"][0]["resource"])
    assert "doc-needed" not in info and "questionnaire" not in info  # CRD §hook-19
    assert "IP0356-3B" in info["reason"][0]["text"]
    assert any("IP0356-3B" in c["detail"] for c in body["cards"])


def test_not_covered_on_select(client: FlaskClient) -> None:
    body = select(
        client, hook_request([med_order(code="J7212")], hook="order-select", conditions=[condition("D68.311")])
    )
    assert coverage_info(body["systemActions"][0]["resource"])["covered"] == ["not-covered"]


def test_selections_are_required_and_must_name_draft_orders(client: FlaskClient) -> None:
    body = hook_request([med_order()], hook="order-select")
    del body["context"]["selections"]
    assert_operation_outcome(post_hook(client, body, "order-select"), 400, mentions="selections")
    body = hook_request([med_order()], hook="order-select", selections=["MedicationRequest/other"])
    assert_operation_outcome(post_hook(client, body, "order-select"), 400, mentions="MedicationRequest/other")
