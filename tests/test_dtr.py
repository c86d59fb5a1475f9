"""DTR payer service (issue 8 items 1, 2, 5, 7): the package for a coverage assertion, answers that settle it, the
stand-alone package, ValueSet/$expand, $log-questionnaire-errors and the CapabilityStatement. Each request is what
a DTR client sends; each check is a rule of DTR 2.2.0 (or the 2.0.1 shape Inferno validates) or of the issue."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from builders import condition, coverage, coverage_info, hook_request, med_order, role
from conftest import BASE, post_hook
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
from flask import Flask
from flask.testing import FlaskClient

FHIR = "application/fhir+json"
ORIGIN = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/information-origin"


def sign(client: FlaskClient, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    resp = post_hook(client, body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    data = resp.get_json()
    return data, coverage_info(data["systemActions"][0]["resource"])


def package(client: FlaskClient, *parts: dict[str, Any], path: str = "/fhir/Questionnaire/$questionnaire-package"):
    return client.post(path, json={"resourceType": "Parameters", "parameter": list(parts)}, content_type=FHIR)


def coverage_part(cov: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": "coverage", "resource": cov or coverage()}


def context(assertion_id: str) -> dict[str, Any]:
    return {"name": "context", "valueString": assertion_id}


def d68_2_order() -> dict[str, Any]:
    """NovoSeven for a patient with D68.2 on record, a hematologist prescribing: only the indication is asked, and
    the record suggests IP0356-1 (issue 8: 1 answer, not 8)."""
    return hook_request([med_order(dose=30, every_hours=56, days=None)], conditions=[condition("D68.2")])


def entries(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def the_bundle(resp: Any, name: str = "packagebundle") -> dict[str, Any]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["resourceType"] == "Parameters"
    found = [p["resource"] for p in body["parameter"] if p["name"] == name]
    assert len(found) == 1, body
    return found[0]


def completed(draft: dict[str, Any], *answers: dict[str, Any]) -> dict[str, Any]:
    """The draft response as a clinician completes it: the prefilled answers kept, these added, signed."""
    qr = copy.deepcopy(draft)
    qr["status"] = "completed"
    qr["author"] = {"reference": "Practitioner/pract-1"}
    qr.setdefault("item", []).extend(answers)
    qr["item"].append({"linkId": "attestation", "answer": [{"valueBoolean": True}]})
    return qr


def submit(client: FlaskClient, qr: dict[str, Any]):
    return client.post("/fhir/QuestionnaireResponse", json=qr, content_type=FHIR)


@pytest.fixture
def signed(client: FlaskClient) -> dict[str, Any]:
    _, info = sign(client, d68_2_order())
    return info


# --- 1. the package ------------------------------------------------------------------------------------------------
def test_the_package_for_a_crd_context_holds_the_form_its_draft_and_every_library(
    client: FlaskClient, signed: dict[str, Any]
) -> None:
    bundle = the_bundle(package(client, coverage_part(), context(signed["coverage-assertion-id"][0])))
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    assert bundle["entry"][0]["resource"]["resourceType"] == "Questionnaire"  # dtrb-1
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("Questionnaire") == 1 and kinds.count("QuestionnaireResponse") == 1
    assert set(kinds) <= {"Questionnaire", "QuestionnaireResponse", "Library", "ValueSet"}  # closed slicing
    form = bundle["entry"][0]["resource"]
    canonical = f"{form['url']}|{form['version']}"
    assert [canonical] == signed["questionnaire"]
    draft = entries(bundle, "QuestionnaireResponse")[0]
    QuestionnaireResponse.model_validate(draft)
    assert draft["questionnaire"] == canonical and draft["subject"] == {"reference": "Patient/pat-1"}
    exts = {e["url"].rsplit("/", 1)[-1]: e for e in draft["extension"]}
    assert exts["qr-coverage"]["valueReference"] == {"reference": "Coverage/cov-1"}
    assert exts["qr-context"]["valueReference"]["reference"].startswith("MedicationRequest/")
    prefilled = {i["linkId"]: i["answer"][0] for i in draft["item"]}
    assert prefilled["IP0356-MNC"]["valueCoding"]["code"] == "IP0356-1"
    origin = prefilled["IP0356-MNC"]["extension"][0]
    assert origin["url"] == ORIGIN and origin["extension"][0]["valueCode"] == "auto-server"


def test_every_library_the_form_needs_is_in_the_package_with_cql_and_elm(
    client: FlaskClient, signed: dict[str, Any]
) -> None:
    bundle = the_bundle(package(client, coverage_part(), context(signed["coverage-assertion-id"][0])))
    form = bundle["entry"][0]["resource"]
    libraries = {f"{lib['url']}|{lib['version']}": lib for lib in entries(bundle, "Library")}
    wanted = [e["valueCanonical"] for e in form["extension"] if e["url"].endswith("cqf-library")]
    assert wanted and all(w in libraries for w in wanted), (wanted, list(libraries))
    names = [lib["name"] for lib in libraries.values()]
    assert len(names) == len(set(names)), "library names are unique in a package"
    for lib in libraries.values():
        types = [c["contentType"] for c in lib["content"]]
        assert "text/cql" in types and "application/elm+json" in types
        assert all(base64.b64decode(c["data"]) for c in lib["content"])
        for dep in lib.get("relatedArtifact", ()):  # depends-on, recursively, version-specific
            if dep["type"] == "depends-on" and "/Library/" in dep["resource"]:
                assert dep["resource"] in libraries
    expressions = [
        ext["valueExpression"]
        for item in form["item"]
        for ext in item.get("extension", ())
        if ext["url"].endswith("initialExpression")
    ]
    lib_name = next(lib["name"] for c, lib in libraries.items() if c == wanted[0])
    assert all(e["language"] == "text/cql" and e["expression"].startswith(f'"{lib_name}".') for e in expressions)
    value_sets = entries(bundle, "ValueSet")
    assert all("|" not in vs["url"] and vs["version"] for vs in value_sets)
    assert all("expansion" in vs for vs in value_sets if len(vs["compose"]["include"][0].get("concept", ())) < 40)


def test_the_system_level_path_answers_the_same(client: FlaskClient, signed: dict[str, Any]) -> None:
    bundle = the_bundle(
        package(
            client, coverage_part(), context(signed["coverage-assertion-id"][0]), path="/fhir/$questionnaire-package"
        )
    )
    assert bundle["entry"][0]["resource"]["url"] in signed["questionnaire"][0]


def test_items_carry_their_criterion_and_the_indication_options_theirs(
    client: FlaskClient, signed: dict[str, Any]
) -> None:
    form = the_bundle(package(client, coverage_part(), context(signed["coverage-assertion-id"][0])))["entry"][0]
    items = {i["linkId"]: i for i in form["resource"]["item"]}
    system = f"{BASE}/fhir/CodeSystem/policy-criteria"
    assert items["IP0356-MNC"]["code"][0]["system"] == system
    assert {o["valueCoding"]["code"] for o in items["IP0356-MNC"]["answerOption"]} >= {"IP0356-1", "IP0356-4"}
    assert items["IP0356-4A.i"]["code"][0]["code"] == "IP0356-4A.i"
    assert items["IP0356-4A.i"]["enableWhen"][0]["answerCoding"]["code"] == "IP0356-4"
    assert items["attestation"]["required"] is True and items["attestation"]["type"] == "boolean"
    resource = form["resource"]
    assert resource["subjectType"] == ["Patient"] and resource["effectivePeriod"]["start"]
    assert any(e["url"].endswith("launchContext") for e in resource["extension"])


@pytest.mark.parametrize(
    ("parts", "status", "what"),
    [
        ([context("no-such-assertion")], 404, "context"),
        ([], 400, "dtr-1"),
    ],
)
def test_bad_package_requests_are_4xx_operation_outcomes(
    client: FlaskClient, parts: list[dict[str, Any]], status: int, what: str
) -> None:
    resp = package(client, coverage_part(), *parts)
    assert resp.status_code == status and resp.get_json()["resourceType"] == "OperationOutcome", what


def test_no_coverage_and_another_coverage_are_refused(client: FlaskClient, signed: dict[str, Any]) -> None:
    ident = context(signed["coverage-assertion-id"][0])
    assert package(client, ident).status_code == 400
    other = package(client, coverage_part(coverage(cid="cov-other")), ident)
    assert other.status_code == 422 and other.get_json()["resourceType"] == "OperationOutcome"


def test_the_dtr_2_0_1_shape_for_inferno(make_app: Any, client: FlaskClient) -> None:
    app = make_app(dtr_version="2.0.1")
    c = app.test_client()
    _, info = sign(c, d68_2_order())
    bundle = the_bundle(package(c, coverage_part(), context(info["coverage-assertion-id"][0])), "PackageBundle")
    draft = entries(bundle, "QuestionnaireResponse")[0]
    links = [e["url"].rsplit("/", 1)[-1] for e in draft["extension"]]
    assert "qr-coverage" not in links and links.count("qr-context") == 2
    assert draft["item"][0]["answer"][0]["extension"][0]["extension"][0]["valueCode"] == "auto"


# --- 5. answers settle the determination -----------------------------------------------------------------------------
def draft_of(client: FlaskClient, info: dict[str, Any]) -> dict[str, Any]:
    bundle = the_bundle(package(client, coverage_part(), context(info["coverage-assertion-id"][0])))
    return entries(bundle, "QuestionnaireResponse")[0]


def test_answers_that_meet_the_policy_issue_the_pa_under_the_same_assertion(
    client: FlaskClient, app: Flask, signed: dict[str, Any]
) -> None:
    """The clinician confirms the suggested indication and signs: every criterion of IP0356-1 is met."""
    draft = draft_of(client, signed)
    resp = submit(client, completed(draft))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    qr = resp.get_json()
    info = coverage_info(qr)
    assert info["pa-needed"] == ["satisfied"] and info["satisfied-pa-id"]
    assert info["coverage-assertion-id"] == signed["coverage-assertion-id"]
    kept = {i["linkId"]: i["answer"][0] for i in qr["item"]}
    assert kept["IP0356-MNC"]["extension"][0]["extension"][0]["valueCode"] == "auto-server"
    signed_by = kept["attestation"]["extension"][0]["extension"]
    assert (
        signed_by[0]["valueCode"] == "manual" and signed_by[1]["valueReference"]["reference"] == "Practitioner/pract-1"
    )
    store = app.extensions["cds"].store
    record = store.assertion(signed["coverage-assertion-id"][0])
    assert record.satisfied_pa_id == info["satisfied-pa-id"][0] and record.questionnaire is None
    assert len(store.responses_for(record.assertion_id)) == 1
    read = client.get(f"/fhir/QuestionnaireResponse/{record.assertion_id}").get_json()  # the answers, once given
    assert read["status"] == "completed" and coverage_info(read)["satisfied-pa-id"] == info["satisfied-pa-id"]
    again = package(client, coverage_part(), context(record.assertion_id))  # DTR §oper-8: nothing needed now
    body = again.get_json()
    assert again.status_code == 200 and not [p for p in body["parameter"] if p["name"] == "packagebundle"]
    outcome = next(p["resource"] for p in body["parameter"] if p["name"] == "outcome")
    assert info["satisfied-pa-id"][0] in outcome["issue"][0]["details"]["text"]


def test_a_bundle_of_the_response_is_accepted(client: FlaskClient, signed: dict[str, Any]) -> None:
    qr = completed(draft_of(client, signed))
    resp = submit(client, {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": qr}]})
    assert resp.status_code == 201 and coverage_info(resp.get_json())["pa-needed"] == ["satisfied"]


def test_an_answer_that_fails_a_criterion_is_not_covered_citing_it(client: FlaskClient) -> None:
    body = hook_request([med_order()], conditions=[condition("D68.311")], roles=[role("207RX0202X")])
    _, info = sign(client, body)  # acquired hemophilia, the prescriber is no hematologist: 3B is asked
    qr = completed(draft_of(client, info), {"linkId": "IP0356-3B", "answer": [{"valueBoolean": False}]})
    resp = submit(client, qr)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    got = coverage_info(resp.get_json())
    assert got["covered"] == ["not-covered"] and "IP0356-3B" in got["reason"][0]["text"]


def test_a_weight_in_pounds_is_converted_and_one_in_ml_refused(client: FlaskClient, app: Flask) -> None:
    order = med_order(dose=5, dose_unit="mg", every_hours=24, days=3)
    _, info = sign(client, hook_request([order], conditions=[condition("D68.311")], observations=[]))
    draft = draft_of(client, info)
    wrong = completed(
        draft,
        {
            "linkId": "IP0356-3.dosing",
            "answer": [{"valueQuantity": {"value": 70, "code": "mL", "system": "http://unitsofmeasure.org"}}],
        },
    )
    refused = submit(client, wrong)
    assert refused.status_code == 400
    assert "mL cannot be converted to kg" in refused.get_json()["issue"][0]["details"]["text"]
    assert app.extensions["cds"].store.assertion(info["coverage-assertion-id"][0]).questionnaire, "nothing stored"
    pounds = completed(
        draft,
        {
            "linkId": "IP0356-3.dosing",
            "answer": [{"valueQuantity": {"value": 154.3, "code": "[lb_av]", "system": "http://unitsofmeasure.org"}}],
        },
    )
    resp = submit(client, pounds)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert coverage_info(resp.get_json())["pa-needed"] == ["satisfied"]  # 5 mg x 3 days for 70 kg is in the limit


def test_another_patient_missing_answers_or_no_signature_store_nothing(
    client: FlaskClient, app: Flask, signed: dict[str, Any]
) -> None:
    draft = draft_of(client, signed)
    other = completed(draft)
    other["subject"] = {"reference": "Patient/someone-else"}
    assert submit(client, other).status_code == 422
    unsigned = completed(draft)
    unsigned["item"] = [i for i in unsigned["item"] if i["linkId"] != "attestation"]
    assert submit(client, unsigned).status_code == 400
    empty = completed(draft)
    empty["item"] = [i for i in empty["item"] if i["linkId"] == "attestation"]
    missing = submit(client, empty)
    assert missing.status_code == 400 and "IP0356-MNC" in missing.get_json()["issue"][0]["details"]["text"]
    draft_in_progress = copy.deepcopy(draft)
    assert submit(client, draft_in_progress).status_code == 400
    store = app.extensions["cds"].store
    assert store.assertion(signed["coverage-assertion-id"][0]).questionnaire and not store.responses_for(
        signed["coverage-assertion-id"][0]
    )


def test_an_unknown_or_superseded_form_version_is_refused(client: FlaskClient, signed: dict[str, Any]) -> None:
    qr = completed(draft_of(client, signed))
    url, _ = qr["questionnaire"].split("|")
    assert submit(client, {**qr, "questionnaire": f"{url}|1"}).status_code == 409
    assert submit(client, {**qr, "questionnaire": f"{BASE}/fhir/Questionnaire/nope|2"}).status_code == 422
    no_id = {k: v for k, v in qr.items() if k != "identifier"}
    assert submit(client, no_id).status_code == 400
    done = submit(client, qr)
    assert done.status_code == 201
    assert submit(client, qr).status_code == 409, "a settled assertion is not settled twice"


def test_malformed_bodies_are_operation_outcomes(client: FlaskClient) -> None:
    for body in (b"{", b"[]", b'{"resourceType": "Patient"}'):
        resp = client.post("/fhir/QuestionnaireResponse", data=body, content_type=FHIR)
        assert resp.status_code == 400 and resp.get_json()["resourceType"] == "OperationOutcome"
    resp = client.post(
        "/fhir/Questionnaire/$questionnaire-package", data=b'{"resourceType":"Bundle"}', content_type=FHIR
    )
    assert resp.status_code == 400


# --- stand-alone (orders, no CRD context) ------------------------------------------------------------------------
def test_a_stand_alone_package_asks_everything_the_order_alone_leaves_open(client: FlaskClient, app: Flask) -> None:
    order = med_order()
    order["subject"] = {"reference": "Patient/pat-1"}
    bundle = the_bundle(package(client, coverage_part(), {"name": "order", "resource": order}))
    form = bundle["entry"][0]["resource"]
    asked = [i["linkId"] for i in form["item"] if i["type"] != "display"]
    assert "IP0356-MNC" in asked and "attestation" in asked
    draft = entries(bundle, "QuestionnaireResponse")[0]
    made = app.extensions["cds"].store.exchanges_for(f"dtr-package:{draft['identifier']['value']}")
    assert len(made) == 1 and made[0]["status"] == 200 and form["url"] in made[0]["response"], "the call is audited"
    qr = completed(
        draft,
        {
            "linkId": "IP0356-MNC",
            "answer": [{"valueCoding": {"system": f"{BASE}/fhir/CodeSystem/policy-criteria", "code": "IP0356-3"}}],
        },
        {"linkId": "IP0356-3A", "answer": [{"valueDate": "1970-01-01"}]},
        {"linkId": "IP0356-3B", "answer": [{"valueBoolean": True}]},
    )
    resp = submit(client, qr)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    got = coverage_info(resp.get_json())  # the attested answers meet IP0356-3; the dose is per kg, no weight needed
    assert got["pa-needed"] == ["satisfied"] and "IP0356-3 " in got["reason"][0]["text"]


def test_an_order_of_another_kind_needs_no_form(client: FlaskClient) -> None:
    service_request = {"resourceType": "ServiceRequest", "id": "sr-1", "status": "draft", "intent": "order"}
    body = package(client, coverage_part(), {"name": "order", "resource": service_request}).get_json()
    assert not [p for p in body["parameter"] if p["name"] == "packagebundle"]
    assert next(p for p in body["parameter"] if p["name"] == "outcome")


# --- 7. other operations -----------------------------------------------------------------------------------------
def test_value_sets_of_the_package_expand(client: FlaskClient, signed: dict[str, Any]) -> None:
    bundle = the_bundle(package(client, coverage_part(), context(signed["coverage-assertion-id"][0])))
    vs = entries(bundle, "ValueSet")[0]
    got = client.get(f"/fhir/ValueSet/$expand?url={vs['url']}")
    assert got.status_code == 200, got.get_data(as_text=True)
    expansion = got.get_json()["expansion"]
    assert expansion["timestamp"] and expansion["contains"]
    assert client.get("/fhir/ValueSet/$expand?url=http://nowhere/ValueSet/x").status_code == 404
    assert client.get("/fhir/ValueSet/$expand").status_code == 400


def test_log_questionnaire_errors_records_and_validates(client: FlaskClient) -> None:
    ok = client.post(
        "/fhir/Questionnaire/$log-questionnaire-errors",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "questionnaire", "valueCanonical": f"{BASE}/fhir/Questionnaire/x|2"},
                {
                    "name": "operationOutcome",
                    "resource": {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "processing"}],
                    },
                },
            ],
        },
        content_type=FHIR,
    )
    assert ok.status_code == 200
    bad = client.post(
        "/fhir/Questionnaire/$log-questionnaire-errors", json={"resourceType": "Parameters"}, content_type=FHIR
    )
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"


def test_the_capability_statement_lists_the_dtr_operations(client: FlaskClient) -> None:
    cap = client.get("/fhir/metadata").get_json()
    ops = {(r["type"], o["name"]) for r in cap["rest"][0]["resource"] for o in r.get("operation", ())}
    assert {("Questionnaire", "questionnaire-package"), ("Questionnaire", "log-questionnaire-errors")} <= ops
    assert ("ValueSet", "expand") in ops and ("Questionnaire", "next-question") in ops


def test_the_documentation_card_links_the_form_page(client: FlaskClient) -> None:
    data, info = sign(client, d68_2_order())
    links = [link["url"] for card in data["cards"] for link in card.get("links", ())]
    page = [u for u in links if f"/dtr/{info['coverage-assertion-id'][0]}?t=" in u]
    assert page and page[0].startswith(BASE)


def test_dtr_endpoints_need_a_backend_services_token(make_app: Any, client_key: Any) -> None:
    app = make_app(auth_required=True)
    c = app.test_client()
    resp = package(c, coverage_part(), context("x"))
    assert resp.status_code == 401 and resp.get_json()["resourceType"] == "OperationOutcome"
    assert c.post("/fhir/QuestionnaireResponse", json={}, content_type=FHIR).status_code == 401
    assert c.get("/fhir/ValueSet/$expand?url=x").status_code == 401


def test_the_draft_names_the_clinician_and_a_changed_prefill_is_an_override(
    client: FlaskClient, signed: dict[str, Any]
) -> None:
    """The draft's author is the hook's user; an answer the clinician changed stays marked as theirs (override, with
    the author) even when the client sends it still marked auto-server."""
    draft = draft_of(client, signed)
    assert draft["author"] == {"reference": "Practitioner/pract-1"}
    qr = completed(draft)
    choice = next(i for i in qr["item"] if i["linkId"] == "IP0356-MNC")
    choice["answer"][0]["valueCoding"] = {"system": f"{BASE}/fhir/CodeSystem/policy-criteria", "code": "IP0356-3"}
    resp = submit(client, qr)  # acquired hemophilia instead: 3A from the birth date, 3B from the hematologist
    assert resp.status_code == 201, resp.get_data(as_text=True)
    answer = next(i for i in resp.get_json()["item"] if i["linkId"] == "IP0356-MNC")["answer"][0]
    origin = {p["url"]: p for p in answer["extension"][-1]["extension"]}
    assert origin["source"]["valueCode"] == "override"
    assert origin["author"]["valueReference"] == {"reference": "Practitioner/pract-1"}


def test_a_coded_result_is_offered_in_the_system_its_cql_answers_with(app: Flask) -> None:
    """A qualitative lab (HBsAg positive / negative) is asked with the codes the library's define returns, so the
    client's prepopulated answer matches an option; the indication question keeps the criteria system."""
    from cds import constants
    from cds.dtr import cql, forms
    from policies.questions import Question

    rt = app.extensions["cds"]
    policy = rt.policies.policies["ph109-gene-therapy"]
    lab = Question(
        "X-1", "choice", "HBsAg", options=(("positive", "Positive"), ("negative", "Negative")), input="lab.hbsag"
    )
    which = Question("X-MNC", "choice", "Which indication?", options=(("X-2", "Two"),))
    form = forms.build(policy, policy.products[0], [lab, which], BASE)
    options = {
        i["linkId"]: i["answerOption"][0]["valueCoding"]["system"] for i in form["item"] if i["type"] == "choice"
    }
    assert options == {"X-1": constants.RESULT_SYSTEM, "X-MNC": f"{BASE}/fhir/CodeSystem/policy-criteria"}
    assert f"system: '{constants.RESULT_SYSTEM}'" in cql.generate(policy, rt.mappings)
