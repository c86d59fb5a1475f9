"""DTR end to end over real HTTP: `cds serve` in its own process, a CDS client that signs an order, then the same
client as a DTR client with a SMART Backend Services token: package, answers, the settled assertion, across workers."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from builders import condition, coverage, coverage_info, hook_request, med_order
from conftest import TEST_ISS, ClientKey
from test_e2e import Server

pytestmark = pytest.mark.e2e
FHIR = {"Content-Type": "application/fhir+json"}
SCOPES = "system/Questionnaire.rs system/Library.rs system/ValueSet.rs system/QuestionnaireResponse.cu"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("dtr-e2e"), client_key)
    yield s
    s.stop()


def access_token(server: Server, key: ClientKey, scope: str = SCOPES) -> requests.Response:
    url = f"{server.base}/auth/token"
    return requests.post(
        url,
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": key.token(url, sub=TEST_ISS),
        },
        timeout=10,
    )


def signed_assertion(server: Server, key: ClientKey) -> str:
    url = f"{server.base}/cds-services/order-sign"
    body = hook_request([med_order(dose=30, every_hours=56, days=None)], conditions=[condition("D68.2")])
    resp = requests.post(url, json=body, timeout=10, headers={"Authorization": f"Bearer {key.token(url)}"})
    assert resp.status_code == 200, resp.text
    info = coverage_info(resp.json()["systemActions"][0]["resource"])
    assert info["doc-needed"] == ["clinical"]
    return str(info["coverage-assertion-id"][0])


def test_a_dtr_client_fetches_answers_and_settles_over_http(server: Server, client_key: ClientKey) -> None:
    assertion_id = signed_assertion(server, client_key)
    got = access_token(server, client_key)
    assert got.status_code == 200, got.text
    bearer = {"Authorization": f"Bearer {got.json()['access_token']}", **FHIR}
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "coverage", "resource": coverage()},
            {"name": "context", "valueString": assertion_id},
        ],
    }
    package = requests.post(
        f"{server.base}/fhir/Questionnaire/$questionnaire-package", json=params, headers=bearer, timeout=10
    )
    assert package.status_code == 200, package.text
    bundle = package.json()["parameter"][0]["resource"]
    draft = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "QuestionnaireResponse")
    answered = copy.deepcopy(draft)
    answered["status"] = "completed"
    answered["item"].append({"linkId": "attestation", "answer": [{"valueBoolean": True}]})
    settled = requests.post(f"{server.base}/fhir/QuestionnaireResponse", json=answered, headers=bearer, timeout=10)
    assert settled.status_code == 201, settled.text
    info = coverage_info(settled.json())
    assert info["pa-needed"] == ["satisfied"] and info["satisfied-pa-id"][0].startswith("PA-")
    for _ in range(4):  # whichever worker answers, the assertion is settled (one store)
        again = requests.post(
            f"{server.base}/fhir/Questionnaire/$questionnaire-package", json=params, headers=bearer, timeout=10
        )
        outcome = next(p["resource"] for p in again.json()["parameter"] if p["name"] == "outcome")
        assert info["satisfied-pa-id"][0] in outcome["issue"][0]["details"]["text"]
        replay = requests.post(f"{server.base}/fhir/QuestionnaireResponse", json=answered, headers=bearer, timeout=10)
        assert replay.status_code == 409 and replay.json()["resourceType"] == "OperationOutcome"


def test_dtr_endpoints_refuse_a_missing_or_narrower_token_over_http(server: Server, client_key: ClientKey) -> None:
    url = f"{server.base}/fhir/Questionnaire/$questionnaire-package"
    body: dict[str, Any] = {"resourceType": "Parameters", "parameter": []}
    none = requests.post(url, json=body, headers=FHIR, timeout=10)
    assert none.status_code == 401 and none.headers["WWW-Authenticate"].startswith("Bearer")
    narrow = access_token(server, client_key, "system/ValueSet.rs").json()["access_token"]
    refused = requests.post(url, json=body, headers={"Authorization": f"Bearer {narrow}", **FHIR}, timeout=10)
    assert refused.status_code == 403 and refused.json()["issue"][0]["code"] == "forbidden"
