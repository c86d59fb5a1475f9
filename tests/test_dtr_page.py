"""The clinician's form page and its JSON through the Flask app (the browser test drives it in Chromium): the page
shell and everything it links to, the form link on every route, the package and the submit with the real DTR
service, the lforms assets and their path handling."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from builders import condition, coverage_info, hook_request, med_order, role
from conftest import BASE, FIXED_NOW, post_hook
from flask import Flask
from flask.testing import FlaskClient

from cds import links
from cds.dtr import page

ORIGIN = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/information-origin"


class Clock:
    def __init__(self) -> None:
        self.now = FIXED_NOW

    def __call__(self) -> Any:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def app(make_app: Callable[..., Flask], clock: Clock) -> Flask:
    return make_app(clock=clock)


def form_needed(client: FlaskClient) -> str:
    """Sign a NovoSeven order (90 mcg/kg daily for 3 days, within the 900 mcg/kg per 28 days of IP0356-1) whose
    record suggests the indication but does not settle it (D68.2, hereditary deficiency of a clotting factor): the
    coverage assertion id that asks for documentation."""
    resp = post_hook(client, hook_request([med_order(every_hours=24)], conditions=[condition("D68.2")], roles=[role()]))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    info = coverage_info(resp.get_json()["systemActions"][0]["resource"])
    assert info["doc-needed"] == ["clinical"], info
    return str(info["coverage-assertion-id"][0])


def link_of(app: Flask, assertion_id: str) -> tuple[str, str]:
    """The page path (with its query) and the token of a form link."""
    url = links.form_link(app.extensions["cds"], assertion_id)
    assert url.startswith(f"{BASE}/dtr/{assertion_id}?t=")
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}", parts.query.removeprefix("t=")


class Shell(HTMLParser):
    """What a page references, and anything inline in it."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline: list[str] = []
        self.ids: dict[str, dict[str, str | None]] = {}
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if named.get("id"):
            self.ids[str(named["id"])] = named
        for name, value in attrs:
            if name.startswith("on") or name == "style":
                self.inline.append(f"<{tag} {name}=...>")
            if name in ("src", "href") and value:
                self.refs.append(value)
        if tag == "style":
            self.inline.append("<style>")
        self._in_script = tag == "script"
        if tag == "script" and not named.get("src"):
            self.inline.append("<script> without src")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script body")


def parse(html: str) -> Shell:
    shell = Shell()
    shell.feed(html)
    return shell


def fetch(client: FlaskClient, path: str, **kw: Any) -> Any:
    """GET a (streamed) file, read and closed."""
    resp = client.get(path, **kw)
    resp.get_data()
    resp.close()
    return resp


def outcome_text(resp: Any) -> str:
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["details"]["text"])


def completed(draft: dict[str, Any], *, attest: bool | None = True) -> dict[str, Any]:
    """What the page posts when the clinician leaves the prefilled answers and signs."""
    items = [dict(i) for i in draft["item"]]
    if attest is not None:
        items.append({"linkId": "attestation", "answer": [{"valueBoolean": attest}]})
    return {**draft, "status": "completed", "authored": "2026-11-23T15:00:00Z", "item": items}


# -- the page -------------------------------------------------------------------------------------------------------


def test_the_page_is_a_shell_with_nothing_inline_and_no_patient_data(app: Flask) -> None:
    client = app.test_client()
    aid = form_needed(client)
    path, _ = link_of(app, aid)
    resp = client.get(path)
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    html = resp.get_data(as_text=True)
    shell = parse(html)
    assert shell.inline == []
    assert shell.ids["dtr"]["data-package-url"] == f"/dtr/{aid}/package"
    assert shell.ids["dtr"]["data-submit-url"] == f"/dtr/{aid}/response"
    assert "errors" in shell.ids and "formContainer" in shell.ids and "submit" in shell.ids
    assert "Testpatient" not in html and "pat-1" not in html and "D68.2" not in html


def test_everything_the_page_loads_is_served_from_here(app: Flask) -> None:
    client = app.test_client()
    path, _ = link_of(app, form_needed(client))
    refs = parse(client.get(path).get_data(as_text=True)).refs
    scripts = [r for r in refs if r.split("?")[0].endswith(".js")]
    assert [urlsplit(s).path.rsplit("/", 1)[-1] for s in scripts] == [
        "zone.min.js",
        "runtime.js",
        "polyfills.js",
        "main.js",
        "lformsFHIR.min.js",
        "form.js",
    ]
    for ref in refs:
        assert ref.startswith("/"), f"{ref} is not served by this service"
        if ref.startswith("/policies"):
            continue  # filled in by form.js from the package
        got = fetch(client, ref)
        assert got.status_code == 200, ref
        kind = {".js": "text/javascript", ".css": "text/css", ".ico": "image/x-icon"}[Path(urlsplit(ref).path).suffix]
        assert got.mimetype == kind, ref
        assert got.headers["X-Content-Type-Options"] == "nosniff"
        if "/lforms/" in ref:
            assert "max-age=31536000" in got.headers["Cache-Control"] and "?v=40.1.3" in ref
        else:
            assert got.headers["Cache-Control"] == "no-cache" and got.headers["ETag"]


@pytest.mark.parametrize("token", [None, "", "garbage", "123.abc"])
def test_a_page_without_a_valid_link_says_so_and_loads_nothing(app: Flask, token: str | None) -> None:
    client = app.test_client()
    aid = form_needed(client)
    resp = client.get(f"/dtr/{aid}" + ("" if token is None else f"?t={token}"))
    assert resp.status_code == 401 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    shell = parse(html)
    assert "errors" in shell.ids and "hidden" not in shell.ids["errors"]
    assert "This form link is not valid" in html
    assert not [r for r in shell.refs if r.split("?")[0].endswith(".js")]


def test_a_link_made_for_another_assertion_is_refused(app: Flask) -> None:
    client = app.test_client()
    first, second = form_needed(client), form_needed(client)
    _, token = link_of(app, first)
    assert client.get(f"/dtr/{second}?t={token}").status_code == 401
    assert client.get(f"/dtr/{second}/package", headers={"X-Form-Link": token}).status_code == 401


def test_an_expired_link_tells_what_to_do(app: Flask, clock: Clock) -> None:
    client = app.test_client()
    aid = form_needed(client)
    path, token = link_of(app, aid)
    clock.now = FIXED_NOW + timedelta(seconds=int(app.extensions["cds"].config["form_link_seconds"]) + 1)
    resp = client.get(path)
    assert resp.status_code == 403 and links.EXPIRED in resp.get_data(as_text=True)
    assert outcome_text(client.get(f"/dtr/{aid}/package", headers={"X-Form-Link": token})) == links.EXPIRED


# -- the page's JSON ------------------------------------------------------------------------------------------------


def test_the_package_for_the_page(app: Flask) -> None:
    client = app.test_client()
    aid = form_needed(client)
    _, token = link_of(app, aid)
    resp = client.get(f"/dtr/{aid}/package", headers={"X-Form-Link": token})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Cache-Control"] == "no-store" and resp.mimetype == "application/json"
    data = resp.get_json()
    assert data["assertionId"] == aid
    assert data["questionnaire"]["resourceType"] == "Questionnaire"
    draft = data["response"]
    assert draft["resourceType"] == "QuestionnaireResponse" and draft["identifier"]["value"] == aid
    (prefilled,) = [i for i in draft["item"] if i["linkId"] == "IP0356-MNC"]
    origin = next(e for e in prefilled["answer"][0]["extension"] if e["url"] == ORIGIN)
    assert origin["extension"][0] == {"url": "source", "valueCode": "auto-server"}
    header = data["header"]
    assert header["policy"]["number"] == "IP0356" and header["policy"]["url"] == "/policies/cigna-ip0356"
    assert header["drug"] == "NovoSeven RT"
    asked = [q["linkId"] for q in header["asked"]]
    assert asked[0] == "IP0356-MNC" and "attestation" not in asked
    assert header["signatureRequired"] is True
    # the token may also come as the query parameter
    assert client.get(f"/dtr/{aid}/package?t={token}").status_code == 200


def test_the_package_needs_the_link(app: Flask) -> None:
    client = app.test_client()
    aid = form_needed(client)
    for headers in ({}, {"X-Form-Link": "nope"}):
        resp = client.get(f"/dtr/{aid}/package", headers=headers)
        assert resp.status_code == 401 and outcome_text(resp) == "Unauthorized"


def test_an_unknown_assertion_is_404(app: Flask) -> None:
    client = app.test_client()
    aid = "00000000-0000-4000-8000-999999999999"
    _, token = link_of(app, aid)  # a valid link, for an assertion this service never made
    resp = client.get(f"/dtr/{aid}/package", headers={"X-Form-Link": token})
    assert resp.status_code == 404 and "No coverage assertion" in outcome_text(resp)
    resp = client.post(f"/dtr/{aid}/response", headers={"X-Form-Link": token}, json={})
    assert resp.status_code == 400


def test_submit_settles_and_answers_the_decision(app: Flask) -> None:
    client = app.test_client()
    aid = form_needed(client)
    _, token = link_of(app, aid)
    draft = client.get(f"/dtr/{aid}/package", headers={"X-Form-Link": token}).get_json()["response"]
    resp = client.post(f"/dtr/{aid}/response", headers={"X-Form-Link": token}, json=completed(draft))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Cache-Control"] == "no-store"
    result = resp.get_json()
    assert result["decision"] == "approved" and result["paId"] == "PA-TEST00001"
    assert result["summary"]
    states = {c["id"]: c["state"] for c in result["criteria"]}
    assert states["IP0356-1"] == "met"
    assert result["policy"]["url"] == f"{BASE}/policies/cigna-ip0356"
    assert result["response"]["status"] == "completed"
    # the form is done: the page now says why instead of showing it again
    again = client.get(f"/dtr/{aid}/package", headers={"X-Form-Link": token})
    assert again.status_code == 409 and "PA-TEST00001" in outcome_text(again)


def test_an_unsigned_form_is_refused_with_the_reason(app: Flask) -> None:
    client = app.test_client()
    aid = form_needed(client)
    _, token = link_of(app, aid)
    draft = client.get(f"/dtr/{aid}/package", headers={"X-Form-Link": token}).get_json()["response"]
    resp = client.post(f"/dtr/{aid}/response", headers={"X-Form-Link": token}, json=completed(draft, attest=None))
    assert resp.status_code == 400 and "attestation" in outcome_text(resp)
    resp = client.post(f"/dtr/{aid}/response", headers={"X-Form-Link": token}, json=completed(draft, attest=False))
    assert resp.status_code == 400 and "not signed" in outcome_text(resp)


def test_a_response_for_another_assertion_is_refused(app: Flask) -> None:
    client = app.test_client()
    first, second = form_needed(client), form_needed(client)
    _, token = link_of(app, first)
    other = client.get(f"/dtr/{second}/package", headers={"X-Form-Link": link_of(app, second)[1]}).get_json()
    resp = client.post(f"/dtr/{first}/response", headers={"X-Form-Link": token}, json=completed(other["response"]))
    assert resp.status_code == 403 and "another coverage assertion" in outcome_text(resp)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{oops", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'{"resourceType": "Bundle", "type": "collection"}', "application/json", 400),
        (b"t=1", "application/x-www-form-urlencoded", 415),
    ],
)
def test_bad_submissions_are_operation_outcomes(app: Flask, body: bytes, content_type: str, status: int) -> None:
    client = app.test_client()
    aid = form_needed(client)
    _, token = link_of(app, aid)
    resp = client.post(f"/dtr/{aid}/response", data=body, headers={"X-Form-Link": token, "Content-Type": content_type})
    assert resp.status_code == status
    assert outcome_text(resp)


def test_submit_needs_the_link(app: Flask) -> None:
    client = app.test_client()
    aid = form_needed(client)
    resp = client.post(f"/dtr/{aid}/response", json={"resourceType": "QuestionnaireResponse"})
    assert resp.status_code == 401


# -- assets ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/dtr/assets/lforms/..%2F..%2Fpackage.json",
        "/dtr/assets/lforms/webcomponent/..%2F..%2F..%2Fpackage.json",
        "/dtr/assets/lforms/webcomponent/%2E%2E/%2E%2E/%2E%2E/%2E%2E/cds/dtr/page.py",
        "/dtr/assets/lforms/%2Fetc%2Fpasswd",
        "/dtr/assets/lforms//etc/passwd",
        "/dtr/assets/lforms/..%5C..%5Cpackage.json",
        "/dtr/assets/lforms/webcomponent/index.html",
        "/dtr/assets/lforms/README.md",
        "/dtr/assets/lforms/webcomponent/nothing.js",
        "/dtr/assets/lforms/webcomponent",
        "/dtr/assets/page.py",
        "/dtr/assets/..%2Fpage.py",
        "/dtr/assets/dtr_form.html",
    ],
)
def test_asset_paths_outside_the_served_files_are_refused(client: FlaskClient, path: str) -> None:
    resp = client.get(path)
    if resp.status_code == 308:  # werkzeug merges "//" (a decoded "%2F" too) by redirecting within the same route
        location = urlsplit(resp.headers["Location"]).path
        assert location.startswith("/dtr/assets/lforms/"), location
        resp = client.get(location)
    assert resp.status_code == 404, path
    assert resp.get_json()["resourceType"] == "OperationOutcome"


def test_lforms_files_are_served_from_its_dist_directory(client: FlaskClient) -> None:
    resp = fetch(client, "/dtr/assets/lforms/webcomponent/main.js")
    assert resp.status_code == 200 and resp.mimetype == "text/javascript"
    assert resp.get_data() == (page.LFORMS_DIR / "webcomponent" / "main.js").read_bytes()
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert fetch(client, "/dtr/assets/lforms/fhir/R4/lformsFHIR.min.js").status_code == 200


def test_own_assets_revalidate(client: FlaskClient) -> None:
    first = fetch(client, "/dtr/assets/form.js")
    assert first.status_code == 200 and first.mimetype == "text/javascript"
    again = fetch(client, "/dtr/assets/form.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    assert fetch(client, "/dtr/assets/form.css").mimetype == "text/css"
