"""Hostile input through the Flask app: bounded JSON, safe log lines, long URLs, and card feedback limits.

Each test here failed before the fix it names: a 500 (RecursionError, ValueError), a raw log line, a 404 instead of
414, or feedback accepted that the store (String(128) card column on PostgreSQL) or a reader could not handle."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from builders import hook_request, med_order
from conftest import post_hook
from flask import Flask
from flask.testing import FlaskClient
from test_error_shape import assert_operation_outcome

from cds import jsonsafe, requestlog
from cds.errors import MalformedJson
from cds.logsafe import clean

DEEP_ARRAYS = "[" * 10_000 + "]" * 10_000
DEEP_OBJECTS = '{"a":' * 10_000 + "1" + "}" * 10_000
HUGE_INTEGER = '{"n": ' + "7" * 5_000 + "}"


@pytest.fixture
def echo(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(bench_echo=True).test_client()


def post(client: FlaskClient, path: str, data: str | bytes) -> Any:
    return client.post(path, data=data, content_type="application/json")


# 1. JSON bounds ---------------------------------------------------------------------------------------------------

JSON_ROUTES = ["/cds-services/order-sign", "/cds-services/order-sign/feedback", "/_echo"]


@pytest.mark.parametrize("path", JSON_ROUTES)
@pytest.mark.parametrize("body", [DEEP_ARRAYS, DEEP_OBJECTS], ids=["arrays", "objects"])
def test_json_nested_10000_deep_is_400_not_a_recursion_error(echo: FlaskClient, path: str, body: str) -> None:
    assert_operation_outcome(post(echo, path, body), 400, "structure", "10000 deep")


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_a_5000_digit_integer_is_400_not_a_value_error(echo: FlaskClient, path: str) -> None:
    assert_operation_outcome(post(echo, path, HUGE_INTEGER), 400, "structure", "number of 5000 characters")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_are_refused(echo: FlaskClient, token: str) -> None:
    assert_operation_outcome(post(echo, "/_echo", f'{{"x": [{token}]}}'), 400, "structure", token)


def test_the_limits_themselves_are_accepted(echo: FlaskClient) -> None:
    depth = jsonsafe.MAX_DEPTH
    resp = post(echo, "/_echo", "[" * depth + "]" * depth)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    number = "-1." + "2" * (jsonsafe.MAX_NUMBER_CHARS - 7) + "e+10"
    assert len(number) == jsonsafe.MAX_NUMBER_CHARS
    assert post(echo, "/_echo", f"[{number}]").status_code == 200
    big_int = "9" * jsonsafe.MAX_NUMBER_CHARS
    assert post(echo, "/_echo", f"[{big_int}]").get_json() == [int(big_int)]


def test_one_past_the_limits_is_refused(echo: FlaskClient) -> None:
    depth = jsonsafe.MAX_DEPTH + 1
    assert_operation_outcome(post(echo, "/_echo", "[" * depth + "]" * depth), 400, "structure", f"{depth} deep")
    number = "1" * (jsonsafe.MAX_NUMBER_CHARS + 1)
    assert_operation_outcome(post(echo, "/_echo", f"[{number}]"), 400, "structure", "number")


def test_brackets_and_digits_inside_strings_do_not_count(echo: FlaskClient) -> None:
    body = {"brackets": "[{" * 5_000, "digits": "1" * 5_000, "escaped": '\\"[[[[\\\\', "closing": "]}" * 5_000}
    resp = post(echo, "/_echo", json.dumps(body))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json() == body


@pytest.mark.parametrize(
    "text, depth",
    [
        ('["\\"", [[[]]]]', 4),  # an escaped quote does not end the string
        ('["\\\\", [[[]]]]', 4),  # an escaped backslash does not escape the closing quote
        ('["\\\\\\"[[[[", []]', 2),  # backslash, quote: both escaped, the brackets stay inside the string
        ('["]]]]", ' + "[" * 100 + "]" * 100 + "]", 101),  # closing brackets in a string do not hide depth
    ],
)
def test_the_depth_is_counted_outside_strings_only(text: str, depth: int) -> None:
    if depth > jsonsafe.MAX_DEPTH:
        with pytest.raises(MalformedJson, match=f"{depth} deep"):
            jsonsafe.loads(text.encode())
    else:
        assert jsonsafe.loads(text.encode()) == json.loads(text)


def test_deep_json_in_utf16_is_refused_too() -> None:
    with pytest.raises(MalformedJson, match="deep"):
        jsonsafe.loads(DEEP_ARRAYS.encode("utf-16"))


@pytest.mark.parametrize("body", [b'"abc', b'["abc\\', b'"' + b'\\"' * 1000, b"\xff\xfe\x00", b""])
def test_broken_json_is_still_malformed_json(body: bytes) -> None:
    with pytest.raises(MalformedJson, match="not valid JSON"):
        jsonsafe.loads(body)


def test_an_unterminated_string_before_deep_nesting_is_refused(echo: FlaskClient) -> None:
    # json.loads would recurse through the brackets before it reached the string's missing end
    assert_operation_outcome(post(echo, "/_echo", DEEP_ARRAYS[:5_000] + '"'), 400, "structure", "deep")


def test_loads_names_its_source() -> None:
    with pytest.raises(MalformedJson, match="^The EHR's response nests"):
        jsonsafe.loads(DEEP_ARRAYS.encode(), source="The EHR's response")


def test_a_valid_hook_request_still_parses_the_same() -> None:
    body = json.dumps(hook_request([med_order()])).encode()
    assert jsonsafe.loads(body) == json.loads(body)


# 2. Log lines -----------------------------------------------------------------------------------------------------

FORGED = "x\n2026-11-23 15:00:00,000 INFO cds.crd.hooks hook service=order-sign status=200 ms=1 hookInstance=y orders=9"


@pytest.mark.parametrize("instance", [FORGED, "z" * 1_000_000], ids=["newline", "1MB"])
def test_a_hook_instance_that_is_no_uuid_is_400_and_logged_on_one_bounded_line(
    client: FlaskClient, caplog: pytest.LogCaptureFixture, instance: str
) -> None:
    body = hook_request([med_order()])
    body["hookInstance"] = instance
    with caplog.at_level(logging.INFO, logger="cds.request"):
        resp = post_hook(client, body)
    assert resp.status_code == 400
    assert resp.get_json()["issue"][0]["expression"] == ["hookInstance"]
    lines = [requestlog.JsonFormatter().format(r) for r in caplog.records if r.name == "cds.request"]
    assert len(lines) == 1
    assert "\n" not in lines[0] and "\r" not in lines[0]
    assert len(lines[0]) < 500 and "2026-11-23 15:00:00" not in lines[0]


def test_a_long_printable_hook_instance_is_logged_capped(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    body = hook_request([med_order()])
    body["hookInstance"] = "h" * 128  # the longest accepted
    with caplog.at_level(logging.INFO, logger="cds.request"):
        assert post_hook(client, body).status_code == 200
    lines = [requestlog.JsonFormatter().format(r) for r in caplog.records if r.name == "cds.request"]
    assert len(lines) == 1 and "more chars]" in lines[0] and len(lines[0]) < 500


def test_clean_escapes_and_caps() -> None:
    assert clean("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert clean("\x1b[31mred\u202e") == "\\x1b[31mred\\u202e"
    assert clean("back\\n") == "back\\\\n"  # a literal backslash-n cannot pass for an escaped newline
    assert clean("é ünïcode stays") == "é ünïcode stays"
    assert clean("y" * 100) == "y" * 64 + "...[36 more chars]"
    assert len(clean("\n" * 10_000)) < 64 * 2 + 30


# 3. Long request targets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, mimetype",
    [
        ("/cds-services/" + "a" * 5_000, "application/json"),
        ("/cds-services?q=" + "a" * 5_000, "application/json"),
        ("/fhir/Questionnaire/" + "a" * 5_000, "application/fhir+json"),
    ],
)
def test_a_long_request_target_is_414_in_the_service_shape(client: FlaskClient, path: str, mimetype: str) -> None:
    resp = client.get(path)
    assert_operation_outcome(resp, 414, "too-long", "at most 4000")
    assert resp.mimetype == mimetype


def test_a_request_target_at_the_limit_is_served(client: FlaskClient) -> None:
    path = "/nothing/" + "a" * (4_000 - len("/nothing/") - 1)  # Flask's full_path adds "?"
    assert_operation_outcome(client.get(path), 404, "not-found")


# 5. Card feedback -------------------------------------------------------------------------------------------------

CARD = "0f2c5c1e-6b5a-4c7e-9a43-2b1c1b4f9d10"


def item(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "card": CARD,
        "outcome": "overridden",
        "overrideReason": {"reason": {"code": "not-relevant"}, "userComment": "Patient already on treatment"},
        "outcomeTimestamp": "2026-11-23T15:00:00Z",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def send_feedback(client: FlaskClient, *items: dict[str, Any]) -> Any:
    return client.post("/cds-services/order-sign/feedback", json={"feedback": list(items)})


def test_valid_feedback_is_received(client: FlaskClient) -> None:
    accepted = item(outcome="accepted", acceptedSuggestions=[{"id": "s-1"}], overrideReason=None)
    resp = send_feedback(client, item(), accepted)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json() == {"received": 2}


def test_feedback_is_capped_at_100_items(client: FlaskClient) -> None:
    assert send_feedback(client, *[item()] * 100).status_code == 200
    resp = send_feedback(client, *[item()] * 10_000)
    assert_operation_outcome(resp, 400, "too-long", "at most 100")


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-23T15:00:00Z",
        "2026-11-23T15:00:00.123Z",
        "2026-11-23T16:00:00+01:00",
        "2026-11-23T10:00:00.5-05:00",
    ],
)
def test_outcome_timestamps_that_are_fhir_instants(client: FlaskClient, stamp: str) -> None:
    assert send_feedback(client, item(outcomeTimestamp=stamp)).status_code == 200


@pytest.mark.parametrize(
    "stamp",
    [
        "yesterday",
        "2026-11-23",
        "2026-11-23T15:00:00",  # no zone
        "2026-11-23T15:00Z",  # no seconds
        "2026-02-30T15:00:00Z",  # no such day
        "2026-11-23T25:00:00Z",
        "2026-11-23 15:00:00Z",
        "2026-11-23T15:00:00Z\n",
        "2026-11-23T15:00:00." + "1" * 1_000 + "Z",
    ],
)
def test_outcome_timestamps_that_are_not_instants(client: FlaskClient, stamp: str) -> None:
    resp = send_feedback(client, item(outcomeTimestamp=stamp))
    assert_operation_outcome(resp, 400, mentions="FHIR instant")
    assert resp.get_json()["issue"][0]["expression"] == ["feedback[0].outcomeTimestamp"]


@pytest.mark.parametrize(
    "card, code",
    [("c" * 129, "too-long"), ("c" * 65, "too-long"), ("card\nforged", None), ("card\n", None), ("a b", None)],
)
def test_a_card_id_that_is_not_uuid_sized_is_400(client: FlaskClient, card: str, code: str | None) -> None:
    resp = send_feedback(client, item(card=card))
    assert_operation_outcome(resp, 400, code, mentions="card")
    assert resp.get_json()["issue"][0]["expression"] == ["feedback[0].card"]


def test_a_64_character_card_id_is_accepted(client: FlaskClient) -> None:
    assert send_feedback(client, item(card="c" * 64)).status_code == 200


def test_a_user_comment_is_capped(client: FlaskClient) -> None:
    ok = {"reason": {"code": "x"}, "userComment": "w" * 1_000}
    assert send_feedback(client, item(overrideReason=ok)).status_code == 200
    resp = send_feedback(client, item(overrideReason={"userComment": "w" * 1_001}))
    assert_operation_outcome(resp, 400, "too-long", "at most 1000")
    assert resp.get_json()["issue"][0]["expression"] == ["feedback[0].overrideReason.userComment"]


def test_a_user_comment_that_is_not_text_is_400(client: FlaskClient) -> None:
    resp = send_feedback(client, item(overrideReason={"userComment": {"text": "x"}}))
    assert_operation_outcome(resp, 400, mentions="userComment")
