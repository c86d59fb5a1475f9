"""The reviewer queue (``/review``) with Flask's test client, on the real PAS service: requests are pended by POSTing
the IG's PAS request Bundle (Inferno's approval payload) to ``/fhir/Claim/$submit`` for a payer with no policy for
its item, so a reviewer decides. Sign-in (good, bad, unknown, rate limit, form CSRF), session expiry and cookie
flags, CSRF on every state-changing POST, decisions (who and when recorded, leaving the queue, 400 / 409 refusals),
the JSON API's shapes, and the queue's order by due time with the overdue flag."""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXED_NOW
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from cds.cli import main
from cds.config import DEFAULT_PAYERS
from cds.errors import ConfigError
from cds.pas import reviewers
from cds.pas.tables import audit_events, pas_decisions

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = next((ROOT / "fixtures" / "examples" / "pas").glob("*approval_pa_submit_request_payload.json"))
UMO = {
    "id": "umo",
    "name": "UMO Example",
    "identifier_system": "http://davinci-pas.org/fhir/payer-id",
    "identifier_value": "PI-InsurerExample",
    "policies": [],
}
PASSWORD = "correct horse battery staple"
_HASHES: dict[str, str] = {}


def password_hash(password: str = PASSWORD) -> str:
    if password not in _HASHES:
        _HASHES[password] = reviewers.hash_password(password)
    return _HASHES[password]


def reviewer_accounts() -> list[dict[str, str]]:
    return [
        {"username": "rn.lee", "name": "Robin Lee, RN", "password_hash": password_hash()},
        {"username": "md.khan", "name": "Dr. Sam Khan", "password_hash": password_hash("another good password")},
    ]


def pas_request(bundle_id: str, *, expedited: bool = False) -> dict[str, Any]:
    """The IG's PAS request Bundle with its own Bundle.identifier, standard (``normal``) or expedited (``stat``)."""
    body: dict[str, Any] = copy.deepcopy(json.loads(EXAMPLE.read_text()))
    body["identifier"] = {"system": "urn:test:pas-bundle", "value": bundle_id}
    claim = body["entry"][0]["resource"]
    claim["priority"] = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                "code": "stat" if expedited else "normal",
            }
        ]
    }
    for ext in claim.get("extension") or ():
        if ext.get("url", "").endswith("levelOfServiceCode"):
            ext["valueCodeableConcept"] = {"coding": [{"code": "U" if expedited else "3"}]}
    return body


class Clock:
    def __init__(self) -> None:
        self.now = FIXED_NOW

    def __call__(self) -> Any:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def review_app(make_app: Callable[..., Flask], clock: Clock) -> Flask:
    ids = iter(f"00000000-0000-4000-8000-{n:012d}" for n in range(1, 10_000))
    return make_app(
        clock=clock,
        new_id=lambda: next(ids),
        payers=[*DEFAULT_PAYERS, UMO],
        reviewers=reviewer_accounts(),
        review_session_seconds=3600,
    )


@pytest.fixture
def web(review_app: Flask) -> FlaskClient:
    return review_app.test_client()


def submit(client: FlaskClient, bundle_id: str, *, expedited: bool = False) -> str:
    resp = client.post("/fhir/Claim/$submit", json=pas_request(bundle_id, expedited=expedited))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    claim_response = resp.get_json()["entry"][0]["resource"]
    assert claim_response["resourceType"] == "ClaimResponse"
    return str(claim_response["id"])


def form_csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


def sign_in(client: FlaskClient, username: str = "rn.lee", password: str = PASSWORD) -> Any:
    page = client.get("/review/signin")
    return client.post(
        "/review/signin",
        data={"username": username, "password": password, "csrf": form_csrf(page.get_data(as_text=True))},
    )


def session_csrf(client: FlaskClient) -> str:
    resp = client.get("/review/api/session")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return str(resp.get_json()["csrf"])


def decide_api(client: FlaskClient, request_id: str, body: dict[str, Any], csrf: str | None) -> Any:
    headers = {"X-CSRF-Token": csrf} if csrf is not None else {}
    return client.post(f"/review/api/requests/{request_id}/decision", json=body, headers=headers)


def issue_text(resp: Any) -> str:
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["details"]["text"])


@pytest.fixture
def signed_in(web: FlaskClient) -> Iterator[FlaskClient]:
    assert sign_in(web).status_code == 303
    yield web


# --- sign-in ----------------------------------------------------------------------------------------------------------
def test_the_queue_sends_to_sign_in_and_the_sign_in_page_is_private(web: FlaskClient) -> None:
    resp = web.get("/review")
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/review/signin")
    page = web.get("/review/signin")
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["Cache-Control"] == "no-store"
    html = page.get_data(as_text=True)
    assert "<script>" not in html and "style=" not in html and " onclick" not in html


def test_good_sign_in_sets_a_strict_http_only_session_cookie(web: FlaskClient) -> None:
    resp = sign_in(web)
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/review")
    cookie = next(c for c in resp.headers.getlist("Set-Cookie") if c.startswith("cds_review="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/review" in cookie
    assert "Secure" not in cookie  # base_url is http in tests
    page = web.get("/review")
    assert page.status_code == 200 and "Robin Lee, RN" in page.get_data(as_text=True)


def test_the_cookie_is_secure_when_the_base_url_is_https(make_app: Callable[..., Flask]) -> None:
    app = make_app(base_url="https://payer.example", reviewers=reviewer_accounts())
    resp = sign_in(app.test_client())
    assert resp.status_code == 303
    assert all("Secure" in c for c in resp.headers.getlist("Set-Cookie") if c.startswith("cds_review="))


def test_a_wrong_password_and_an_unknown_user_are_refused_alike(
    web: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    real = reviewers.verify_password

    def counting(pwhash: str, password: str) -> bool:
        checks.append(pwhash)
        return real(pwhash, password)

    monkeypatch.setattr(reviewers, "verify_password", counting)
    wrong = sign_in(web, password="not it")
    unknown = sign_in(web, username="nobody", password="not it")
    for resp in (wrong, unknown):
        assert resp.status_code == 401
        assert "The username or password is not right." in resp.get_data(as_text=True)
        assert not any(c.startswith("cds_review=") for c in resp.headers.getlist("Set-Cookie"))
    # one KDF run each, the unknown user's against a hash of the same method and cost
    assert len(checks) == 2 and checks[0].split("$")[0] == checks[1].split("$")[0] == "scrypt:32768:8:1"
    assert web.get("/review").status_code == 303


PER_ADDRESS = 5  # the defaults of review_signin_failures_per_address and _per_user
PER_USER = 30


def from_address(app: Flask, address: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def test_sign_in_is_rate_limited_per_username_and_address(web: FlaskClient, clock: Clock) -> None:
    for _ in range(PER_ADDRESS):
        assert sign_in(web, password="guess").status_code == 401
    limited = sign_in(web)  # even the right password, for this username from this address
    assert limited.status_code == 429 and "Too many failed sign-ins" in limited.get_data(as_text=True)
    assert limited.headers["Retry-After"] == str(reviewers.FAILURE_WINDOW)
    other = web.application.test_client()
    assert sign_in(other, username="md.khan", password="another good password").status_code == 303  # others can
    # the reviewer at her own desk is not kept out by someone guessing from another address
    assert sign_in(from_address(web.application, "10.0.0.7")).status_code == 303
    clock.advance(seconds=reviewers.FAILURE_WINDOW + 1)
    assert sign_in(web).status_code == 303


def test_many_addresses_together_guess_no_faster_than_the_per_user_limit(web: FlaskClient, clock: Clock) -> None:
    app = web.application
    for n in range(PER_USER):
        guesser = from_address(app, f"10.1.{n // 4}.{n % 4}")  # 4 failures an address, under its own limit
        assert sign_in(guesser, password=f"guess {n}").status_code == 401
    assert sign_in(from_address(app, "10.9.9.9")).status_code == 429  # a fresh address, the right password
    assert (
        sign_in(from_address(app, "10.9.9.9"), username="md.khan", password="another good password").status_code == 303
    )
    clock.advance(seconds=reviewers.FAILURE_WINDOW + 1)
    assert sign_in(from_address(app, "10.9.9.9")).status_code == 303


def test_sign_in_limits_are_settings(make_app: Callable[..., Flask]) -> None:
    app = make_app(
        reviewers=reviewer_accounts(), review_signin_failures_per_address=0, review_signin_failures_per_user=2
    )
    client = app.test_client()
    for _ in range(2):
        assert sign_in(client, password="guess").status_code == 401
    assert sign_in(from_address(app, "10.2.2.2")).status_code == 429
    with pytest.raises(ConfigError, match="review_signin_failures_per_address"):
        make_app(reviewers=reviewer_accounts(), review_signin_failures_per_address=-1)


def test_sign_ins_refusals_and_sign_outs_are_audited(review_app: Flask, web: FlaskClient) -> None:
    """Who signed in and out, and every refusal, with the address; a username no reviewer has is never stored (it
    may be a password typed into the wrong field)."""
    sign_in(web, username="my-password-typed-here", password="x")
    for _ in range(PER_ADDRESS):
        sign_in(web, password="guess")
    sign_in(web)  # throttled
    other = review_app.test_client()
    assert sign_in(other, username="md.khan", password="another good password").status_code == 303
    csrf = form_csrf(other.get("/review").get_data(as_text=True))
    assert other.post("/review/signout", data={"csrf": csrf}).status_code == 303
    with review_app.extensions["cds"].store.engine.connect() as conn:
        rows = conn.execute(select(audit_events).order_by(audit_events.c.id)).mappings().all()
    assert [(r["kind"], r["actor"]) for r in rows] == [
        ("signin-refused", reviewers.UNKNOWN_ACTOR),
        *[("signin-refused", "rn.lee")] * PER_ADDRESS,
        ("signin-throttled", "rn.lee"),
        ("signin", "md.khan"),
        ("signout", "md.khan"),
    ]
    assert all(json.loads(r["detail"]) == {"address": "127.0.0.1"} for r in rows)
    assert "my-password-typed-here" not in json.dumps([dict(r) for r in rows], default=str)


def test_the_sign_in_form_needs_its_csrf_token(web: FlaskClient) -> None:
    web.get("/review/signin")
    resp = web.post("/review/signin", data={"username": "rn.lee", "password": PASSWORD})
    assert resp.status_code == 403
    resp = web.post("/review/signin", data={"username": "rn.lee", "password": PASSWORD, "csrf": "forged"})
    assert resp.status_code == 403
    assert web.get("/review").status_code == 303


def test_a_session_expires(signed_in: FlaskClient, clock: Clock) -> None:
    assert signed_in.get("/review").status_code == 200
    clock.advance(seconds=3601)
    assert signed_in.get("/review").status_code == 303
    resp = signed_in.get("/review/api/requests")
    assert resp.status_code == 401 and resp.get_json()["issue"][0]["code"] == "login"


def test_sign_out_needs_the_csrf_token_and_ends_the_session(signed_in: FlaskClient) -> None:
    assert signed_in.post("/review/signout").status_code == 403
    csrf = form_csrf(signed_in.get("/review").get_data(as_text=True))
    resp = signed_in.post("/review/signout", data={"csrf": csrf})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/review/signin")
    assert signed_in.get("/review/api/session").status_code == 401


def test_the_store_keeps_no_session_token(review_app: Flask, signed_in: FlaskClient) -> None:
    cookie = signed_in.get_cookie("cds_review", path="/review")
    assert cookie is not None
    rt = review_app.extensions["cds"]
    with rt.store.engine.connect() as conn:
        rows = conn.execute(select(reviewers.review_sessions)).mappings().all()
    assert len(rows) == 1 and rows[0]["username"] == "rn.lee"
    assert cookie.value not in json.dumps([dict(r) for r in rows], default=str)


# --- the queue and the JSON API ---------------------------------------------------------------------------------------
def test_the_api_needs_a_session(web: FlaskClient) -> None:
    for path in ("/review/api/requests", "/review/api/requests/x", "/review/api/session"):
        resp = web.get(path)
        assert resp.status_code == 401 and resp.get_json()["resourceType"] == "OperationOutcome"
    assert web.post("/review/api/requests/x/decision", json={"action": "approve"}).status_code == 401


def test_the_queue_is_ordered_by_due_time_and_flags_the_overdue(signed_in: FlaskClient, clock: Clock) -> None:
    standard = submit(signed_in, "standard-1")
    clock.advance(minutes=30)
    expedited = submit(signed_in, "expedited-1", expedited=True)
    listed = signed_in.get("/review/api/requests?status=pended").get_json()
    assert listed["status"] == "pended"
    rows = listed["requests"]
    assert [r["id"] for r in rows] == [expedited, standard]  # 72 h beats 7 days though received later
    first = rows[0]
    assert {"id", "received_at", "due_at", "priority", "drug", "policy", "overdue"} <= set(first)
    assert first["priority"] == "expedited" and rows[1]["priority"] == "standard"
    assert first["due_at"].startswith((FIXED_NOW + timedelta(hours=72, minutes=30)).isoformat()[:16])
    assert not any(r["overdue"] for r in rows)

    clock.advance(hours=80)
    assert sign_in(signed_in).status_code == 303  # the session of 1 h is long gone
    rows = signed_in.get("/review/api/requests").get_json()["requests"]
    assert [(r["id"], r["overdue"]) for r in rows] == [(expedited, True), (standard, False)]
    html = signed_in.get("/review").get_data(as_text=True)
    assert html.index(expedited) < html.index(standard)
    assert html.count("badge-overdue") == 1

    assert signed_in.get("/review/api/requests?status=denied").status_code == 400


def test_a_request_in_json_and_as_a_page(signed_in: FlaskClient) -> None:
    rid = submit(signed_in, "view-1")
    view = signed_in.get(f"/review/api/requests/{rid}").get_json()
    assert view["id"] == rid and view["status"] == "pended"
    assert view["items"] and all(i["code"] == "A4" for i in view["items"])
    assert view["documents"][0]["resource"]["resourceType"] == "DocumentReference"
    assert view["response"]["entry"][0]["resource"]["resourceType"] == "ClaimResponse"

    page = signed_in.get(f"/review/requests/{rid}")
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    html = page.get_data(as_text=True)
    assert "Criterion by criterion" in html and "pended for clinical review" in html
    assert "Pulmonology clinic acute visit" in html  # the submitted document
    assert 'id="decision"' in html and "ClaimResponse" in html

    missing = signed_in.get("/review/api/requests/nope")
    assert missing.status_code == 404 and missing.get_json()["issue"][0]["code"] == "not-found"
    assert signed_in.get("/review/requests/nope").status_code == 404


# --- decisions -------------------------------------------------------------------------------------------------------
def test_decisions_need_the_csrf_token(signed_in: FlaskClient) -> None:
    rid = submit(signed_in, "csrf-1")
    approve = {"action": "approve", "period_end": "2027-05-31"}
    for token in (None, "", "wrong"):
        resp = decide_api(signed_in, rid, approve, token)
        assert resp.status_code == 403 and resp.get_json()["issue"][0]["code"] == "forbidden"
    form = signed_in.post(f"/review/requests/{rid}/decision", data=approve)
    assert form.status_code == 403
    form = signed_in.post(f"/review/requests/{rid}/decision", data={**approve, "csrf": "wrong"})
    assert form.status_code == 403 and "CSRF" in form.get_data(as_text=True)
    assert [r["id"] for r in signed_in.get("/review/api/requests").get_json()["requests"]] == [rid]


def test_a_denial_needs_a_reason(signed_in: FlaskClient) -> None:
    rid = submit(signed_in, "deny-1")
    csrf = session_csrf(signed_in)
    resp = decide_api(signed_in, rid, {"action": "deny"}, csrf)
    assert resp.status_code == 400 and "reason" in issue_text(resp)
    resp = decide_api(signed_in, rid, {"action": "deny", "reason": "   "}, csrf)
    assert resp.status_code == 400
    page = signed_in.post(f"/review/requests/{rid}/decision", data={"action": "deny", "csrf": csrf})
    assert page.status_code == 400 and "A denial needs a reason" in page.get_data(as_text=True)
    assert 'id="errors"' in page.get_data(as_text=True)
    bad = decide_api(signed_in, rid, {"action": "maybe"}, csrf)
    assert bad.status_code == 400
    bad = decide_api(signed_in, rid, {"action": "approve", "period_end": "next spring"}, csrf)
    assert bad.status_code == 400 and issue_text(bad).startswith("period_end")
    assert decide_api(signed_in, rid, {"action": "deny", "reason": "Not medically necessary"}, csrf).status_code == 200


def test_an_approval_is_recorded_with_who_and_when_and_leaves_the_queue(
    review_app: Flask, signed_in: FlaskClient, clock: Clock
) -> None:
    rid = submit(signed_in, "approve-1")
    other = submit(signed_in, "approve-2")
    clock.advance(minutes=20)
    csrf = session_csrf(signed_in)
    resp = decide_api(signed_in, rid, {"action": "approve", "period_end": "2027-05-31"}, csrf)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    bundle = resp.get_json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["entry"][0]["resource"]["resourceType"] == "ClaimResponse"

    assert [r["id"] for r in signed_in.get("/review/api/requests").get_json()["requests"]] == [other]
    view = signed_in.get(f"/review/api/requests/{rid}").get_json()
    assert view["status"] != "pended"
    (decision,) = view["decisions"]
    assert decision["reviewer"] == "rn.lee" and decision["action"] == "approve"
    assert decision["decided_at"].startswith(clock.now.isoformat()[:19])
    rt = review_app.extensions["cds"]
    with rt.store.engine.connect() as conn:
        row = conn.execute(select(pas_decisions).where(pas_decisions.c.request_id == rid)).mappings().one()
    assert row["period_end"] == date(2027, 5, 31) and row["reviewer"] == "rn.lee"

    again = decide_api(signed_in, rid, {"action": "deny", "reason": "changed my mind"}, csrf)
    assert again.status_code == 409 and again.get_json()["issue"][0]["code"] == "conflict"
    page = signed_in.get(f"/review/requests/{rid}").get_data(as_text=True)
    assert 'id="decision"' not in page and "approve by rn.lee" in page


def test_approvals_of_drugs_no_policy_covers_are_authorizations_of_their_own(
    review_app: Flask, signed_in: FlaskClient
) -> None:
    """Without a policy the reuse key is the item's codes: another drug for the same patient gets its own PA, a
    second approval of the same drug supersedes the first with the reviewer's new period."""
    csrf = session_csrf(signed_in)

    def approve(rid: str, end: str) -> str:
        resp = decide_api(signed_in, rid, {"action": "approve", "period_end": end}, csrf)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return str(resp.get_json()["entry"][0]["resource"]["preAuthRef"])

    first = approve(submit(signed_in, "drug-a"), "2027-01-31")
    other_drug = pas_request("drug-b")
    other_drug["entry"][0]["resource"]["item"][0]["productOrService"] = {
        "coding": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "J9999"}]
    }
    resp = signed_in.post("/fhir/Claim/$submit", json=other_drug)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    second = approve(resp.get_json()["entry"][0]["resource"]["id"], "2027-02-28")
    renewal = approve(submit(signed_in, "drug-a-again"), "2027-06-30")
    store = review_app.extensions["cds"].store
    found = {pa: store.prior_auth(pa) for pa in (first, second, renewal)}
    assert len(found) == 3
    assert {pa: (p.status, p.valid_to) for pa, p in found.items() if p} == {
        first: ("superseded", date(2027, 1, 31)),
        second: ("active", date(2027, 2, 28)),
        renewal: ("active", date(2027, 6, 30)),
    }


def test_a_modification_through_the_page(signed_in: FlaskClient) -> None:
    rid = submit(signed_in, "modify-1")
    html = signed_in.get(f"/review/requests/{rid}").get_data(as_text=True)
    resp = signed_in.post(
        f"/review/requests/{rid}/decision",
        data={"csrf": form_csrf(html), "action": "modify", "quantity": "2", "reason": "two units, not three"},
    )
    assert resp.status_code == 303 and resp.headers["Location"].endswith(f"/review?decided={rid}")
    queue = signed_in.get(resp.headers["Location"]).get_data(as_text=True)
    assert "Decision recorded" in queue and 'id="empty"' in queue
    view = signed_in.get(f"/review/api/requests/{rid}").get_json()
    assert view["decisions"][0]["action"] == "modify" and view["decisions"][0]["quantity"] == 2
    assert {i["code"] for i in view["items"]} == {"A6"}


def test_the_api_refuses_a_body_that_is_not_json(signed_in: FlaskClient) -> None:
    rid = submit(signed_in, "media-1")
    csrf = session_csrf(signed_in)
    resp = signed_in.post(f"/review/api/requests/{rid}/decision", data="action=approve", headers={"X-CSRF-Token": csrf})
    assert resp.status_code == 415
    resp = signed_in.post(
        f"/review/api/requests/{rid}/decision",
        data="[1]",
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert resp.status_code == 400


# --- accounts ---------------------------------------------------------------------------------------------------------
def test_cds_reviewer_hash_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass phrase\n"))
    assert main(["reviewer", "hash"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("scrypt:") and "s3cret" not in out
    assert reviewers.verify_password(out, "s3cret pass phrase")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["reviewer", "hash"]) == 2


@pytest.mark.parametrize(
    "accounts, problem",
    [
        ([{"username": "a", "name": "A"}], "password_hash"),
        ([{"username": "a", "name": "A", "password_hash": "plain text"}], "not a scrypt or pbkdf2"),
        (["a"], "must be a table"),
    ],
)
def test_bad_reviewer_accounts_stop_the_start(
    make_app: Callable[..., Flask], accounts: list[Any], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        make_app(reviewers=accounts)


def test_two_accounts_with_one_username_stop_the_start(make_app: Callable[..., Flask]) -> None:
    twice = [{"username": "A", "name": "A", "password_hash": password_hash()}] * 2
    with pytest.raises(ConfigError, match="configured twice"):
        make_app(reviewers=twice)
