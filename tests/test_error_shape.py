"""Every client mistake gets a 4xx with an OperationOutcome saying what is wrong; never a 500, never HTML."""

from __future__ import annotations

import json
from typing import Any

import pytest
from builders import coverage, hook_request, med_order
from conftest import post_hook
from flask.testing import FlaskClient


def assert_operation_outcome(resp: Any, status: int, code: str | None = None, mentions: str | None = None) -> None:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype in ("application/json", "application/fhir+json")
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] in ("error", "fatal")
    if code:
        assert issue["code"] == code
    if mentions:
        assert mentions in issue["details"]["text"]
    assert "Traceback" not in resp.get_data(as_text=True)


def valid() -> dict[str, Any]:
    return hook_request([med_order()])


def raw(client: FlaskClient, data: str | bytes, **kw: Any) -> Any:
    return client.post(
        "/cds-services/order-sign", data=data, content_type=kw.pop("content_type", "application/json"), **kw
    )


def test_body_that_is_not_json(client: FlaskClient) -> None:
    assert_operation_outcome(raw(client, "{not json"), 400, "structure", "not valid JSON")


def test_body_that_is_not_utf8(client: FlaskClient) -> None:
    assert_operation_outcome(raw(client, b"\xff\xfe\x00"), 400, "structure")


def test_json_that_is_not_an_object(client: FlaskClient) -> None:
    assert_operation_outcome(raw(client, "[1, 2]"), 400, "structure", "JSON object")


def test_wrong_content_type(client: FlaskClient) -> None:
    assert_operation_outcome(raw(client, json.dumps(valid()), content_type="text/plain"), 415)


@pytest.mark.parametrize("field", ["hook", "hookInstance", "context"])
def test_missing_required_field(client: FlaskClient, field: str) -> None:
    body = valid()
    del body[field]
    assert_operation_outcome(post_hook(client, body), 400, "required", field)


def test_wrong_hook_for_the_service(client: FlaskClient) -> None:
    body = valid()
    body["hook"] = "order-select"
    assert_operation_outcome(post_hook(client, body), 400, mentions="order-sign")


@pytest.mark.parametrize("field", ["userId", "patientId", "draftOrders"])
def test_missing_context_fields(client: FlaskClient, field: str) -> None:
    body = valid()
    del body["context"][field]
    assert_operation_outcome(post_hook(client, body), 400, mentions=field)


def test_draft_orders_that_is_not_a_bundle(client: FlaskClient) -> None:
    body = valid()
    body["context"]["draftOrders"] = [med_order()]
    assert_operation_outcome(post_hook(client, body), 400, mentions="Bundle")


def test_an_entry_that_is_not_an_order(client: FlaskClient) -> None:
    body = valid()
    body["context"]["draftOrders"]["entry"][0]["resource"] = {"resourceType": "Patient", "id": "x"}
    assert_operation_outcome(post_hook(client, body), 400, mentions="not an order")


def test_a_medication_request_that_fails_fhir_validation(client: FlaskClient) -> None:
    body = valid()
    body["context"]["draftOrders"]["entry"][0]["resource"]["subject"] = "Patient/pat-1"
    resp = post_hook(client, body)
    assert_operation_outcome(resp, 400, "structure", "subject")
    assert resp.get_json()["issue"][0]["expression"][0].startswith("context.draftOrders.entry[0].resource")


def test_an_order_without_id(client: FlaskClient) -> None:
    body = valid()
    del body["context"]["draftOrders"]["entry"][0]["resource"]["id"]
    assert_operation_outcome(post_hook(client, body), 400, mentions="id")


def test_fhir_authorization_without_fhir_server(client: FlaskClient) -> None:
    body = valid()
    body["fhirAuthorization"] = {
        "access_token": "x",
        "token_type": "Bearer",
        "expires_in": 1,
        "scope": "s",
        "subject": "c",
    }
    assert_operation_outcome(post_hook(client, body), 400, mentions="fhirServer")


def test_prefetch_value_that_is_not_a_resource(client: FlaskClient) -> None:
    body = valid()
    body["prefetch"]["conditions"] = "none"
    assert_operation_outcome(post_hook(client, body), 400, mentions="prefetch.conditions")


def test_an_invalid_patient_in_prefetch(client: FlaskClient) -> None:
    body = valid()
    body["prefetch"]["patient"]["birthDate"] = {"year": 1980}
    assert_operation_outcome(post_hook(client, body), 400, "structure", "Patient")


def test_unsupported_crd_version_is_422(client: FlaskClient) -> None:
    body = valid()
    body["extension"] = {"davinci-crd.requestedVersion": "1.0"}
    assert_operation_outcome(post_hook(client, body), 422, "not-supported", "1.0")


def test_supported_crd_version_is_accepted(client: FlaskClient) -> None:
    body = valid()
    body["extension"] = {"davinci-crd.requestedVersion": "2.2"}
    assert post_hook(client, body).status_code == 200


@pytest.mark.parametrize(
    "coverages, mentions",
    [
        ([], "No active Coverage"),
        ([coverage(), coverage(cid="cov-2")], "2 active Coverages"),
        ([coverage(payor=[{"display": "Some plan"}])], "no payer identifier"),
        ([coverage(payer="aetna")], "does not serve"),
    ],
)
def test_coverage_problems_are_400(client: FlaskClient, coverages: list[dict[str, Any]], mentions: str) -> None:
    body = valid()
    from builders import bundle

    body["prefetch"]["coverage"] = bundle(*coverages)
    assert_operation_outcome(post_hook(client, body), 400, "business-rule", mentions)


def test_unknown_service_is_404(client: FlaskClient) -> None:
    assert_operation_outcome(client.post("/cds-services/nope", json=valid()), 404, "not-found")


def test_wrong_method_is_405(client: FlaskClient) -> None:
    assert_operation_outcome(client.get("/cds-services/order-sign"), 405)


def test_unknown_route_is_404(client: FlaskClient) -> None:
    assert_operation_outcome(client.get("/nothing/here"), 404)


def test_too_large_is_413(make_app: Any) -> None:
    client = make_app(max_request_bytes=1000).test_client()
    assert_operation_outcome(raw(client, json.dumps(valid())), 413)


def test_unknown_fields_are_ignored(client: FlaskClient) -> None:
    body = valid()
    body["somethingNew"] = {"a": 1}
    body["context"]["futureField"] = True
    assert post_hook(client, body).status_code == 200


def test_an_unexpected_failure_is_a_500_operation_outcome_without_details(make_app: Any, monkeypatch: Any) -> None:
    app = make_app()
    import cds.crd.hooks.orders as orders

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("secret patient detail")

    monkeypatch.setattr(orders, "assess", boom)
    resp = post_hook(app.test_client(), valid())
    assert_operation_outcome(resp, 500, "exception", "incident")
    assert "secret patient detail" not in resp.get_data(as_text=True)


def test_unknown_questionnaire_is_an_operation_outcome(client: FlaskClient) -> None:
    resp = client.get("/fhir/Questionnaire/nope")
    assert_operation_outcome(resp, 404, "not-found")
    assert resp.mimetype == "application/fhir+json"
