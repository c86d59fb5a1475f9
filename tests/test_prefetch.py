"""Prefetch first, then the EHR's FHIR server with the hook's token; 412 only when neither is possible."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from builders import (
    bundle,
    condition,
    coverage,
    coverage_info,
    ehr_chart,
    hook_request,
    med_order,
)
from conftest import post_hook
from fake_ehr import FakeEHR
from flask.testing import FlaskClient
from hookcalls import check_response_shape


@pytest.fixture
def ehr() -> Iterator[FakeEHR]:
    with FakeEHR() as server:
        server.add(*ehr_chart())
        yield server


def decision(resp: Any) -> dict[str, Any]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    check_response_shape(body)
    return coverage_info(body["systemActions"][0]["resource"])


def test_missing_prefetch_is_queried_with_the_bearer_token(client: FlaskClient, ehr: FakeEHR) -> None:
    req = hook_request(
        [med_order()],
        omit=(
            "patient",
            "conditions",
            "observations",
            "practitionerRoles",
            "user",
            "medicationStatements",
            "medicationRequests",
            "medicationAdministrations",
        ),
        fhir_server=ehr.base,
    )
    info = decision(post_hook(client, req))
    assert info["pa-needed"] == ["satisfied"]
    paths = [p for p, _ in ehr.requests]
    assert any(p.startswith("/fhir/Patient/pat-1") for p in paths)
    assert any(p.startswith("/fhir/Condition?patient=pat-1") for p in paths)
    assert all(auth == "Bearer ehr-token-123" for _, auth in ehr.requests)


def test_queried_and_prefetched_data_give_the_same_answer(client: FlaskClient, ehr: FakeEHR) -> None:
    full = hook_request([med_order()], conditions=[condition("D68.311")])
    queried = hook_request(
        [med_order()], omit=("patient", "conditions", "observations", "practitionerRoles", "user"), fhir_server=ehr.base
    )
    a, b = decision(post_hook(client, full)), decision(post_hook(client, queried))
    for key in ("covered", "pa-needed", "satisfied-pa-id", "reason"):
        assert a[key] == b[key]


def test_an_operation_outcome_in_prefetch_is_queried_like_a_missing_key(client: FlaskClient, ehr: FakeEHR) -> None:
    oo = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    req = hook_request([med_order()], prefetch={"conditions": oo}, fhir_server=ehr.base)
    info = decision(post_hook(client, req))
    assert info["pa-needed"] == ["satisfied"]
    assert any(p.startswith("/fhir/Condition") for p, _ in ehr.requests)


def test_null_prefetch_means_no_data_and_is_not_queried(client: FlaskClient, ehr: FakeEHR) -> None:
    req = hook_request([med_order()], prefetch={"conditions": None}, fhir_server=ehr.base)
    info = decision(post_hook(client, req))
    assert info["pa-needed"] == ["auth-needed"]  # no diagnosis on record: the indication is asked
    assert not any(p.startswith("/fhir/Condition") for p, _ in ehr.requests)


def test_missing_prefetch_without_a_fhir_server_is_412(client: FlaskClient) -> None:
    resp = post_hook(client, hook_request([med_order()], omit=("conditions",)))
    assert resp.status_code == 412
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome" and "conditions" in body["issue"][0]["details"]["text"]


def test_missing_coverage_without_a_fhir_server_is_400(client: FlaskClient) -> None:
    """CRD §hook-13: no Coverage accessible (not prefetched, no fhirServer to query) is the client's 400."""
    resp = post_hook(client, hook_request([med_order()], omit=("coverage",)))
    assert resp.status_code == 400
    assert resp.get_json()["issue"][0]["expression"] == ["prefetch.coverage"]


def test_a_drug_without_policy_needs_only_the_coverage(client: FlaskClient) -> None:
    order = med_order(code="105611", system="http://www.nlm.nih.gov/research/umls/rxnorm", dose=None)
    req = hook_request([order], omit=("conditions", "observations", "patient"))
    assert decision(post_hook(client, req))["pa-needed"] == ["no-auth"]


def test_a_slow_ehr_degrades_to_documentation_needed(make_app: Any, ehr: FakeEHR) -> None:
    client = make_app(fhir_read_timeout=0.2, fhir_total_timeout=1.0).test_client()
    ehr.delay = 0.5
    req = hook_request([med_order()], omit=("conditions",), fhir_server=ehr.base)
    info = decision(post_hook(client, req))
    assert info["pa-needed"] == ["auth-needed"] and info["doc-needed"] == ["clinical"]
    technical = [r for r in info["reason"] if r.get("coding", [{}])[0].get("code") == "technical"]
    assert technical and "conditions" in technical[0]["text"]


def test_a_failing_ehr_degrades_too(client: FlaskClient, ehr: FakeEHR) -> None:
    ehr.fail_status = 500
    req = hook_request([med_order()], omit=("observations",), conditions=[condition("D68.311")], fhir_server=ehr.base)
    info = decision(post_hook(client, req))
    # without a weight on record the mcg/kg dose needs no weight; nothing else depended on observations
    assert info["pa-needed"] == ["satisfied"]


def test_a_payor_given_only_by_reference_is_read(client: FlaskClient, ehr: FakeEHR) -> None:
    ehr.add(
        {
            "resourceType": "Organization",
            "id": "org-cigna",
            "identifier": [{"system": "urn:cds:payer-id", "value": "cigna"}],
        }
    )
    cov = coverage(payor=[{"reference": "Organization/org-cigna"}])
    req = hook_request([med_order()], the_coverage=cov, conditions=[condition("D68.311")], fhir_server=ehr.base)
    assert decision(post_hook(client, req))["pa-needed"] == ["satisfied"]
    assert ("/fhir/Organization/org-cigna", "Bearer ehr-token-123") in ehr.requests


def test_a_payor_organization_in_prefetch_needs_no_query(client: FlaskClient) -> None:
    org = {
        "resourceType": "Organization",
        "id": "org-cigna",
        "identifier": [{"system": "urn:cds:payer-id", "value": "cigna"}],
    }
    cov = coverage(payor=[{"reference": "Organization/org-cigna"}])
    req = hook_request(
        [med_order()], the_coverage=cov, conditions=[condition("D68.311")], prefetch={"organizations": bundle(org)}
    )
    assert decision(post_hook(client, req))["pa-needed"] == ["satisfied"]


def test_an_unreadable_payor_reference_is_412(client: FlaskClient) -> None:
    cov = coverage(payor=[{"reference": "Organization/org-x"}])
    resp = post_hook(client, hook_request([med_order()], the_coverage=cov))
    assert resp.status_code == 412


def test_a_medication_reference_is_resolved(client: FlaskClient, ehr: FakeEHR) -> None:
    ehr.add(
        {
            "resourceType": "Medication",
            "id": "med-7",
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "0169-7201-01"}]},
        }
    )
    order = med_order()
    del order["medicationCodeableConcept"]
    order["medicationReference"] = {"reference": "Medication/med-7"}
    req = hook_request([order], conditions=[condition("D68.311")], fhir_server=ehr.base)
    info = decision(post_hook(client, req))
    assert info["pa-needed"] == ["satisfied"] and info["billingCode"][0]["code"] == "J7189"


def test_an_unreadable_medication_is_indeterminate_with_a_technical_reason(client: FlaskClient, ehr: FakeEHR) -> None:
    ehr.fail_status = 503
    order = med_order()
    del order["medicationCodeableConcept"]
    order["medicationReference"] = {"reference": "Medication/med-7"}
    info = decision(post_hook(client, hook_request([order], fhir_server=ehr.base)))
    assert info["covered"] == ["indeterminate"] and info["reason"][0]["coding"][0]["code"] == "technical"
