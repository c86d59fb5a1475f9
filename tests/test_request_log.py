"""The request log: one JSON line per request with the documented fields, a correlation id on every response, and
never patient data or a token, proven against a real `cds serve` fed requests full of both."""

from __future__ import annotations

import json
import logging
import socket
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from builders import condition, coverage, ehr_chart, hook_request, med_order, patient
from conftest import TEST_ISS, ClientKey, post_hook
from fake_ehr import FakeEHR
from flask import Flask, g
from flask.testing import FlaskClient
from test_e2e import Server

from cds import requestlog
from cds.config import load_config
from cds.errors import ConfigError

DOCUMENTED = {"ts", "level", "logger", "message", *requestlog.FIELDS}


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [dict(r.cds_request) for r in caplog.records if r.name == "cds.request"]


# --- in process ----------------------------------------------------------------------------------------------------


def test_one_line_per_request_with_the_documented_fields(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cds.request"):
        resp = client.get("/fhir/QuestionnaireResponse/assert-4711?patient=pat-0815", headers={"X-Request-ID": "r-1"})
    lines = request_lines(caplog)
    assert len(lines) == 1
    assert set(lines[0]) == set(requestlog.FIELDS)
    assert lines[0]["route"] == "/fhir/QuestionnaireResponse/<assertion_id>"
    assert lines[0]["method"] == "GET" and lines[0]["status"] == resp.status_code
    assert lines[0]["correlation_id"] == "r-1" and resp.headers["X-Request-ID"] == "r-1"
    assert isinstance(lines[0]["duration_ms"], float) and lines[0]["duration_ms"] >= 0
    shown = JsonLine(caplog.records[-1])
    assert set(shown) == DOCUMENTED and shown["message"] == "request" and shown["logger"] == "cds.request"
    assert "assert-4711" not in json.dumps(shown) and "pat-0815" not in json.dumps(shown)


def JsonLine(record: logging.LogRecord) -> dict[str, Any]:  # noqa: N802 - reads like the line it returns
    text = requestlog.JsonFormatter().format(record)
    assert "\n" not in text
    parsed: dict[str, Any] = json.loads(text)
    return parsed


@pytest.mark.parametrize(
    "headers, kept",
    [
        ({"X-Request-ID": "4bf92f3577b34da6a3ce929d0e0e4736"}, True),
        ({"X-Correlation-ID": "ehr:order-sign.42"}, True),
        ({"X-Request-ID": "Doe, Jane 1980-04-02"}, False),  # spaces and commas: not an id
        ({"X-Request-ID": "a" * 129}, False),
        ({"X-Request-ID": "x\tforged=line\u00e9"}, False),
        ({}, False),
    ],
)
def test_a_well_formed_correlation_id_is_kept_else_one_is_made(
    client: FlaskClient, headers: dict[str, str], kept: bool
) -> None:
    got = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    if kept:
        assert got == next(iter(headers.values()))
    else:
        assert len(got) == 32 and int(got, 16) >= 0 and got not in headers.values()


def test_a_hook_call_line_names_the_service_the_hook_instance_and_the_client(
    make_app: Callable[..., Flask], client_key: ClientKey, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_app(auth_required=True).test_client()
    body = hook_request([med_order()], conditions=[condition("D68.311")])
    token = client_key.token("http://cds.test/cds-services/order-sign")
    with caplog.at_level(logging.INFO, logger="cds.request"):
        resp = post_hook(client, body, headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200
    (line,) = request_lines(caplog)
    assert line["route"] == "/cds-services/<service_id>" and line["service"] == "order-sign"
    assert line["hook_instance"] == body["hookInstance"] and line["client_id"] == TEST_ISS and line["orders"] == 1


def test_request_log_off_writes_no_line_and_still_returns_the_id(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_app(request_log=False).test_client()
    with caplog.at_level(logging.INFO, logger="cds.request"):
        resp = client.get("/healthz")
    assert request_lines(caplog) == [] and resp.headers["X-Request-ID"]


def test_probe_successes_are_left_out_without_request_log_probes(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    token = "m" * 32
    quiet = make_app(request_log_probes=False, metrics_token=token).test_client()
    with caplog.at_level(logging.INFO, logger="cds.request"):
        assert quiet.get("/healthz").status_code == 200 and quiet.get("/readyz").status_code == 200
        assert quiet.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert quiet.get("/cds-services").status_code == 200
        assert quiet.get("/metrics").status_code == 401  # a probe's failure is still written
    assert [(line["route"], line["status"]) for line in request_lines(caplog)] == [
        ("/cds-services", 200),
        ("/metrics", 401),
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cds.request"):
        make_app().test_client().get("/healthz")
    assert [line["route"] for line in request_lines(caplog)] == ["/healthz"]  # written by default


def test_the_formatter_gives_one_json_object_and_never_an_exceptions_message(app: Flask) -> None:
    quoted = "Patient Jane Doe, SSN 078-05-1120"  # what an exception's message may quote from a request
    try:
        raise ValueError(quoted)
    except ValueError:
        record = logging.LogRecord("cds", logging.ERROR, __file__, 1, "two\nlines %s", ("here",), sys.exc_info())
    with app.test_request_context("/x"):
        g.correlation_id = "corr-7"
        text = requestlog.JsonFormatter().format(record)
    assert "\n" not in text and "Jane Doe" not in text and "078-05-1120" not in text
    got = json.loads(text)
    assert got["message"] == "two\nlines here" and got["level"] == "ERROR" and got["correlation_id"] == "corr-7"
    assert got["exc_type"] == "ValueError" and any("test_request_log.py" in f for f in got["stack"])
    assert got["ts"].endswith("Z")


def test_the_text_format_is_one_plain_line(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cds.request"):
        client.get("/healthz", headers={"X-Request-ID": "r-2"})
    (record,) = [r for r in caplog.records if r.name == "cds.request"]
    text = requestlog.formatter("text").format(record)
    assert " INFO cds.request request GET /healthz 200 " in text and text.endswith("ms id=r-2")


def test_annotate_refuses_fields_that_are_not_documented(app: Flask) -> None:
    with app.test_request_context("/x"):
        with pytest.raises(ValueError):
            requestlog.annotate(patient="pat-1")


def test_log_format_is_json_or_text() -> None:
    assert load_config({}, environ={})["log_format"] == "json"
    assert load_config({"log_format": "text"}, environ={})["log_format"] == "text"
    with pytest.raises(ConfigError, match="log_format"):
        load_config({"log_format": "xml"}, environ={})


# --- a real server, fed patient data and tokens --------------------------------------------------------------------

NAME, GIVEN = "Quackenbush", "Zebulon"
MRN, SSN, BIRTH = "MRN-77441199", "078-05-1120", "1951-07-04"
STREET, PHONE, EMAIL = "742 Evergreen Terrace", "555-867-5309", "zebulon.q@example.org"
PATIENT_ID = "PATIENT-ID-31337"
EHR_TOKEN = "ehr-access-token-b7c1e9"
FORM_TOKEN = "form-link-token-5f3a2d"
BOGUS_BEARER = "sk-live-9d8e7f6a5b4c"
SECRETS = [NAME, GIVEN, MRN, SSN, BIRTH, STREET, PHONE, EMAIL, PATIENT_ID, EHR_TOKEN, FORM_TOKEN, BOGUS_BEARER]


def phi_patient() -> dict[str, Any]:
    p = patient(birth=BIRTH)
    p["name"] = [{"family": NAME, "given": [GIVEN]}]
    p["identifier"] = [
        {"system": "urn:ehr:mrn", "value": MRN},
        {"system": "http://hl7.org/fhir/sid/us-ssn", "value": SSN},
    ]
    p["address"] = [{"line": [STREET], "city": "Springfield", "postalCode": "49007"}]
    p["telecom"] = [{"system": "phone", "value": PHONE}, {"system": "email", "value": EMAIL}]
    return p


class Calls:
    """Requests sent with their own correlation id each, so that each one's line can be found."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.ids: list[str] = []
        self.statuses: dict[str, int] = {}

    def send(self, method: str, path: str, **kw: Any) -> requests.Response:
        cid = f"phi-test-{len(self.ids)}-{uuid.uuid4().hex[:8]}"
        self.ids.append(cid)
        headers = {"X-Request-ID": cid, **kw.pop("headers", {})}
        resp = requests.request(method, self.server.base + path, headers=headers, timeout=15, **kw)
        assert resp.headers["X-Request-ID"] == cid
        assert resp.status_code < 500, (method, path, resp.text)
        self.statuses[cid] = resp.status_code
        return resp


def raw(server: Server, data: bytes) -> bytes:
    """Bytes straight onto the socket: what gunicorn refuses before the app sees it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.e2e
def test_no_patient_data_or_token_reaches_the_log_and_each_request_is_one_json_line(
    tmp_path: Path, client_key: ClientKey
) -> None:
    with FakeEHR() as ehr:
        chart = [r if r["resourceType"] != "Patient" else phi_patient() for r in ehr_chart()]
        ehr.add(*chart)
        ehr.token = EHR_TOKEN
        server = Server(tmp_path, client_key, demo_client=False, log_level="INFO")
        try:
            calls = Calls(server)
            sign = f"{server.base}/cds-services/order-sign"

            def hook(body: Any, token: str | None = None, **kw: Any) -> requests.Response:
                headers = {"Authorization": f"Bearer {token or client_key.token(sign)}", **kw.pop("headers", {})}
                return calls.send("POST", "/cds-services/order-sign", headers=headers, **kw)

            full = hook_request(
                [med_order(dose=30, every_hours=56, days=None)],
                the_patient=phi_patient(),
                conditions=[condition("D68.2")],
                the_coverage=coverage(subscriberId=SSN),
            )
            answered = hook(full, json=full)
            assert answered.status_code == 200
            links = [
                link["url"]
                for card in answered.json()["cards"]
                for link in card.get("links", ())
                if "?t=" in link["url"]
            ]
            assert links, "the documentation card links the form page"
            calls.send("GET", links[0].removeprefix(server.base))  # a real form link, its token in the query
            calls.send("GET", f"/dtr/{PATIENT_ID}?t={FORM_TOKEN}")

            queried = hook_request([med_order()], omit=("conditions", "observations", "patient"), fhir_server=ehr.base)
            queried["fhirAuthorization"]["access_token"] = EHR_TOKEN
            queried["context"]["patientId"] = PATIENT_ID
            hook(queried, json=queried)
            assert any(PATIENT_ID in p for p, _ in ehr.requests)  # the EHR was queried, the patient id in its query

            mismatched = hook_request([med_order()], the_patient=phi_patient())
            mismatched["context"]["patientId"] = PATIENT_ID
            hook(mismatched, json=mismatched)
            broken = f'{{"hook": "order-sign", "patient": "{NAME}, {GIVEN}", "ssn": "{SSN}"'
            hook(None, data=broken, headers={"Content-Type": "application/json"})
            hook(full, token=BOGUS_BEARER, json=full)  # not a JWT: 401
            replayed = client_key.token(sign)
            hook(full, token=replayed, json=full)
            hook(full, token=replayed, json=full)  # a replayed JWT: 401
            feedback = {"feedback": [{"card": "c-1", "outcome": "overridden", "overrideReason": {"userComment": NAME}}]}
            calls.send("POST", "/cds-services/order-sign/feedback", json=feedback)

            fhir = {"Content-Type": "application/fhir+json"}
            calls.send("GET", f"/fhir/QuestionnaireResponse/{PATIENT_ID}?patient={PATIENT_ID}&ssn={SSN}")
            calls.send("GET", f"/fhir/Questionnaire/q-1?subject=Patient/{PATIENT_ID}&name={NAME}")
            calls.send("GET", f"/fhir/ValueSet/$expand?url=urn:x&patient={PATIENT_ID}")
            calls.send(
                "POST",
                "/fhir/QuestionnaireResponse",
                headers={**fhir, "Authorization": f"Bearer {BOGUS_BEARER}"},
                data=json.dumps({"resourceType": "QuestionnaireResponse", "subject": {"display": NAME}}),
            )
            calls.send("POST", "/fhir/Claim/$submit", headers=fhir, data=json.dumps({"entry": [phi_patient()]}))
            calls.send("POST", "/fhir/Claim/$submit", headers=fhir, data=f"{{{NAME} {SSN}")
            calls.send("POST", "/auth/token", data={"grant_type": "client_credentials", "client_assertion": NAME})
            calls.send("GET", f"/no/such/route/{PATIENT_ID}?mrn={MRN}")
            calls.send("GET", f"/fhir/Questionnaire/{PATIENT_ID}?" + "q=" + SSN * 362)  # over 4,000: the app's 414
            calls.send("GET", "/healthz", headers={"Authorization": f"Bearer {BOGUS_BEARER}", "X-Patient": NAME})

            # what gunicorn refuses before the app sees it: a request line over its limit, a bad request line, a
            # bad header; each answered in the service's shape and logged as route (unparsed)
            refused = [
                raw(server, f"GET /fhir/Patient?name={NAME}&q={'x' * 5000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
                raw(server, f"GET /fhir/Patient?name={NAME} {SSN} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
                raw(server, f"GET /healthz HTTP/1.1\r\nHost: x\r\nX Bad: {MRN}\r\n\r\n".encode()),
            ]
            assert all(b" 4" in r.split(b"\r\n", 1)[0] for r in refused), refused
        finally:
            server.stop()

    log = (tmp_path / "server.log").read_text()
    for secret in SECRETS:
        assert secret not in log, secret
    for token in (client_key.token(sign)[:40], replayed):
        assert token not in log
    # without the demo client and a terminal, `cds serve` prints nothing for people: every line is one JSON object
    parsed = [json.loads(text) for text in log.splitlines() if text.strip()]
    (started,) = [p for p in parsed if p["logger"] == "cds.serve"]
    assert started["message"].startswith(f"serving {server.base} with 2 workers x 2 threads; store sqlite; policies ")
    lines = [p for p in parsed if p["logger"] == "cds.request"]
    for cid in calls.ids:
        mine = [p for p in lines if p["correlation_id"] == cid]
        assert len(mine) == 1, (cid, mine)
        assert set(mine[0]) == DOCUMENTED and mine[0]["status"] == calls.statuses[cid]
        assert mine[0]["route"].startswith("/") or mine[0]["route"] == "(unmatched)"
    unparsed = [p for p in lines if p["route"] == "(unparsed)"]
    assert sorted(p["status"] for p in unparsed) == [400, 400, 414]
