"""PAS server (issue 9 items 1, 2, 3 and the PAS side of 6): Claim/$submit decides each item from the CRD assertion the
order carries and the DTR answers in supportingInfo (A1 with the CRD PA, else A4 pended with the criteria), checks
the Bundle (4xx naming the element), is idempotent on Bundle.identifier (also under concurrent duplicates), handles
Claim updates and cancellation per item, and answers $inquire; SMART scopes guard both."""

from __future__ import annotations

import copy
import json
import threading
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from builders import condition, coverage, hook_request, med_order
from conftest import ROOT, TEST_ISS, post_hook
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from test_dtr import completed, d68_2_order, draft_of
from test_smart import access

from cds.errors import Conflict
from cds.pas import service
from cds.pas import store as pas_store
from cds.pas.tables import audit_events, pas_requests
from cds.store import prior_auths

FHIR = "application/fhir+json"
PAS = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/"
X12_306 = "https://codesystem.x12.org/005010/306"
CERT = PAS + "extension-certificationType"
EXAMPLES = ROOT / "fixtures" / "examples" / "pas"
INFERNO_REQUEST = "inferno-framework_davinci-pas-test-kit__config_presets_pas_server_v221_run_against_pas_client.json.erb__input_approval_pa_submit_request_payload.json"  # noqa: E501
INFERNO_PAYER = {
    "id": "inferno",
    "name": "Inferno example insurer",
    "identifier_system": "http://davinci-pas.org/fhir/payer-id",
    "identifier_value": "PI-InsurerExample",
    "policies": ["cigna-ip0356"],
}


def signed_order(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    """The order as CRD returned it (system action): the MedicationRequest with its coverage-information."""
    resp = post_hook(client, body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    order = copy.deepcopy(resp.get_json()["systemActions"][0]["resource"])
    order["status"] = "active"
    return order


def info_of(order: dict[str, Any]) -> dict[str, Any]:
    ext = next(e for e in order["extension"] if e["url"].endswith("ext-coverage-information"))
    return {s["url"]: next(v for k, v in s.items() if k.startswith("value")) for s in ext["extension"]}


def cert(code: str) -> dict[str, Any]:
    return {
        "url": CERT,
        "valueCodeableConcept": {"coding": [{"system": "https://codesystem.x12.org/005010/1322", "code": code}]},
    }  # noqa: E501


def pas_item(seq: int = 1, order_ref: str = "MedicationRequest/mr-1", code: str = "I", **extra: Any) -> dict[str, Any]:
    return {
        "sequence": seq,
        "extension": [
            cert(code),
            {"url": PAS + "extension-requestedService", "valueReference": {"reference": order_ref}},
        ],
        "category": {"coding": [{"system": "https://codesystem.x12.org/005010/1365", "code": "1"}]},
        "productOrService": {
            "coding": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "J7189"}]
        },  # noqa: E501
        "locationCodeableConcept": {
            "coding": [{"system": "https://www.cms.gov/Medicare/Coding/place-of-service-code-set", "code": "11"}]
        },  # noqa: E501
        "quantity": {"value": 1},
        **extra,
    }


def pas_bundle(
    order: dict[str, Any],
    *,
    ident: str = "TX-1",
    qr: dict[str, Any] | None = None,
    items: list[dict[str, Any]] | None = None,
    claim_id: str = "claim-1",
    prior: dict[str, Any] | None = None,
    claim_extra: dict[str, Any] | None = None,
    payer: str = "cigna",
) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "resourceType": "Claim",
        "id": claim_id,
        "identifier": [{"system": "urn:trnorg:EHR", "value": claim_id}],
        "status": "active",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "preauthorization",
        "patient": {"reference": "Patient/pat-1"},
        "created": "2026-11-23T15:00:00Z",
        "insurer": {"reference": "Organization/payer-1"},
        "provider": {"reference": "Organization/prov-1"},
        "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": "Coverage/cov-1"}}],
        "item": items if items is not None else [pas_item()],
        **(claim_extra or {}),
    }
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "pat-1", "identifier": [{"system": "urn:ehr:mrn", "value": "MRN-1"}]},
        coverage(payer),
        {
            "resourceType": "Organization",
            "id": "payer-1",
            "identifier": [{"system": "urn:cds:payer-id", "value": payer}],
        },
        {
            "resourceType": "Organization",
            "id": "prov-1",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
        },  # noqa: E501
        {"resourceType": "Practitioner", "id": "pract-1"},
        order,
    ]
    if qr is not None:
        resources.append(qr)
        claim["supportingInfo"] = [
            {
                "sequence": 1,
                "category": {
                    "coding": [
                        {
                            "system": "http://hl7.org/fhir/us/davinci-pas/CodeSystem/PASTempCodes",
                            "code": "additionalInformation",
                        }
                    ]
                },  # noqa: E501
                "valueReference": {"reference": f"QuestionnaireResponse/{qr['id']}"},
            }
        ]
    if prior is not None:
        claim["related"] = [
            {"claim": {"reference": f"Claim/{prior['id']}"}, "relationship": {"coding": [{"code": "prior"}]}}
        ]  # noqa: E501
        resources.append(prior)
    return {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ehr:pas-tx", "value": ident},
        "type": "collection",
        "timestamp": "2026-11-23T15:00:00Z",
        "entry": [
            {"fullUrl": f"urn:uuid:{claim_id}", "resource": claim},
            *({"fullUrl": f"http://ehr.test/fhir/{r['resourceType']}/{r['id']}", "resource": r} for r in resources),
        ],
    }


def cancel_all(
    order: dict[str, Any], prior: dict[str, Any], ident: str = "TX-2", claim_id: str = "claim-2"
) -> dict[str, Any]:
    """An update that cancels the whole request (certificationType 3 on the Claim, no items)."""
    return pas_bundle(
        order, ident=ident, claim_id=claim_id, prior=prior, items=[], claim_extra={"extension": [cert("3")]}
    )


def submit(client: FlaskClient, body: Any, **kw: Any) -> Any:
    return client.post("/fhir/Claim/$submit", data=json.dumps(body), content_type=FHIR, **kw)


def claim_response(bundle: dict[str, Any]) -> dict[str, Any]:
    first = bundle["entry"][0]["resource"]
    assert first["resourceType"] == "ClaimResponse"
    return first


def review_codes(bundle: dict[str, Any]) -> dict[int, str]:
    out = {}
    for item in claim_response(bundle).get("item", ()):
        action = item["adjudication"][0]["extension"][0]
        assert action["url"] == PAS + "extension-reviewAction"
        code = next(e for e in action["extension"] if e["url"] == PAS + "extension-reviewActionCode")
        coding = code["valueCodeableConcept"]["coding"][0]
        assert coding["system"] == X12_306
        assert item["adjudication"][0]["category"]["coding"][0]["code"] == "submitted"
        out[item["itemSequence"]] = coding["code"]
    return out


def assert_response_bundle(bundle: dict[str, Any]) -> None:
    """PAS response Bundle rules: identifier, collection, timestamp, fullUrls, ClaimResponse first, everything it
    references present once."""
    assert bundle["identifier"]["value"] and bundle["type"] == "collection" and bundle["timestamp"]
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert all(urls) and len(urls) == len(set(urls))
    cr = claim_response(bundle)
    assert cr["status"] == "active" and cr["use"] == "preauthorization" and cr["outcome"] == "complete"
    assert cr["request"] and cr["created"] and cr["identifier"]
    present = {f"{e['resource']['resourceType']}/{e['resource'].get('id')}" for e in bundle["entry"]} | set(urls)
    for name in ("patient", "insurer", "requestor"):
        assert cr[name]["reference"] in present, name


@pytest.fixture
def satisfied(client: FlaskClient) -> dict[str, Any]:
    """NovoSeven for acquired hemophilia with the record meeting IP0356: CRD issued a PA at order-sign."""
    order = signed_order(client, hook_request([med_order()], conditions=[condition("D68.311")]))
    assert info_of(order)["pa-needed"] == "satisfied"
    return order


# --- 1. decisions ----------------------------------------------------------------------------------------------
def test_a_satisfied_crd_assertion_is_certified_with_its_pa(client: FlaskClient, app: Flask, satisfied: Any) -> None:
    resp = submit(client, pas_bundle(satisfied))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    bundle = resp.get_json()
    assert_response_bundle(bundle)
    assert review_codes(bundle) == {1: "A1"}
    cr = claim_response(bundle)
    pa = info_of(satisfied)["satisfied-pa-id"]
    assert cr["preAuthRef"] == pa
    assert cr["preAuthPeriod"] == {"start": "2026-11-23", "end": "2027-11-23"}  # IP0356: 12 months
    action = cr["item"][0]["adjudication"][0]["extension"][0]["extension"]
    assert {"url": "number", "valueString": pa} in action
    assert cr["request"]["identifier"]["value"] == "claim-1"
    with app.extensions["cds"].store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(prior_auths)).scalar() == 1
        row = conn.execute(select(pas_requests)).mappings().one()
    assert row["status"] == "certified" and row["priority"] == "standard"
    assert row["org_identifier"] == "1234567893" and row["member_id"] == "MEMBER-001"
    assert (row["due_at"] - row["received_at"]).days == 7


def test_dtr_answers_in_supporting_info_certify_with_a_new_pa(client: FlaskClient) -> None:
    order = signed_order(client, d68_2_order())
    assert info_of(order)["pa-needed"] == "auth-needed"
    qr = completed(draft_of(client, {"coverage-assertion-id": [info_of(order)["coverage-assertion-id"]]}))
    qr["id"] = "qr-1"
    bundle = submit(client, pas_bundle(order, qr=qr)).get_json()
    assert review_codes(bundle) == {1: "A1"}
    assert claim_response(bundle)["preAuthRef"].startswith("PA-TEST")


def test_open_criteria_are_pended_with_the_criteria_in_process_note(client: FlaskClient, app: Flask) -> None:
    order = signed_order(client, d68_2_order())  # the indication is asked; no answers are sent
    bundle = submit(client, pas_bundle(order)).get_json()
    assert review_codes(bundle) == {1: "A4"}
    cr = claim_response(bundle)
    notes = " ".join(n["text"] for n in cr["processNote"])
    assert "IP0356" in notes and "pended for clinical review" in notes
    assert "preAuthRef" not in cr
    parts = cr["item"][0]["adjudication"][0]["extension"][0]["extension"]
    assert any(p["url"] == "reasonCode" for p in parts)
    queue = service.pended(app.extensions["cds"])
    assert len(queue) == 1 and queue[0]["policy"].startswith("cigna-ip0356|") and "NovoSeven" in queue[0]["drug"]
    view = service.request_view(app.extensions["cds"], queue[0]["id"])
    assert view["items"][0]["criteria"] and view["items"][0]["code"] == "A4"


def test_an_order_without_a_crd_assertion_is_pended(client: FlaskClient) -> None:
    order = med_order(status="active")
    bundle = submit(client, pas_bundle(order)).get_json()
    assert review_codes(bundle) == {1: "A4"}
    assert "no coverage assertion" in claim_response(bundle)["processNote"][0]["text"]


def test_the_inferno_example_request_is_processed_and_pended(make_app: Any) -> None:
    """The IG's referral example (ServiceRequest, urgent): no drug we decide, so a reviewer does (A4)."""
    app = make_app(payers=[*make_app().extensions["cds"].config["payers"], INFERNO_PAYER])
    body = json.loads((EXAMPLES / INFERNO_REQUEST).read_text())
    resp = submit(app.test_client(), body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    bundle = resp.get_json()
    assert_response_bundle(bundle)
    assert set(review_codes(bundle).values()) == {"A4"}
    row = pas_store.open_requests(app.extensions["cds"])[0]
    assert row["priority"] == "expedited" and (row["due_at"] - row["received_at"]).total_seconds() == 72 * 3600
    assert row["org_identifier"] == "INTER-SND-0001"  # ISA06 of the TransmissionIdentifiers


def test_the_inferno_example_for_a_payer_not_served_is_refused(client: FlaskClient) -> None:
    body = json.loads((EXAMPLES / INFERNO_REQUEST).read_text())
    resp = submit(client, body)
    assert resp.status_code == 400
    assert resp.get_json()["issue"][0]["expression"] == ["Claim.insurer"]


# --- 1. bundle errors -------------------------------------------------------------------------------------------
def _broken(order: dict[str, Any], how: str) -> dict[str, Any]:
    b = pas_bundle(order)
    claim = b["entry"][0]["resource"]
    if how == "use":
        claim["use"] = "claim"
    elif how == "first":
        b["entry"].append(b["entry"].pop(0))
    elif how == "reference":
        claim["provider"] = {"reference": "Organization/nowhere"}
    elif how == "sequence":
        claim["supportingInfo"] = [{"sequence": 1, "category": {}}, {"sequence": 1, "category": {}}]
    elif how == "fullUrl":
        del b["entry"][2]["fullUrl"]
    elif how == "insurer":
        b["entry"][3]["resource"]["identifier"][0]["value"] = "someone-else"
    elif how == "coverage":
        b["entry"][2]["resource"]["payor"][0]["identifier"]["value"] = "bcbsks"
    return b


@pytest.mark.parametrize(
    ("how", "expression"),
    [
        ("use", "Claim.use"),
        ("first", "Bundle.entry[0].resource"),
        ("reference", "Claim.provider"),
        ("sequence", "Claim.supportingInfo[1].sequence"),
        ("fullUrl", "Bundle.entry[2].fullUrl"),
        ("insurer", "Claim.insurer"),
        ("coverage", "Claim.insurance[0].coverage.payor"),
    ],
)
def test_an_unprocessable_bundle_is_a_4xx_naming_the_element(
    client: FlaskClient, app: Flask, how: str, expression: str
) -> None:
    resp = submit(client, _broken(med_order(status="active"), how))
    assert 400 <= resp.status_code < 500, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["expression"] == [expression]
    with app.extensions["cds"].store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(pas_requests)).scalar() == 0


def test_inferno_error_group_empty_bundle_is_refused_by_submit_and_inquire(client: FlaskClient) -> None:
    empty = {
        "resourceType": "Bundle",
        "identifier": {"value": "x"},
        "type": "collection",
        "timestamp": "2026-01-01T00:00:00Z",
    }  # noqa: E501
    for path in ("/fhir/Claim/$submit", "/fhir/Claim/$inquire"):
        resp = client.post(path, data=json.dumps(empty), content_type=FHIR)
        assert 400 <= resp.status_code < 500 and resp.get_json()["resourceType"] == "OperationOutcome"
    assert client.post("/fhir/Claim/$submit", data="not json", content_type=FHIR).status_code == 400


def test_a_parameters_body_with_the_bundle_as_resource_is_accepted(client: FlaskClient, satisfied: Any) -> None:
    body = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": pas_bundle(satisfied)}]}
    assert review_codes(submit(client, body).get_json()) == {1: "A1"}


# --- 2. idempotency ---------------------------------------------------------------------------------------------
def test_a_resubmission_returns_the_stored_response_and_creates_nothing(
    client: FlaskClient, app: Flask, satisfied: Any
) -> None:
    first = submit(client, pas_bundle(satisfied)).get_data()
    again = submit(client, pas_bundle(satisfied)).get_data()
    assert json.loads(first) == json.loads(again)
    other = submit(client, pas_bundle(satisfied, ident="TX-2")).get_json()  # another transaction: a new request
    assert claim_response(other)["id"] != claim_response(json.loads(first))["id"]
    assert claim_response(other)["preAuthRef"] == claim_response(json.loads(first))["preAuthRef"]
    with app.extensions["cds"].store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(pas_requests)).scalar() == 2
        kinds = conn.execute(select(audit_events.c.kind)).scalars().all()
    assert kinds.count("submit") == 2


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_twenty_concurrent_duplicates_make_one_request_and_one_pa(make_app: Any, backend: str, tmp_path: Path) -> None:
    settings: dict[str, Any] = {}
    schema = None
    if backend == "postgres":
        from test_pas_e2e import pg_schema

        schema, settings["database_url"] = pg_schema()
    try:
        app = make_app(new_id=_uuid, **settings)
        client = app.test_client()
        order = signed_order(client, d68_2_order())
        qr = completed(draft_of(client, {"coverage-assertion-id": [info_of(order)["coverage-assertion-id"]]}))
        qr["id"] = "qr-1"
        body = pas_bundle(order, qr=qr)
        results: list[Any] = []
        barrier = threading.Barrier(20)

        def go() -> None:
            c = app.test_client()
            barrier.wait()
            results.append(submit(c, body))

        threads = [threading.Thread(target=go) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in results), [r.get_data(as_text=True) for r in results][:2]
        bodies = [r.get_json() for r in results]
        assert all(b == bodies[0] for b in bodies)
        with app.extensions["cds"].store.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(pas_requests)).scalar() == 1
            assert conn.execute(select(func.count()).select_from(prior_auths)).scalar() == 1
    finally:
        if schema:
            from test_pas_e2e import drop_schema

            drop_schema(schema)


def _uuid() -> str:
    import uuid

    return str(uuid.uuid4())


# --- 3. updates, cancellation, inquiry ------------------------------------------------------------------------------
def test_an_update_adds_an_item_and_keeps_the_certified_one(client: FlaskClient, satisfied: Any) -> None:
    first = submit(client, pas_bundle(satisfied)).get_json()
    prior = pas_bundle(satisfied)["entry"][0]["resource"]
    second_order = med_order(oid="mr-2", status="active")
    update = pas_bundle(
        satisfied,
        ident="TX-2",
        claim_id="claim-2",
        prior=prior,
        items=[pas_item(1), pas_item(2, "MedicationRequest/mr-2")],
    )
    update["entry"].append({"fullUrl": "http://ehr.test/fhir/MedicationRequest/mr-2", "resource": second_order})
    resp = submit(client, update)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    bundle = resp.get_json()
    assert review_codes(bundle) == {1: "A1", 2: "A4"}  # spec-34/46: every submitted sequence, no other
    assert claim_response(bundle)["preAuthRef"] == claim_response(first)["preAuthRef"]


def test_item_cancellation_and_whole_request_cancellation(client: FlaskClient, app: Flask) -> None:
    order = signed_order(client, d68_2_order())
    first = pas_bundle(order)
    submit(client, first)
    prior = first["entry"][0]["resource"]
    upd = pas_bundle(order, ident="TX-2", claim_id="claim-2", prior=prior, items=[pas_item(1, code="3")])
    bundle = submit(client, upd).get_json()
    assert review_codes(bundle) == {1: "C"}
    rt = app.extensions["cds"]
    assert service.pended(rt) == []
    # the update is the current request now; cancelling it again as a whole is refused (cancelled cannot be updated)
    again = cancel_all(order, upd["entry"][0]["resource"], ident="TX-3", claim_id="claim-3")
    resp = submit(client, again)
    assert resp.status_code == 422, resp.get_data(as_text=True)
    assert resp.get_json()["issue"][0]["expression"] == ["Claim.related.claim"]


def test_a_whole_request_cancel_without_items(client: FlaskClient, app: Flask) -> None:
    order = signed_order(client, d68_2_order())
    first = pas_bundle(order)
    submit(client, first)
    cancel = cancel_all(order, first["entry"][0]["resource"])
    resp = submit(client, cancel)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    cr = claim_response(resp.get_json())
    assert "item" not in cr and "cancelled" in cr["processNote"][0]["text"]
    rows = pas_store.matching(app.extensions["cds"], "cigna", "MEMBER-001", "http://hl7.org/fhir/sid/us-npi|1234567893")
    assert [r["status"] for r in rows] == ["cancelled"]


def _pa_status(app: Flask, pa_id: str) -> str:
    pa = app.extensions["cds"].store.prior_auth(pa_id)
    assert pa is not None, pa_id
    return pa.status


def _audits(app: Flask, kind: str) -> list[Any]:
    with app.extensions["cds"].store.engine.connect() as conn:
        rows = conn.execute(select(audit_events).where(audit_events.c.kind == kind)).mappings().all()
    return [json.loads(r["detail"]) for r in rows]


def test_cancelling_a_certified_item_revokes_its_authorization(client: FlaskClient, app: Flask, satisfied: Any) -> None:
    """A cancelled request's authorization cannot be reused: the next order-sign of the order needs a new one."""
    first = pas_bundle(satisfied)
    pa = claim_response(submit(client, first).get_json())["preAuthRef"]
    assert pa == info_of(satisfied)["satisfied-pa-id"] and _pa_status(app, pa) == "active"
    upd = pas_bundle(
        satisfied, ident="TX-2", claim_id="claim-2", prior=first["entry"][0]["resource"], items=[pas_item(code="3")]
    )
    bundle = submit(client, upd).get_json()
    assert review_codes(bundle) == {1: "C"}
    cr = claim_response(bundle)
    assert "preAuthRef" not in cr
    assert f"Prior authorization {pa} is cancelled" in " ".join(n["text"] for n in cr["processNote"])
    assert _pa_status(app, pa) == "revoked"
    assert _audits(app, "prior-auth-revoked") == [{"revoked": [pa]}]
    again = signed_order(client, hook_request([med_order()], conditions=[condition("D68.311")]))
    assert info_of(again)["pa-needed"] == "satisfied"
    assert info_of(again)["satisfied-pa-id"] != pa
    # the retry of the cancellation is the stored answer and revokes nothing more
    assert submit(client, upd).get_json() == bundle
    assert len(_audits(app, "prior-auth-revoked")) == 1


def test_cancelling_the_whole_request_revokes_its_authorizations(
    client: FlaskClient, app: Flask, satisfied: Any
) -> None:
    first = pas_bundle(satisfied)
    pa = claim_response(submit(client, first).get_json())["preAuthRef"]
    cancel = cancel_all(satisfied, first["entry"][0]["resource"])
    assert submit(client, cancel).status_code == 200
    assert _pa_status(app, pa) == "revoked"


def test_cancelling_a_pended_item_revokes_nothing(client: FlaskClient, app: Flask, satisfied: Any) -> None:
    """Another order of the same drug for the same patient is pended; cancelling it leaves the first one's PA."""
    pa = info_of(satisfied)["satisfied-pa-id"]
    order = signed_order(client, d68_2_order())
    first = pas_bundle(order)
    assert review_codes(submit(client, first).get_json()) == {1: "A4"}
    upd = pas_bundle(
        order, ident="TX-2", claim_id="claim-2", prior=first["entry"][0]["resource"], items=[pas_item(code="3")]
    )
    assert review_codes(submit(client, upd).get_json()) == {1: "C"}
    assert _pa_status(app, pa) == "active" and _audits(app, "prior-auth-revoked") == []


def test_a_reviewers_approval_grants_its_own_period_over_an_active_authorization(
    client: FlaskClient, app: Flask, satisfied: Any
) -> None:
    """CRD issued a 12-month PA for NovoSeven; a second order for the same patient and drug is pended and a reviewer
    approves it through February: the response, the store and the next order-sign all give the reviewer's PA."""
    rt = app.extensions["cds"]
    crd_pa = info_of(satisfied)["satisfied-pa-id"]
    order = signed_order(client, d68_2_order())
    submit(client, pas_bundle(order))
    (queued,) = service.pended(rt)
    bundle = service.decide(rt, queued["id"], action="approve", reviewer="rn.lee", period_end="2027-02-28")
    cr = claim_response(bundle)
    granted = cr["preAuthRef"]
    assert granted != crd_pa
    assert cr["preAuthPeriod"] == {"start": "2026-11-23", "end": "2027-02-28"}
    pa = rt.store.prior_auth(granted)
    assert pa is not None and pa.status == "active" and pa.valid_to == date(2027, 2, 28)
    assert _pa_status(app, crd_pa) == "superseded"
    assert _audits(app, "prior-auth-granted") == [{"pa": granted, "valid_to": "2027-02-28", "superseded": [crd_pa]}]
    again = signed_order(client, hook_request([med_order()], conditions=[condition("D68.311")]))
    assert info_of(again)["satisfied-pa-id"] == granted


def test_a_decision_that_loses_the_race_grants_no_authorization(
    client: FlaskClient, app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The authorization is stored in the decision's transaction: an approval read before a denial was recorded is
    refused and leaves no authorization behind."""
    rt = app.extensions["cds"]
    submit(client, pas_bundle(signed_order(client, d68_2_order())))
    (queued,) = service.pended(rt)
    stale = pas_store.get(rt, queued["id"])
    service.decide(rt, queued["id"], action="deny", reviewer="md.khan", reason="not medically necessary")
    monkeypatch.setattr(pas_store, "get", lambda rt, request_id: stale)
    with pytest.raises(Conflict):
        service.decide(rt, queued["id"], action="approve", reviewer="rn.lee", period_end="2027-02-28")
    with rt.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(prior_auths)).scalar() == 0


def test_inquire_returns_the_current_response_or_none(client: FlaskClient, satisfied: Any) -> None:
    submitted = submit(client, pas_bundle(satisfied)).get_json()
    inquiry = pas_bundle(satisfied, ident="INQ-1", claim_id="inq-1")
    resp = client.post("/fhir/Claim/$inquire", data=json.dumps(inquiry), content_type=FHIR)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    params = resp.get_json()
    assert params["resourceType"] == "Parameters" and [p["name"] for p in params["parameter"]] == ["return"]
    found = params["parameter"][0]["resource"]
    assert found["type"] == "collection" and claim_response(found)["id"] == claim_response(submitted)["id"]
    assert claim_response(found)["preAuthRef"] == claim_response(submitted)["preAuthRef"]
    other = pas_bundle(satisfied, ident="INQ-2", claim_id="inq-2")
    other["entry"][2]["resource"]["subscriberId"] = "SOMEONE-ELSE"
    none = client.post("/fhir/Claim/$inquire", data=json.dumps(other), content_type=FHIR)
    assert none.status_code == 200 and none.get_json()["parameter"] == []


def _inquire(client: FlaskClient, order: dict[str, Any], items: list[dict[str, Any]], ident: str) -> list[str]:
    """The ClaimResponse ids an inquiry with these items returns."""
    body = pas_bundle(order, ident=ident, claim_id=ident.lower(), items=items)
    resp = client.post("/fhir/Claim/$inquire", data=json.dumps(body), content_type=FHIR)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [claim_response(p["resource"])["id"] for p in resp.get_json()["parameter"]]


def test_inquire_matches_the_items_service_and_authorization_number(client: FlaskClient, satisfied: Any) -> None:
    """Query by example (§spec-43): the inquiry's item code, a code range, not-applicable (any service), and the
    authorization number; two requests of one patient from one provider, for two drugs."""
    novoseven = claim_response(submit(client, pas_bundle(satisfied)).get_json())
    other_order = med_order(oid="mr-2", code="J7212", status="active")
    other = pas_bundle(other_order, ident="TX-2", claim_id="claim-2", items=[pas_item(1, "MedicationRequest/mr-2")])
    other["entry"][0]["resource"]["item"][0]["productOrService"]["coding"][0]["code"] = "J7212"
    sevenfact = claim_response(submit(client, other).get_json())
    both = [novoseven["id"], sevenfact["id"]]

    def item(code: str, seq: int = 1, **ext: str) -> dict[str, Any]:
        extensions = [{"url": PAS + f"extension-{k}", "valueString": v} for k, v in ext.items()]
        hcpcs = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
        return {
            "sequence": seq,
            "extension": extensions,
            "productOrService": {"coding": [{"system": hcpcs, "code": code}]},
        }

    absent = {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "not-applicable"}
    assert _inquire(client, satisfied, [item("J7189")], "INQ-1") == [novoseven["id"]]
    assert _inquire(client, satisfied, [item("J7212")], "INQ-2") == [sevenfact["id"]]
    assert _inquire(client, satisfied, [item("J7189"), item("J7212", 2)], "INQ-3") == both
    assert _inquire(client, satisfied, [{"sequence": 1, "productOrService": {"coding": [absent]}}], "INQ-4") == both
    assert _inquire(client, satisfied, [], "INQ-5") == both
    ranged = item("J7100")
    ranged["extension"].append(
        {"url": PAS + "extension-productOrServiceCodeEnd", "valueCodeableConcept": {"coding": [{"code": "J7199"}]}}
    )
    assert _inquire(client, satisfied, [ranged], "INQ-6") == [novoseven["id"]]
    assert _inquire(client, satisfied, [item("J0001")], "INQ-7") == []
    by_number = {"sequence": 1, "productOrService": {"coding": [absent]}, "extension": []}
    by_number["extension"] = [{"url": PAS + "extension-authorizationNumber", "valueString": novoseven["preAuthRef"]}]
    assert _inquire(client, satisfied, [by_number], "INQ-8") == [novoseven["id"]]
    assert _inquire(client, satisfied, [item("J7212", authorizationNumber=novoseven["preAuthRef"])], "INQ-9") == []
    assert _inquire(client, satisfied, [item("J7189", authorizationNumber="PA-UNKNOWN")], "INQ-10") == []


# --- 4. reviewer contract (used by the reviewer engineer) ------------------------------------------------------
def test_reviewer_decisions_approve_modify_deny(client: FlaskClient, app: Flask) -> None:
    rt = app.extensions["cds"]
    ids = []
    for n in range(3):
        order = signed_order(client, d68_2_order())
        submit(client, pas_bundle(order, ident=f"TX-{n}", claim_id=f"claim-{n}"))
    ids = [r["id"] for r in service.pended(rt)]
    assert len(ids) == 3
    with pytest.raises(Exception, match="reason"):
        service.decide(rt, ids[0], action="deny", reviewer="dr-r")
    denied = service.decide(rt, ids[0], action="deny", reviewer="dr-r", reason="not medically necessary")
    assert (
        review_codes(denied) == {1: "A3"}
        and "not medically necessary" in denied["entry"][0]["resource"]["processNote"][0]["text"]
    )  # noqa: E501
    approved = service.decide(rt, ids[1], action="approve", reviewer="dr-r", period_end="2027-02-28")
    assert review_codes(approved) == {1: "A1"} and claim_response(approved)["preAuthPeriod"]["end"] == "2027-02-28"
    modified = service.decide(rt, ids[2], action="modify", reviewer="dr-r", quantity=2)
    assert review_codes(modified) == {1: "A6"}
    add = claim_response(modified)["addItem"][0]
    assert add["itemSequence"] == [1] and add["quantity"] == {"value": 2}
    assert service.pended(rt) == []
    assert [d["reviewer"] for d in pas_store.decisions_for(rt, ids[0])] == ["dr-r"]
    assert [e["kind"] for e in pas_store.audit_for(rt, ids[0])] == ["submit", "decision"]
    with pytest.raises(Exception, match="nothing is pended"):
        service.decide(rt, ids[1], action="approve", reviewer="dr-r")
    # inquiry now shows the decision
    assert pas_store.get(rt, ids[0])["status"] == "denied"


# --- 6. auth --------------------------------------------------------------------------------------------------
def test_pas_endpoints_need_a_token_with_the_claim_scopes(make_app: Any, client_key: Any) -> None:
    app = make_app(auth_required=True)
    c = app.test_client()
    body = pas_bundle(med_order(status="active"))
    assert submit(c, body).status_code == 401
    assert c.post("/fhir/Claim/$inquire", data=json.dumps(body), content_type=FHIR).status_code == 401
    read_only = access(app, client_key, "system/Claim.r")
    resp = submit(c, body, headers={"Authorization": f"Bearer {read_only}"})
    assert resp.status_code == 403 and resp.get_json()["resourceType"] == "OperationOutcome"
    token = access(app, client_key, "system/Claim.c system/Claim.r")
    ok = submit(c, body, headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200, ok.get_data(as_text=True)
    row = pas_store.open_requests(app.extensions["cds"])[0]
    assert row["submitter"] == TEST_ISS
