"""Schemathesis fuzzing of a real `cds serve` from its own /openapi.json: every operation, with credentials that get
the requests past authentication (CDS Hooks JWT per call, a SMART access token with every scope, a form link for
the assertion named, a reviewer session with its CSRF token, the metrics token), then with none at all.

What must hold for every answer: no 5xx; every 4xx/5xx the service's error shape (an OperationOutcome with an issue
that has severity and code; the RFC 6749 error on /auth/token; on the HTML pages what the document says for that
page); and the answer conforms to the document (status code, content type and body schema documented).

Bounded and reproducible: a fixed number of examples per operation, derandomized, no Hypothesis database."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import schemathesis
from builders import condition, coverage_info, hook_request, med_order, role
from conftest import TEST_ISS, ClientKey
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from notify_receiver import subscription
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_e2e import Server
from test_review import PASSWORD, UMO, form_csrf, pas_request, reviewer_accounts

from cds import links, smart
from cds.config import DEFAULT_PAYERS

pytestmark = pytest.mark.e2e

EXAMPLES = 30  # per operation and run: ~50 operations x 2 runs, about a minute and a half on two cores
TOKEN_SECRET = "fuzz-" + "s" * 40
METRICS_TOKEN = "metrics-" + "m" * 32
FHIR = "application/fhir+json"
SENDING_SYSTEM = "8189991234"  # the org-identifier of the IG's example Subscription
# a caller with every credential is still refused here when what it sends is the credential being checked
MAY_REFUSE = {"POST /auth/token", "POST /review/signin"}
OAUTH_ERRORS = {"invalid_request", "invalid_client", "invalid_grant", "unsupported_grant_type", "invalid_scope"}
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


class Credentials:
    """What a well-behaved caller of each operation holds."""

    def __init__(self, server: Server, key: ClientKey) -> None:
        self.base = server.base
        self.key = key
        self.access = self._access_token()
        self.session, self.csrf = self._reviewer()
        # form links are made as the service makes them (cds.links), from the service secret set in the config
        self.link_rt = SimpleNamespace(
            config={"token_secret": TOKEN_SECRET, "form_link_seconds": 3600},
            base_url=self.base,
            clock=lambda: datetime.now(UTC),
        )

    def _access_token(self) -> str:
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": smart.ASSERTION_TYPE,
            "client_assertion": self.key.token(f"{self.base}/auth/token", iss=TEST_ISS, sub=TEST_ISS),
            "scope": " ".join(smart.SCOPES),
        }
        resp = requests.post(f"{self.base}/auth/token", data=form, timeout=10)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["access_token"])

    def _reviewer(self) -> tuple[str, str]:
        web = requests.Session()
        page = web.get(f"{self.base}/review/signin", timeout=10)
        form = {"username": "rn.lee", "password": PASSWORD, "csrf": form_csrf(page.text)}
        signed = web.post(f"{self.base}/review/signin", data=form, timeout=10, allow_redirects=False)
        assert signed.status_code == 303, signed.text
        csrf = web.get(f"{self.base}/review/api/session", timeout=10).json()["csrf"]
        return str(web.cookies["cds_review"]), str(csrf)

    def form_link(self, assertion_id: str) -> str:
        url = links.form_link(self.link_rt, assertion_id)  # type: ignore[arg-type]
        return url.rpartition("?t=")[2]

    def apply(self, case: Any) -> Any:
        """``case`` with its credentials: they replace whatever was generated in their place (invalid cases make
        up an Authorization header or a ``t``)."""
        headers, query, cookies = self.for_case(case)
        case.headers = {**(case.headers or {}), **headers}
        case.query = {**(case.query or {}), **query}
        case.cookies = {**(case.cookies or {}), **cookies}
        return case

    def for_case(self, case: Any) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        """Headers, query parameters and cookies that authenticate ``case`` as the service expects."""
        path = case.operation.path
        params = {k: unquote(str(v)) for k, v in (case.path_parameters or {}).items()}  # as the server reads them
        concrete = re.sub(r"\{(\w+)\}", lambda m: params.get(m.group(1), m.group(0)), path)
        if path.startswith("/cds-services") or path.startswith("/fhir/QuestionnaireResponse/{"):
            return {"Authorization": f"Bearer {self.key.token(self.base + concrete)}"}, {}, {}
        if path.startswith("/fhir"):
            return {"Authorization": f"Bearer {self.access}"}, {}, {}
        if path.startswith("/dtr/{assertion_id}"):
            link = self.form_link(params["assertion_id"])
            return {"X-Form-Link": link}, {"t": link}, {}
        if path.startswith("/review"):
            return {"X-CSRF-Token": self.csrf}, {}, {"cds_review": self.session}
        if path == "/metrics":
            return {"Authorization": f"Bearer {METRICS_TOKEN}"}, {}, {}
        return {}, {}, {}


def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every answer >= 400 is the service's error shape, or the shape a protocol fixes for that operation."""
    status = response.status_code
    if status < 400:
        return None
    media = (response.headers.get("content-type") or [""])[0].split(";")[0].strip()
    if media == "text/html":
        documented = case.operation.definition.raw["responses"].get(str(status), {}).get("content", {})
        assert "text/html" in documented, f"{status} is an HTML page, but the document says {sorted(documented)}"
        return True
    assert media in ("application/json", "application/fhir+json"), f"{status} answered {media!r}, not JSON"
    body = json.loads(response.content)
    if case.operation.path == "/auth/token" and status in (400, 401, 429) and "resourceType" not in body:
        assert body.get("error") in OAUTH_ERRORS and isinstance(body.get("error_description"), str), body
        return True
    if case.operation.path == "/readyz" and status == 503:
        assert body["status"] == "unavailable" and body["failing"], body
        return True
    assert body.get("resourceType") == "OperationOutcome", body
    issues = body.get("issue")
    assert isinstance(issues, list) and any(
        isinstance(i, dict) and i.get("severity") and i.get("code") for i in issues
    ), body
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as mp:  # tables in a list do not fit Server's one-line settings: environment
        mp.setenv("CDS_REVIEWERS", json.dumps(reviewer_accounts()))
        mp.setenv("CDS_PAYERS", json.dumps([*DEFAULT_PAYERS, UMO]))
        # Server's own [[clients]] table, with the sending system the IG's Subscription follows
        client = {"iss": TEST_ISS, "jwks": client_key.jwks, "fhir_servers": ["http://127.0.0.1:*"]}
        mp.setenv("CDS_CLIENTS", json.dumps([{**client, "org_identifiers": [SENDING_SYSTEM]}]))
        s = Server(
            tmp_path_factory.mktemp("fuzz"),
            client_key,
            auth_required=True,
            token_secret=TOKEN_SECRET,
            metrics_token=METRICS_TOKEN,
            access_token_seconds=3600,
            notify_delivery=False,
            log_level="ERROR",
        )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def credentials(fuzz_server: Server, client_key: ClientKey) -> Credentials:
    return Credentials(fuzz_server, client_key)


@pytest.fixture(scope="module")
def api(fuzz_server: Server) -> Any:
    """The document as the running server serves it."""
    return schemathesis.openapi.from_url(f"{fuzz_server.base}/openapi.json")


def fuzz(api: Any, send: Callable[[Any], Any]) -> dict[str, Counter[int]]:
    """Every operation of ``api``, EXAMPLES cases each (valid and invalid per the document), sent by ``send``; the
    failures by operation are asserted at the end, all of them named. Returns the statuses answered, by operation."""
    failures: dict[str, str] = {}
    sent: dict[str, Counter[int]] = {}
    for result in api.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        try:
            sent[label] = _fuzz_operation(operation, send)
        except (Exception, BaseExceptionGroup) as exc:  # every finding is reported, by operation (FailureGroup too)
            failures[label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert not failures, "\n\n".join(f"== {label}\n{text}" for label, text in failures.items())
    return sent


def _fuzz_operation(operation: Any, send: Callable[[Any], Any]) -> Counter[int]:
    statuses: Counter[int] = Counter()
    strategy = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @FUZZ
    @given(case=strategy)
    def run(case: Any) -> None:
        statuses[send(case).status_code] += 1

    run()
    return statuses


def test_fuzz_with_credentials(api: Any, fuzz_server: Server, credentials: Credentials) -> None:
    def send(case: Any) -> Any:
        return validated(credentials.apply(case), fuzz_server)

    sent = fuzz(api, send)
    assert len(sent) >= 45 and all(sent.values()), sent
    refused = {label: dict(statuses) for label, statuses in sent.items() if statuses[401]}
    assert set(refused) <= MAY_REFUSE, f"the credentials did not get these past authentication: {refused}"


def test_fuzz_without_credentials(api: Any, fuzz_server: Server) -> None:
    sent = fuzz(api, lambda case: validated(case, fuzz_server))
    assert len(sent) >= 45 and all(sent.values()), sent
    secured = {
        f"{method.upper()} {path}"
        for path, item in api.raw_schema["paths"].items()
        for method, op in item.items()
        if op["security"]
    }
    assert len(secured) >= 25
    let_in = {label: dict(statuses) for label, statuses in sent.items() if label in secured and _any_2xx(statuses)}
    assert let_in == {}, f"answered without credentials: {let_in}"
    assert all(sent[label][401] or sent[label][303] for label in secured), {s: dict(sent[s]) for s in secured}


def _any_2xx(statuses: Counter[int]) -> bool:
    return any(200 <= status < 300 for status in statuses)


def validated(case: Any, server: Server) -> Any:
    """Send ``case`` and run every check on the answer (a failure raises, naming the checks and a curl line)."""
    return case.call_and_validate(
        base_url=server.base, checks=CHECKS, additional_checks=[error_shape], timeout=30, allow_redirects=False
    )


def test_real_answers_conform_to_the_document(api: Any, fuzz_server: Server, credentials: Credentials) -> None:
    """The answers of real uses, the successful ones included (random input seldom gets that far), match the
    document: a hook call and its feedback, the form it asks for (FHIR, DTR package, the page and its JSON), a PAS
    request pended for review and the reviewer's view of it, and a Subscription's life."""

    def call(method: str, path: str, status: int, **given: Any) -> Any:
        case = credentials.apply(api[path][method].Case(**given))
        resp = validated(case, fuzz_server)
        assert resp.status_code == status, (method, path, resp.text[:2000])
        return resp

    order = hook_request([med_order()], conditions=[condition("D68.311")], roles=[role("207RX0202X")])
    sign = call("POST", "/cds-services/{service_id}", 200, path_parameters={"service_id": "order-sign"}, body=order)
    answer = sign.json()
    info = coverage_info(answer["systemActions"][0]["resource"])
    assertion_id, canonical = info["coverage-assertion-id"][0], info["questionnaire"][0]
    feedback = {
        "feedback": [
            {
                "card": answer["cards"][0]["uuid"],
                "outcome": "overridden",
                "overrideReason": {"userComment": "seen"},
                "outcomeTimestamp": "2026-11-23T15:00:00Z",
            }
        ]
    }
    call(
        "POST", "/cds-services/{service_id}/feedback", 200, path_parameters={"service_id": "order-sign"}, body=feedback
    )
    select = hook_request([med_order()], hook="order-select", conditions=[condition("D68.311")])
    call("POST", "/cds-services/{service_id}", 200, path_parameters={"service_id": "order-select"}, body=select)
    call("GET", "/cds-services", 200)

    qid = canonical.split("|")[0].rsplit("/", 1)[-1]
    call("GET", "/fhir/Questionnaire/{qid}", 200, path_parameters={"qid": qid})
    call("GET", "/fhir/QuestionnaireResponse/{assertion_id}", 200, path_parameters={"assertion_id": assertion_id})
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "coverage", "resource": {"resourceType": "Coverage", "id": "cov-1"}},
            {"name": "context", "valueString": assertion_id},
        ],
    }
    package = call("POST", "/fhir/Questionnaire/$questionnaire-package", 200, body=params, media_type=FHIR).json()
    bundle = package["parameter"][0]["resource"]
    value_sets = [e["resource"]["url"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ValueSet"]
    assert value_sets, bundle
    call("GET", "/fhir/ValueSet/$expand", 200, query={"url": value_sets[0]})
    call("GET", "/dtr/{assertion_id}", 200, path_parameters={"assertion_id": assertion_id})
    call("GET", "/dtr/{assertion_id}/package", 200, path_parameters={"assertion_id": assertion_id})

    wanted = subscription("https://ehr.example/pas-notifications", org=SENDING_SYSTEM)
    created = call("POST", "/fhir/Subscription", 201, body=wanted, media_type=FHIR).json()
    sub = {"sub_id": created["id"]}
    call("GET", "/fhir/Subscription/{sub_id}", 200, path_parameters=sub)
    call("GET", "/fhir/Subscription/{sub_id}/$status", 200, path_parameters=sub)
    off = {**wanted, "id": created["id"], "status": "off"}
    assert (
        call("PUT", "/fhir/Subscription/{sub_id}", 200, path_parameters=sub, body=off, media_type=FHIR).json()["status"]
        == "off"
    )
    call("DELETE", "/fhir/Subscription/{sub_id}", 204, path_parameters=sub)

    call("POST", "/fhir/Claim/$submit", 200, body=pas_request("fuzz-real-1"), media_type=FHIR)
    queue = call("GET", "/review/api/requests", 200).json()["requests"]
    assert queue, "the PAS request is pended for review"
    request_id = queue[0]["id"]
    call("GET", "/review/api/requests/{request_id}", 200, path_parameters={"request_id": request_id})
    call("GET", "/review/requests/{request_id}", 200, path_parameters={"request_id": request_id})
    call("GET", "/review", 200)
    call("GET", "/metrics", 200)
    call("GET", "/openapi.json", 200)
