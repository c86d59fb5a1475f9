"""The OpenAPI 3.1 description at /openapi.json: generated from the route registry, complete, valid, and telling the
truth about errors, media types and security (the fuzz test, tests/test_fuzz_api.py, checks it against a server)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from conftest import BASE, TEST_ISS, ClientKey
from flask import Flask
from openapi_spec_validator import OpenAPIV31SpecValidator

from cds import openapi, smart

ERROR_SCHEMAS = {"OperationOutcome", "OAuthError", "Html", "Readiness"}
PAGE_TAGS = {"Reviewer pages", "DTR form page", "Assets"}


def _doc(app: Flask) -> dict[str, Any]:
    resp = app.test_client().get("/openapi.json")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body: dict[str, Any] = resp.get_json()
    return body


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def _rules(app: Flask) -> set[tuple[str, str, str]]:
    return {
        (openapi.openapi_path(rule.rule)[0], method.lower(), rule.endpoint)
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or set()) - openapi.NOT_DOCUMENTED
    }


@pytest.fixture
def secured(make_app: Callable[..., Flask]) -> Flask:
    return make_app(auth_required=True, discovery_auth_required=True, metrics_token="m" * 32)


def test_every_route_has_a_table_entry_and_an_operation(app: Flask) -> None:
    """A new route (``GET /metrics`` included) fails here until cds.openapi.OPERATIONS describes it."""
    table = openapi.operations(app)
    missing = sorted(f"{method} {endpoint}" for (endpoint, method), op in table.items() if op is openapi.UNDOCUMENTED)
    assert missing == [], f"routes without an entry in cds.openapi.OPERATIONS: {missing}"
    documented = {(path, method, op["x-endpoint"]) for path, method, op in _operations(_doc(app))}
    assert documented == _rules(app)


def test_metrics_is_documented(app: Flask) -> None:
    assert "metrics.scrape" in app.view_functions, "GET /metrics is served with the default settings"
    op = _doc(app)["paths"]["/metrics"]["get"]
    assert op["x-endpoint"] == "metrics.scrape" and "text/plain" in op["responses"]["200"]["content"]


def test_every_table_entry_names_a_route(app: Flask) -> None:
    methods: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        methods.setdefault(rule.endpoint, set()).update((rule.methods or set()) - openapi.NOT_DOCUMENTED)
    stale = sorted(set(openapi.OPERATIONS) - set(methods))
    assert stale == [], f"entries of cds.openapi.OPERATIONS for endpoints that do not exist: {stale}"
    for endpoint, entry in openapi.OPERATIONS.items():
        if not isinstance(entry, openapi.Op):
            assert set(entry) == methods[endpoint], endpoint


def test_a_route_added_without_an_entry_is_caught_and_the_document_still_served(app: Flask) -> None:
    app.add_url_rule("/new/<thing>", "new_thing", lambda thing: thing)
    table = openapi.operations(app)
    assert table[("new_thing", "GET")] is openapi.UNDOCUMENTED
    op = _doc(app)["paths"]["/new/{thing}"]["get"]
    assert op["tags"] == ["Undocumented"] and op["parameters"][0]["name"] == "thing"


def test_the_document_is_valid_openapi_3_1(secured: Flask, app: Flask) -> None:
    for each in (secured, app):
        doc = _doc(each)
        assert doc["openapi"].startswith("3.1.")
        errors = [str(e.message) for e in OpenAPIV31SpecValidator(doc).iter_errors()]
        assert errors == []
        loaded = schemathesis.openapi.from_dict(doc)
        problems = [str(r.err()) for r in loaded.get_all_operations() if not hasattr(r, "ok")]
        assert problems == []
        assert len(list(loaded.get_all_operations())) == len(_rules(each))


def test_served_without_auth_cacheable_and_naming_this_deployment(secured: Flask) -> None:
    resp = secured.test_client().get("/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert resp.headers["Cache-Control"].startswith("public")
    assert resp.get_json()["servers"] == [{"url": BASE}]


def test_flask_rules_become_openapi_paths() -> None:
    assert openapi.openapi_path("/dtr/assets/lforms/<path:path>") == ("/dtr/assets/lforms/{path}", [("path", "path")])
    assert openapi.openapi_path("/cds-services/<service_id>/feedback") == (
        "/cds-services/{service_id}/feedback",
        [("service_id", "default")],
    )
    assert openapi.openapi_path("/a/<int(min=1):n>/<uuid:u>") == ("/a/{n}/{u}", [("n", "int"), ("u", "uuid")])


def test_path_parameters(app: Flask) -> None:
    doc = _doc(app)
    lforms = doc["paths"]["/dtr/assets/lforms/{path}"]["get"]["parameters"]
    assert lforms[0]["in"] == "path" and lforms[0]["x-flask-converter"] == "path" and lforms[0]["required"]
    for path in ("/cds-services/{service_id}", "/cds-services/{service_id}/feedback"):
        (param,) = doc["paths"][path]["post"]["parameters"]
        assert param["schema"]["enum"] == list(app.extensions["cds.services"])
    for path, _, op in _operations(doc):
        in_path = [p["name"] for p in op.get("parameters", ()) if p["in"] == "path"]
        assert in_path == [part[1:-1] for part in path.split("/") if part.startswith("{")], path


def test_summaries_come_from_the_views(app: Flask) -> None:
    for path, method, op in _operations(_doc(app)):
        endpoint = op["x-endpoint"]
        entry = openapi.OPERATIONS[endpoint]
        table = entry if isinstance(entry, openapi.Op) else entry[method.upper()]
        from_view, description = openapi._docstring(app.view_functions[endpoint])
        assert 0 < len(op["summary"]) <= openapi.MAX_SUMMARY, (path, method)
        assert op["summary"] == (from_view or table.summary), (path, method)
        if description:
            assert op["description"] == description


def test_every_error_response_is_the_error_shape(app: Flask) -> None:
    """Every documented 4xx and 5xx is an OperationOutcome (FHIR JSON under /fhir), or one of the shapes a protocol
    fixes: the OAuth error of the token endpoint, an HTML page of the pages, the readiness probe's 503."""
    for path, method, op in _operations(_doc(app)):
        for status, response in op["responses"].items():
            if status == "default" or int(status) < 400:
                continue
            content = response["content"]
            refs = {m: c["schema"]["$ref"].rsplit("/", 1)[-1] for m, c in content.items()}
            assert set(refs.values()) <= ERROR_SCHEMAS, (path, method, status)
            for media, ref in refs.items():
                if ref == "OperationOutcome":
                    assert media == ("application/fhir+json" if path.startswith("/fhir") else "application/json")
                elif ref == "OAuthError":
                    assert path == "/auth/token" and status in ("400", "401", "429")
                elif ref == "Html":
                    assert media == "text/html" and op["tags"][0] in PAGE_TAGS, (path, method, status)
                else:
                    assert (path, status) == ("/readyz", "503")


def test_the_fhir_bodies_are_fhir_json(app: Flask) -> None:
    doc = _doc(app)
    for path, method, op in _operations(doc):
        if not path.startswith("/fhir") or "requestBody" not in op:
            continue
        assert set(op["requestBody"]["content"]) == {"application/fhir+json", "application/json"}, (path, method)
        ok = next(r for s, r in op["responses"].items() if s.startswith("2"))
        assert set(ok.get("content", {"application/fhir+json": 0})) == {"application/fhir+json"}, (path, method)
    schemas = doc["components"]["schemas"]
    for name in ("Parameters", "Bundle", "QuestionnaireResponse", "Subscription", "ValueSet", "CapabilityStatement"):
        assert schemas[name]["properties"]["resourceType"] == {"const": name}


def test_security_follows_the_settings(secured: Flask, app: Flask) -> None:
    on, off = _doc(secured)["paths"], _doc(app)["paths"]
    assert on["/cds-services/{service_id}"]["post"]["security"] == [{"cdsHooksJwt": []}]
    assert on["/cds-services"]["get"]["security"] == [{"cdsHooksJwt": []}]
    assert on["/fhir/Claim/$submit"]["post"]["security"] == [{"smartBackendServices": ["system/Claim.c"]}]
    assert on["/metrics"]["get"]["security"] == [{"metricsToken": []}]
    assert on["/review/api/requests/{request_id}/decision"]["post"]["security"] == [
        {"reviewerSession": [], "reviewerCsrf": []}
    ]
    assert off["/cds-services/{service_id}"]["post"]["security"] == []
    assert off["/fhir/Claim/$submit"]["post"]["security"] == []
    assert off["/cds-services"]["get"]["security"] == []
    for item in (on, off):
        assert item["/openapi.json"]["get"]["security"] == [] and item["/healthz"]["get"]["security"] == []
    flow = _doc(secured)["components"]["securitySchemes"]["smartBackendServices"]["flows"]["clientCredentials"]
    assert flow["tokenUrl"] == f"{BASE}/auth/token"
    used = {
        s
        for item in on.values()
        for op in item.values()
        for r in op["security"]
        for s in r.get("smartBackendServices", ())
    }
    assert used <= set(flow["scopes"]) and set(smart.SCOPES) <= set(flow["scopes"])


def _access_token(client: Any, key: ClientKey, scope: str) -> str:
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": smart.ASSERTION_TYPE,
        "client_assertion": key.token(f"{BASE}/auth/token", iss=TEST_ISS, sub=TEST_ISS),
        "scope": scope,
    }
    resp = client.post("/auth/token", data=form)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return str(resp.get_json()["access_token"])


def test_the_documented_scopes_are_the_ones_each_operation_needs(secured: Flask, client_key: ClientKey) -> None:
    """With exactly the documented scopes an operation gets past the scope check; with another scope it is a 403."""
    client = secured.test_client()
    other = _access_token(client, client_key, "system/Library.rs")
    tokens: dict[str, str] = {}  # by scope: a token endpoint limits the tokens issued to a client per minute
    checked = 0
    for path, method, op in _operations(_doc(secured)):
        needed = [s for r in op["security"] for s in r.get("smartBackendServices", ())]
        if not needed:
            continue
        url = path.replace("{sub_id}", "no-such-subscription")
        scope = " ".join(needed)
        exact = tokens.get(scope) or tokens.setdefault(scope, _access_token(client, client_key, scope))
        kw: dict[str, Any] = {"json": {}} if "requestBody" in op else {}
        got = client.open(url, method=method.upper(), headers={"Authorization": f"Bearer {exact}"}, **kw)
        assert got.status_code not in (401, 403), (path, method, got.get_data(as_text=True))
        refused = client.open(url, method=method.upper(), headers={"Authorization": f"Bearer {other}"}, **kw)
        assert refused.status_code == 403, (path, method)
        checked += 1
    assert checked >= 10


def _example_path(path: str, op: dict[str, Any]) -> str:
    for param in op.get("parameters", ()):
        if param["in"] == "path":
            value = (param["schema"].get("enum") or ["x"])[0]
            path = path.replace("{" + param["name"] + "}", value)
    return path


def test_an_undocumented_method_is_a_405_naming_the_documented_ones(app: Flask) -> None:
    """RFC 9110 §15.5.6: a 405 carries Allow; here it lists exactly what the document says the URL answers (every
    path template it matches: ``/fhir/Questionnaire/$next-question`` is also ``/fhir/Questionnaire/{qid}``)."""
    client = app.test_client()
    paths = _doc(app)["paths"]
    patterns = [(_pattern(path, item), {m.upper() for m in item}) for path, item in paths.items()]
    for path, item in paths.items():
        url = _example_path(path, next(iter(item.values())))
        documented = set().union(*(methods for pattern, methods in patterns if pattern.fullmatch(url)))
        for method in sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - documented):
            resp = client.open(url, method=method)
            assert resp.status_code == 405, (method, url)
            assert resp.get_json()["resourceType"] == "OperationOutcome"
            allowed = {m.strip() for m in resp.headers["Allow"].split(",")}
            assert allowed - {"HEAD", "OPTIONS"} == documented, (method, url)


def _pattern(path: str, item: dict[str, Any]) -> re.Pattern[str]:
    params = {p["name"]: p for op in item.values() for p in op.get("parameters", ()) if p["in"] == "path"}
    out = ""
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", path):
        out += re.escape(literal)
        if name:
            out += ".+" if params[name].get("x-flask-converter") == "path" else "[^/]+"
    return re.compile(out)
