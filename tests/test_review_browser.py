"""The reviewer queue in Debian's Chromium, driven by Playwright, against a real `cds serve` and the real PAS service:
a PAS request Bundle POSTed to `/fhir/Claim/$submit` is pended, the reviewer signs in, opens it from the queue,
approves it with a period end, and sees it leave the queue; the decision is then in the JSON API with who and when.
No CSP violation or script error on any page. On failure a screenshot and the HTML are saved (the path is printed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from browsing import Console
from conftest import ClientKey
from playwright import sync_api as playwright_api
from test_dtr_browser import SHOTS, evidence_on_failure
from test_e2e import Server
from test_review import PASSWORD, UMO, pas_request, reviewer_accounts

from cds.config import DEFAULT_PAYERS

pytestmark = pytest.mark.e2e
expect = playwright_api.expect  # playwright is a dev dependency: missing, the tests fail rather than skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[Server]:
    SHOTS[:] = [tmp_path_factory.mktemp("review-browser-shots")]
    with pytest.MonkeyPatch.context() as mp:  # tables in a list do not fit Server's one-line settings: environment
        mp.setenv("CDS_REVIEWERS", json.dumps(reviewer_accounts()))
        mp.setenv("CDS_PAYERS", json.dumps([*DEFAULT_PAYERS, UMO]))
        s = Server(tmp_path_factory.mktemp("review-browser"), client_key, auth_required=False)
    yield s
    s.stop()


def submit(server: Server, bundle_id: str, *, expedited: bool = False) -> str:
    resp = requests.post(
        f"{server.base}/fhir/Claim/$submit",
        json=pas_request(bundle_id, expedited=expedited),
        headers={"Content-Type": "application/fhir+json"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["entry"][0]["resource"]["id"])


@evidence_on_failure
def test_sign_in_open_a_pended_request_approve_it_and_see_it_leave_the_queue(
    server: Server, context: Any, console: Console
) -> None:
    standard = submit(server, "browser-standard")
    expedited = submit(server, "browser-expedited", expedited=True)

    page = context.new_page()
    page.goto(f"{server.base}/review")
    expect(page).to_have_url(f"{server.base}/review/signin")
    page.fill("#username", "rn.lee")
    page.fill("#password", "wrong")
    page.click("button[type=submit]")
    expect(page.locator("#errors")).to_contain_text("The username or password is not right.")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("#who")).to_contain_text("Robin Lee, RN")

    # the queue: the expedited request first (72 h), then the standard one (7 days)
    rows = page.locator("#queue tbody tr")
    expect(rows).to_have_count(2)
    assert rows.nth(0).get_attribute("data-request-id") == expedited
    assert rows.nth(1).get_attribute("data-request-id") == standard
    assert "expedited" in rows.nth(0).inner_text()

    # open it: the explanation, the documents, the decision form
    rows.nth(0).locator("a.open").click()
    expect(page.locator("#request-id")).to_have_text(expedited)
    expect(page.locator("section.item").first).to_contain_text("pended for clinical review")
    expect(page.locator("#documents")).to_contain_text("Pulmonology clinic acute visit")

    # the script shows what each action needs
    page.check("#action-deny")
    assert page.locator("#reason").evaluate("el => el.required") is True
    expect(page.locator("#field-quantity")).to_be_hidden()
    page.check("#action-approve")
    assert page.locator("#reason").evaluate("el => el.required") is False
    page.fill("#period_end", "2027-06-30")
    page.click("#decide")

    # back on the queue: recorded, and gone from it
    expect(page.locator("#decided")).to_contain_text(expedited)
    expect(page.locator("#queue tbody tr")).to_have_count(1)
    assert page.locator("#queue tbody tr").first.get_attribute("data-request-id") == standard

    # the decision, with who and when, through the JSON API on the browser's session
    view = page.evaluate(f"fetch('/review/api/requests/{expedited}').then(r => r.json())")
    assert view["status"] != "pended"
    (decision,) = view["decisions"]
    assert decision["reviewer"] == "rn.lee" and decision["action"] == "approve"
    assert decision["period_end"] == "2027-06-30" and decision["decided_at"]

    # the page of the decided request has no form any more
    page.goto(f"{server.base}/review/requests/{expedited}")
    expect(page.locator("#settled")).to_be_visible()
    assert page.locator("#decision").count() == 0

    page.click("#signout")
    expect(page).to_have_url(f"{server.base}/review/signin")
    # no CSP violation, no script error (a load refused on purpose, the 401 of the wrong password, is not one)
    problems = [e for e in console.errors if not e.startswith("Failed to load resource")]
    assert not problems, problems
