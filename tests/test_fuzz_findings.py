"""What the API fuzzing (tests/test_fuzz_api.py) found, each pinned by a fast in-process test so it stays fixed."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

PARAMETERS_OPERATIONS = (
    "/fhir/Questionnaire/$questionnaire-package",
    "/fhir/$questionnaire-package",
    "/fhir/Questionnaire/$log-questionnaire-errors",
    "/fhir/ValueSet/$expand",
    "/fhir/Questionnaire/$next-question",
    "/fhir/Claim/$submit",
    "/fhir/Claim/$inquire",
)


def test_parameters_whose_parameter_is_not_a_list_is_a_400(client: FlaskClient) -> None:
    """``{"resourceType": "Parameters", "parameter": 52291}`` was a 500 (TypeError iterating an int) on every
    operation taking Parameters."""
    for path in PARAMETERS_OPERATIONS:
        for parameter in (52291, 1.5, True, "text", {"name": "coverage"}):
            resp = client.post(path, json={"resourceType": "Parameters", "parameter": parameter})
            assert resp.status_code == 400, (path, parameter, resp.get_data(as_text=True))
            body: dict[str, Any] = resp.get_json()
            assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error"


def test_a_405_names_the_allowed_methods(client: FlaskClient) -> None:
    """A 405 had no Allow header (RFC 9110 §15.5.6 requires one)."""
    resp = client.put("/fhir/metadata")
    assert resp.status_code == 405 and resp.get_json()["resourceType"] == "OperationOutcome"
    assert {m.strip() for m in resp.headers["Allow"].split(",")} == {"GET", "HEAD", "OPTIONS"}


def test_a_questionnaire_response_bundle_whose_entry_is_not_a_list_is_a_400(client: FlaskClient) -> None:
    """``{"resourceType": "Bundle", "type": "message", "entry": 246955920}`` was a 500 (an int indexed)."""
    for entry in (246955920, {"resource": {}}, "x", [1], [{"resource": 5}], []):
        body = {"resourceType": "Bundle", "type": "collection", "entry": entry}
        resp = client.post("/fhir/QuestionnaireResponse", json=body)
        assert resp.status_code == 400, (entry, resp.get_data(as_text=True))
        assert resp.get_json()["issue"][0]["expression"] == ["Bundle.entry[0]"]
