"""The standards' own examples (fixtures/examples/crd): requests we must accept, responses our checks must pass."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import bundle, coverage, coverage_info, patient
from conftest import post_hook
from fake_ehr import FakeEHR
from flask.testing import FlaskClient
from hookcalls import check_response_shape

from cds.crd import hookrequest
from cds.crd.coverage_info import problems

EXAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "examples" / "crd"
INFERNO_SELECT = EXAMPLES / (
    "inferno-framework_davinci-crd-test-kit__config_presets_ri_crd_server.json.erb"
    "__input_order_select_request_bodies.json"
)


def load(name: str | Path) -> Any:
    return json.loads((EXAMPLES / name).read_text())


def requests_of(hooks: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.json")):
        data = json.loads(path.read_text())
        for i, item in enumerate(data if isinstance(data, list) else [data]):
            if isinstance(item, dict) and item.get("hook") in hooks:
                out.append((f"{path.name}[{i}]", item))
    return out


KIT = "inferno-framework_davinci-crd-test-kit__spec_fixtures_"
# Inferno's own spec fixtures write dosageInstruction.doseAndRate as an object; R4 JSON requires an array
INVALID_R4 = {
    f"{KIT}order_select_hook_request.json[0]": "dosageInstruction.0.doseAndRate",
    f"{KIT}order_sign_hook_request.json[0]": "dosageInstruction.0.doseAndRate",
}


@pytest.mark.parametrize(
    "name, body",
    requests_of(("order-sign", "order-select")),
    ids=[n for n, _ in requests_of(("order-sign", "order-select"))],
)
def test_every_vendored_order_request_is_parsed(name: str, body: dict[str, Any]) -> None:
    request = hookrequest.parse(json.dumps(body).encode(), body["hook"])
    if name in INVALID_R4:
        with pytest.raises(hookrequest.InvalidResource) as err:
            hookrequest.order_bundle(request.context)
        assert INVALID_R4[name] in str(err.value) and err.value.http_status == 400
        return
    orders = hookrequest.order_bundle(request.context)
    assert orders and all(o["id"] for o in orders)


@pytest.fixture
def acme_payer(make_app: Any) -> FlaskClient:
    payers = [
        {
            "id": "acme",
            "name": "Acme Health Plan",
            "identifier_system": "http://hl7.org/fhir/sid/us-npi",
            "identifier_value": "1407071236",
            "policies": ["cigna-ip0356"],
        }
    ]
    return make_app(payers=payers).test_client()


def test_inferno_order_select_bodies_answer_with_coverage_information(acme_payer: FlaskClient) -> None:
    """Inferno's RI preset: Coverage payor by reference only. Given the payor Organization in prefetch (the
    `organizations` key of CRD's standard prefetch), the drugs without a policy get covered / no-auth."""
    for body in json.loads(INFERNO_SELECT.read_text()):
        body = copy.deepcopy(body)
        org = {
            "resourceType": "Organization",
            "id": "org1234",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1407071236"}],
        }
        body["prefetch"]["organizations"] = bundle(org)
        del body["fhirServer"], body["fhirAuthorization"]  # the RI's server is not reachable from tests
        resp = post_hook(acme_payer, body, "order-select")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        check_response_shape(resp.get_json(), "order-select")
        info = coverage_info(resp.get_json()["systemActions"][0]["resource"])
        assert info["covered"] == ["covered"] and info["pa-needed"] == ["no-auth"]
        assert info["coverage"] == [{"reference": "Coverage/cov015"}]


@pytest.fixture
def ehr() -> Iterator[FakeEHR]:
    with FakeEHR() as server:
        server.token = "SAMPLE_TOKEN"
        server.add(patient(pid="example"), coverage(beneficiary={"reference": "Patient/example"}))
        yield server


@pytest.mark.parametrize(
    "name, service",
    [
        ("inferno-framework_davinci-crd-test-kit__spec_fixtures_order_sign_hook_request.json", "order-sign"),
        ("inferno-framework_davinci-crd-test-kit__spec_fixtures_order_select_hook_request.json", "order-select"),
    ],
)
def test_inferno_requests_without_prefetch_are_served_by_querying(
    client: FlaskClient, ehr: FakeEHR, name: str, service: str
) -> None:
    body = load(name)
    body["fhirServer"] = ehr.base
    for entry in body["context"]["draftOrders"]["entry"]:  # make the kit's doseAndRate object the R4 array
        for dosage in entry["resource"].get("dosageInstruction", []):
            if isinstance(dosage.get("doseAndRate"), dict):
                dosage["doseAndRate"] = [dosage["doseAndRate"]]
    resp = post_hook(client, body, service)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    data = resp.get_json()
    check_response_shape(data, service)
    [action] = data["systemActions"]
    assert action["resource"]["resourceType"] == "MedicationRequest"
    assert coverage_info(action["resource"])["pa-needed"] == ["no-auth"]
    assert any(p.startswith("/fhir/Coverage?patient=") for p, _ in ehr.requests)


def extension_of(name: str) -> dict[str, Any]:
    data = load(name)
    action = data["systemActions"][0] if "systemActions" in data else data
    return next(e for e in action["resource"]["extension"] if e["url"].endswith("ext-coverage-information"))


@pytest.mark.parametrize(
    "name",
    [
        "inferno-framework_davinci-crd-test-kit__spec_fixtures_coverage_info_system_action_covered.json",
        "HL7_davinci-crd__input_resources_CRDServiceResponse3.json",
    ],
)
def test_our_invariant_checks_accept_valid_examples(name: str) -> None:
    assert problems(extension_of(name)) == []


def test_the_kits_conditional_example_breaks_two_invariants() -> None:
    # conditional without pa-needed (CRD 2.0.1 crd-ci-q2 as its FHIRPath reads) and doc-purpose without a reason
    # (CRD 2.2 crd-ci-q8): what this service never emits
    found = problems(
        extension_of(
            "inferno-framework_davinci-crd-test-kit__spec_fixtures_coverage_info_system_action_conditional.json"
        )
    )
    assert [p.split(":")[0] for p in found] == ["crd-ci-q2 (2.0.1)", "crd-ci-q8"]


def test_our_invariant_checks_catch_broken_extensions() -> None:
    action = load("inferno-framework_davinci-crd-test-kit__spec_fixtures_coverage_info_system_action_covered.json")
    ext = next(e for e in action["resource"]["extension"] if e["url"].endswith("ext-coverage-information"))
    broken = copy.deepcopy(ext)
    broken["extension"] = [s for s in broken["extension"] if s["url"] != "pa-needed"]
    assert any("crd-ci-q2" in p for p in problems(broken))
    broken = copy.deepcopy(ext)
    broken["extension"].append({"url": "satisfied-pa-id", "valueString": "X"})
    assert any("crd-ci-q5" in p for p in problems(broken))
