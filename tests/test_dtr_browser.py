"""The clinician's form in Debian's Chromium, driven by Playwright, against a real `cds serve`: an order signed over
HTTP asks for documentation, the form link from its card opens the page, the answer the record gave is marked as
such, the clinician answers the rest and signs, submits, and sees the decision with its criteria and the PA number.
Failures of every kind end in the page's error panel. On a test's failure a screenshot and the page's HTML are
saved (the path is printed)."""

from __future__ import annotations

import functools
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from browsing import Console, Page
from builders import condition, hook_request, med_order, role
from conftest import ClientKey
from playwright import sync_api as playwright_api
from test_e2e import Server

pytestmark = pytest.mark.e2e
expect = playwright_api.expect  # playwright is a dev dependency: missing, the tests fail rather than skip

INDICATION = "IP0356-MNC"
RECORD_ANSWER = "Treatment of congenital factor VII deficiency"
F = TypeVar("F", bound=Callable[..., None])
SHOTS: list[Path] = []


def evidence_on_failure(test: F) -> F:
    """On failure, save a screenshot and the HTML of every page the test opened (named in the error)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        context = kwargs["context"]
        try:
            test(*args, **kwargs)
        except BaseException as exc:
            folder = (SHOTS[0] if SHOTS else Path(tempfile.mkdtemp(prefix="dtr-browser-shots-"))) / test.__name__
            folder.mkdir(parents=True, exist_ok=True)
            for n, opened in enumerate(context.pages):
                try:
                    opened.screenshot(path=str(folder / f"page{n}.png"), full_page=True)
                    (folder / f"page{n}.html").write_text(opened.content())
                except Exception as shot_error:  # the test's own failure is what matters
                    (folder / f"page{n}.error.txt").write_text(repr(shot_error))
            print(f"\nscreenshots of {test.__name__}: {folder}")
            exc.add_note(f"screenshots and HTML: {folder}")
            raise

    return run  # type: ignore[return-value]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[Server]:
    SHOTS[:] = [tmp_path_factory.mktemp("dtr-browser-shots")]
    s = Server(tmp_path_factory.mktemp("dtr-browser"), client_key)
    yield s
    s.stop()


def sign_order(server: Server, key: ClientKey) -> tuple[str, dict[str, Any]]:
    """order-sign over HTTP for NovoSeven (90 mcg/kg daily for 3 days) with D68.2 (hereditary deficiency of a
    clotting factor) on the record: the record suggests the indication, the form asks to confirm it and sign.
    The form link the documentation card gives, and the response."""
    url = f"{server.base}/cds-services/order-sign"
    body = hook_request([med_order(every_hours=24)], conditions=[condition("D68.2")], roles=[role()])
    resp = requests.post(url, json=body, timeout=10, headers={"Authorization": f"Bearer {key.token(url)}"})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    found = {
        link["url"]
        for card in answer["cards"]
        for link in card.get("links", [])
        if link["url"].startswith(f"{server.base}/dtr/")
    }
    assert len(found) == 1, f"one documentation card links to the form: {json.dumps(answer['cards'])[:2000]}"
    return found.pop(), answer


def open_form(context: Any, link: str) -> Page:
    opened = context.new_page()
    opened.goto(link)
    opened.wait_for_selector("#dtr[data-ready=true], #errors:not([hidden])")
    return opened


def error_panel(opened: Page) -> str:
    opened.wait_for_selector("#errors:not([hidden])")
    return str(opened.locator("#errors").inner_text())


def item(opened: Page, link_id: str) -> Any:
    return opened.locator(f"[id='item-{link_id}/1']")


def answer_boolean(opened: Page, link_id: str, label: str) -> None:
    """Click Yes or No (LHC-Forms' radios: clicking the label is what works) and see it chosen."""
    item(opened, link_id).get_by_text(label, exact=True).click()
    expect(item(opened, link_id).locator("input[type=radio]").nth(["Yes", "No"].index(label))).to_be_checked()


def choose(opened: Page, link_id: str, option: str) -> None:
    opened.locator(f"[id='{link_id}/1']").click()
    opened.locator("#completionOptions li", has_text=option).click()


def badge(opened: Page, link_id: str) -> str:
    return str(item(opened, link_id).locator(".badge-origin").inner_text())


def origin(response: dict[str, Any], link_id: str) -> dict[str, Any]:
    (found,) = [i for i in response["item"] if i["linkId"] == link_id]
    ext = next(e for e in found["answer"][0]["extension"] if e["url"].endswith("/information-origin"))
    return {p["url"]: p.get("valueCode", p.get("valueReference")) for p in ext["extension"]}


@evidence_on_failure
def test_open_see_what_the_record_gave_answer_sign_submit_see_the_decision(
    server: Server, client_key: ClientKey, context: Any, console: Console
) -> None:
    started = time.monotonic()
    link, _ = sign_order(server, client_key)
    opened = open_form(context, link)
    assert opened.locator("#dtr").get_attribute("data-ready") == "true", error_panel(opened)

    # the header: policy and drug, no patient
    assert "NovoSeven RT" in opened.locator("#title").inner_text()
    assert "IP0356" in opened.locator("#subtitle").inner_text()
    assert opened.locator("#policy-link").get_attribute("href") == "/policies/cigna-ip0356"

    # the record's answer is there, and marked; the attestation is the clinician's
    assert opened.locator(f"[id='{INDICATION}/1']").input_value() == RECORD_ANSWER
    assert badge(opened, INDICATION) == "from the record"
    assert item(opened, "attestation").locator(".badge-origin").count() == 0
    assert opened.locator("#record-legend").is_visible()

    # unsigned: the page says what is missing and sends nothing
    opened.locator("#submit").click()
    assert "attest" in error_panel(opened)
    assert not [r for r in console.requests if r.startswith("POST")]

    # changing the record's answer is shown as the clinician's; changing it back restores the mark
    choose(opened, INDICATION, "Glanzmann")
    expect(item(opened, INDICATION)).to_have_attribute("data-origin", "changed")
    assert badge(opened, INDICATION) == "changed: your answer"
    choose(opened, INDICATION, RECORD_ANSWER)
    expect(item(opened, INDICATION)).to_have_attribute("data-origin", "record")
    assert badge(opened, INDICATION) == "from the record"

    # sign and submit: a busy state, then the decision
    answer_boolean(opened, "attestation", "Yes")
    opened.evaluate(
        """() => { const b = document.getElementById('submit'); window.sawBusy = false;
        new MutationObserver(() => { if (b.disabled) window.sawBusy = true; }).observe(b, {attributes: true}); }"""
    )
    with opened.expect_response(lambda r: r.request.method == "POST") as posted:
        opened.locator("#submit").click()
    result = posted.value.json()
    assert posted.value.status == 200, result
    sent = posted.value.request.post_data_json  # the page marks the origins itself (the service checks them again)
    assert origin(sent, INDICATION) == {"source": "auto-server"}
    assert origin(sent, "attestation")["source"] == "manual"
    assert sent["status"] == "completed" and sent["identifier"] == {
        "system": f"{server.base}/fhir/coverage-assertion-id",
        "value": link.split("/dtr/")[1].split("?")[0],
    }
    opened.wait_for_selector("#decision:not([hidden])")
    assert opened.evaluate("window.sawBusy") is True
    assert opened.locator("#errors").is_hidden() and opened.locator("#form-section").is_hidden()

    assert opened.locator("#decision-label").inner_text() == "Approved"
    pa_id = opened.locator("#pa-id").inner_text()
    assert re.fullmatch(r"PA-[A-Z0-9]{10}", pa_id) and pa_id == result["paId"]
    assert opened.locator("#pa-number").is_visible()
    assert opened.locator("#decision-summary").inner_text() == result["summary"]
    rows = opened.locator("#criteria tbody tr")
    assert rows.count() == len(result["criteria"]) > 0
    shown = {rows.nth(n).get_attribute("data-criterion"): rows.nth(n).inner_text() for n in range(rows.count())}
    assert "Met" in shown["IP0356-1"] and "congenital factor VII deficiency" in shown["IP0356-1"]
    assert opened.locator("#decision-policy").get_attribute("href") == f"{server.base}/policies/cigna-ip0356"

    # what was stored: the record's answer kept its origin, the signature is the clinician's
    stored = result["response"]
    assert origin(stored, INDICATION) == {"source": "auto-server"}
    assert origin(stored, "attestation")["source"] == "manual"
    assert stored["status"] == "completed"

    assert console.errors == [], console.errors  # no CSP violation, no script error, no failed load
    assert time.monotonic() - started < 30


@evidence_on_failure
def test_a_second_submission_and_a_reopened_link_are_told_why_not(
    server: Server, client_key: ClientKey, context: Any
) -> None:
    link, _ = sign_order(server, client_key)
    first, second = open_form(context, link), open_form(context, link)
    answer_boolean(first, "attestation", "Yes")
    first.locator("#submit").click()
    first.wait_for_selector("#decision:not([hidden])")

    # in the other tab the clinician changes the record's answer, which asks another criterion
    choose(second, INDICATION, "Glanzmann")
    answer_boolean(second, "IP0356-2A", "Yes")
    answer_boolean(second, "attestation", "Yes")
    with second.expect_request(lambda r: r.method == "POST") as posted:
        second.locator("#submit").click()  # the service refuses: the assertion is settled already
    sent = posted.value.post_data_json
    assert origin(sent, INDICATION)["source"] == "override"
    assert origin(sent, "IP0356-2A")["source"] == "manual"
    assert "No documentation is needed for this coverage assertion any more" in error_panel(second)
    assert second.locator("#form-section").is_visible() and second.locator("#submit").is_enabled()

    reopened = open_form(context, link)
    text = error_panel(reopened)
    assert "No documentation is needed for this coverage assertion any more" in text
    assert first.locator("#pa-id").inner_text() in text
    assert reopened.locator("#form-section").is_hidden()


@evidence_on_failure
def test_network_failure_on_submit_is_shown_and_the_form_stays(
    server: Server, client_key: ClientKey, context: Any
) -> None:
    link, _ = sign_order(server, client_key)
    opened = open_form(context, link)
    answer_boolean(opened, "attestation", "Yes")
    opened.route("**/response", lambda route: route.abort("connectionrefused"))
    opened.locator("#submit").click()
    assert "Could not reach the service" in error_panel(opened)
    assert opened.locator("#submit").is_enabled() and opened.locator("#form-section").is_visible()
    opened.unroute("**/response")
    opened.locator("#submit").click()  # and it works once the network is back
    opened.wait_for_selector("#decision:not([hidden])")
    assert opened.locator("#decision-label").inner_text() == "Approved"


@evidence_on_failure
def test_the_form_library_failing_to_load_is_shown(server: Server, client_key: ClientKey, context: Any) -> None:
    link, _ = sign_order(server, client_key)
    context.route("**/dtr/assets/lforms/webcomponent/main.js*", lambda route: route.abort())
    opened = open_form(context, link)
    assert "form library (LHC-Forms) did not load" in error_panel(opened)
    assert opened.locator("#title").inner_text().startswith("IP0356")  # the page still says what it is for


@evidence_on_failure
def test_a_bad_link_is_a_page_that_says_so(server: Server, client_key: ClientKey, context: Any) -> None:
    link, _ = sign_order(server, client_key)
    opened = open_form(context, link[:-3] + "AAA")
    assert "This form link is not valid" in error_panel(opened)
