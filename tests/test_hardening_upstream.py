"""Faults a hostile tester found in what the service reads from others (issue 11): tokens whose algorithm does not
fit the key, EHRs and JWKS hosts that drip their answers, slow EHRs taking every thread, links that lead the EHR
token away, FHIR servers the client may not name, oversized answers, and junk the EHR returns."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
import requests
from builders import bundle, coverage, ehr_chart, hook_request, med_order, patient
from conftest import BASE, TEST_ISS, ClientKey, post_hook
from cryptography.hazmat.primitives.asymmetric import rsa
from fake_ehr import FakeEHR
from flask import Flask
from flask.testing import FlaskClient
from hookcalls import check_response_shape
from test_e2e import Server

from cds.auth import TrustedClient, Verifier, fetch_jwks
from cds.errors import Unauthorized
from cds.fhirclient import FhirClient, FhirReadError
from cds.store import Store
from cds.upstream import allowed, origin_of, same_server

URL = f"{BASE}/cds-services/order-sign"
QUERIED = ("conditions", "observations")  # left out of the prefetch, so they are read from the EHR


class RawServer:
    """A TCP server that hands each connection to ``handle(conn, server)`` in its own thread: an EHR or JWKS host
    that misbehaves in ways http.server cannot (drips, stalls)."""

    def __init__(self, handle: Callable[[socket.socket, RawServer], bool | None]) -> None:
        self.handle = handle
        self.stop = threading.Event()
        self.connections = 0
        self.finished = 0  # connections whose whole answer was sent
        self.paths: list[str] = []  # the request target of each connection's first request
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/fhir"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            request = conn.recv(65536)
            self.paths.append(request.split(b" ", 2)[1].decode() if request.count(b" ") >= 2 else "")
            if self.handle(conn, self) is not False:  # False: the handler gave up before its whole answer
                self.finished += 1
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _answer(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


def drip(whole: bool) -> Callable[[socket.socket, RawServer], bool]:
    """One byte every 0.25 s, each well within any read timeout: of the whole answer, or of the body only."""

    def handle(conn: socket.socket, server: RawServer) -> bool:
        data = _answer(bundle())
        head, _, body = data.partition(b"\r\n\r\n")
        start = 0 if whole else len(head) + 4
        if not whole:
            conn.sendall(head + b"\r\n\r\n")
        for i in range(start, len(data)):
            if server.stop.wait(0.25):
                return False
            conn.sendall(data[i : i + 1])
        return True

    return handle


def hold(conn: socket.socket, server: RawServer) -> bool:
    """Answer nothing until the test is over."""
    server.stop.wait(60)
    return False


@pytest.fixture
def servers() -> Iterator[list[RawServer]]:
    made: list[RawServer] = []
    yield made
    for s in made:
        s.close()


def raw_server(servers: list[RawServer], handle: Callable[[socket.socket, RawServer], bool | None]) -> RawServer:
    s = RawServer(handle)
    servers.append(s)
    return s


def reasons(resp: Any) -> list[str]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    check_response_shape(body)
    ext = body["systemActions"][0]["resource"]["extension"][-1]["extension"]
    return [str(s.get("valueCodeableConcept", {}).get("text", "")) for s in ext if s["url"] == "reason"]


# --- 1. a token whose algorithm does not fit the key its kid names -------------------------------------------------
class RsaKey:
    def __init__(self, kid: str = "test-rs384") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwk.update({"kid": kid, "use": "sig"})


@pytest.fixture(scope="module")
def rsa_key() -> RsaKey:
    return RsaKey()


def _claims(aud: str) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": TEST_ISS, "aud": aud, "exp": now + 300, "iat": now, "jti": f"j-{time.monotonic_ns()}"}


@pytest.fixture
def mixed_keys_client(make_app: Callable[..., Flask], client_key: ClientKey, rsa_key: RsaKey) -> FlaskClient:
    jwks = {"keys": [*client_key.jwks["keys"], rsa_key.jwk]}
    app = make_app(auth_required=True, clients=[{"iss": TEST_ISS, "jwks": jwks}])
    return app.test_client()


@pytest.mark.parametrize("case", ["RS384 header on the EC key", "ES384 header on the RSA key"])
def test_an_algorithm_that_does_not_fit_the_key_is_401(
    mixed_keys_client: FlaskClient, client_key: ClientKey, rsa_key: RsaKey, case: str
) -> None:
    if case.startswith("RS384"):
        token = jwt.encode(_claims(URL), rsa_key.key, algorithm="RS384", headers={"kid": client_key.kid, "typ": "JWT"})
    else:
        token = jwt.encode(_claims(URL), client_key.key, algorithm="ES384", headers={"kid": rsa_key.kid, "typ": "JWT"})
    resp = post_hook(mixed_keys_client, hook_request([med_order()]), headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 401
    assert resp.get_json()["issue"][0]["details"]["text"] == "Unauthorized"  # no detail


def test_each_key_still_verifies_its_own_algorithm(
    mixed_keys_client: FlaskClient, client_key: ClientKey, rsa_key: RsaKey
) -> None:
    for token in (
        jwt.encode(_claims(URL), rsa_key.key, algorithm="RS384", headers={"kid": rsa_key.kid, "typ": "JWT"}),
        client_key.token(URL),
    ):
        resp = post_hook(mixed_keys_client, hook_request([med_order()]), headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.get_data(as_text=True)


def test_a_jwk_naming_another_algorithm_is_not_used(make_app: Callable[..., Flask], rsa_key: RsaKey) -> None:
    jwk = {**rsa_key.jwk, "alg": "RS256"}
    client = make_app(auth_required=True, clients=[{"iss": TEST_ISS, "jwks": {"keys": [jwk]}}]).test_client()
    token = jwt.encode(_claims(URL), rsa_key.key, algorithm="RS384", headers={"kid": rsa_key.kid, "typ": "JWT"})
    assert (
        post_hook(client, hook_request([med_order()]), headers={"Authorization": f"Bearer {token}"}).status_code == 401
    )


def test_a_token_header_nested_deep_is_401(mixed_keys_client: FlaskClient) -> None:
    import base64

    header = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).rstrip(b"=").decode()
    resp = post_hook(
        mixed_keys_client, hook_request([med_order()]), headers={"Authorization": f"Bearer {header}.{body}.c2ln"}
    )
    assert resp.status_code == 401


# --- 3. upstreams that drip --------------------------------------------------------------------------------------
@pytest.mark.parametrize("whole", [True, False], ids=["status line drips", "body drips"])
def test_an_ehr_that_drips_is_cut_off_at_the_deadline(
    make_app: Callable[..., Flask], servers: list[RawServer], whole: bool
) -> None:
    ehr = raw_server(servers, drip(whole))
    client = make_app(fhir_total_timeout=1.0, fhir_read_timeout=1.5).test_client()
    resp = post_hook(client, hook_request([med_order()], omit=QUERIED, fhir_server=ehr.base))
    assert ehr.connections >= 1 and ehr.finished == 0, "the answer came before the EHR finished sending"
    assert any("within the time allowed" in r or "time allowed" in r for r in reasons(resp)), reasons(resp)


def test_a_jwks_host_that_drips_is_cut_off(servers: list[RawServer]) -> None:
    host = raw_server(servers, drip(True))
    with pytest.raises(ValueError, match="time allowed"):
        fetch_jwks(host.base + "/jwks.json")
    assert host.connections == 1 and host.finished == 0


def test_a_slow_jwks_fetch_of_one_client_does_not_hold_up_another(tmp_path: Any, client_key: ClientKey) -> None:
    entered, release = threading.Event(), threading.Event()

    def fetch(url: str) -> Any:
        if "slow" in url:
            entered.set()
            release.wait(10)
            raise ValueError("gave up")
        return client_key.jwks

    store = Store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    store.init()
    verifier = Verifier(
        [
            TrustedClient("https://slow.test", jwks_url="https://slow.test/jwks"),
            TrustedClient(TEST_ISS, jwks_url="https://fast.test/jwks"),
        ],
        store,
        leeway=60,
        max_age=3600,
        cache_seconds=300,
        fetch=fetch,
        clock=lambda: datetime.now(UTC),
    )
    refused: list[Unauthorized] = []

    def slow_client() -> None:
        try:
            verifier.verify(f"Bearer {client_key.token('a', iss='https://slow.test')}", "a")
        except Unauthorized as exc:
            refused.append(exc)

    slow = threading.Thread(target=slow_client, daemon=True)
    slow.start()
    assert entered.wait(5)
    done: list[Any] = []
    fast = threading.Thread(target=lambda: done.append(verifier.verify(f"Bearer {client_key.token('a')}", "a")))
    fast.start()
    fast.join(5)
    still_fetching = slow.is_alive()
    release.set()
    slow.join(5)
    store.dispose()
    assert done and done[0]["iss"] == TEST_ISS, "the other client's token waited for the slow fetch"
    assert still_fetching and refused


def stale_verifier(tmp_path: Any, fetch: Callable[[str], Any]) -> tuple[Store, Verifier]:
    """A verifier for TEST_ISS by jwks_url whose key set is always stale (cache_seconds 0), over a fresh store."""
    store = Store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    store.init()
    verifier = Verifier(
        [TrustedClient(TEST_ISS, jwks_url="https://ehr.test/jwks")],
        store,
        leeway=60,
        max_age=3600,
        cache_seconds=0,
        fetch=fetch,
    )
    return store, verifier


def test_a_stale_key_set_serves_while_it_is_refreshed(tmp_path: Any, client_key: ClientKey) -> None:
    entered, release = threading.Event(), threading.Event()
    calls = []

    def fetch(url: str) -> Any:
        calls.append(url)
        if len(calls) > 1:
            entered.set()
            release.wait(10)
        return client_key.jwks

    store, verifier = stale_verifier(tmp_path, fetch)  # always stale: every call wants a refresh
    assert verifier.verify(f"Bearer {client_key.token('a')}", "a")  # first fetch
    verifier._sets[TEST_ISS].tried_at -= 11  # as if 11 s had passed: a refresh is due
    refresher = threading.Thread(target=lambda: verifier.verify(f"Bearer {client_key.token('a')}", "a"))
    refresher.start()
    assert entered.wait(5)
    claims = verifier.verify(f"Bearer {client_key.token('a')}", "a")  # uses the stale set, does not wait
    release.set()
    refresher.join(5)
    store.dispose()
    assert claims["iss"] == TEST_ISS and len(calls) == 2


def test_a_jwks_host_that_is_down_is_not_asked_again_on_every_token(tmp_path: Any, client_key: ClientKey) -> None:
    calls: list[str] = []

    def fetch(url: str) -> Any:
        calls.append(url)
        if len(calls) > 1:
            raise ValueError("down")
        return client_key.jwks

    store, verifier = stale_verifier(tmp_path, fetch)
    for _ in range(5):
        assert verifier.verify(f"Bearer {client_key.token('a')}", "a")["iss"] == TEST_ISS
    verifier._sets[TEST_ISS].tried_at -= 11  # 11 s later: one more try, which fails; the set held still serves
    for _ in range(5):
        assert verifier.verify(f"Bearer {client_key.token('a')}", "a")["iss"] == TEST_ISS
    store.dispose()
    assert len(calls) == 2


# --- 3. slow EHRs never take every thread -------------------------------------------------------------------------
def test_a_call_finding_no_ehr_slot_is_answered_without_waiting(
    make_app: Callable[..., Flask], servers: list[RawServer]
) -> None:
    ehr = raw_server(servers, hold)
    app = make_app(threads=2, fhir_total_timeout=30.0, fhir_read_timeout=30.0)  # one call may wait on the EHR
    body = hook_request([med_order()], omit=QUERIED, fhir_server=ehr.base)
    first = threading.Thread(target=lambda: post_hook(app.test_client(), body), daemon=True)
    first.start()
    assert _until(lambda: ehr.connections == len(QUERIED)), ehr.connections  # both reads of the first call wait
    second = post_hook(app.test_client(), hook_request([med_order()], omit=QUERIED, fhir_server=ehr.base))
    assert any("too many calls are waiting on EHR servers" in r for r in reasons(second)), reasons(second)
    assert ehr.connections == len(QUERIED), "the second call must not have queried"
    prefetched = post_hook(app.test_client(), hook_request([med_order()], conditions=[]))
    assert prefetched.status_code == 200
    assert first.is_alive(), "the first call should still be waiting on the EHR"


def _until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.e2e
def test_over_http_dripping_ehrs_do_not_starve_prefetched_calls(
    tmp_path: Any, client_key: ClientKey, servers: list[RawServer]
) -> None:
    """The tester's case: as many dripping calls as there are threads, then a call with its whole prefetch."""
    ehr = raw_server(servers, drip(True))
    server = Server(tmp_path, client_key, workers=1, threads=4, ehr_calls=2, fhir_total_timeout=60.0)
    url = f"{server.base}/cds-services/order-sign"

    def post(body: dict[str, Any]) -> requests.Response:
        return requests.post(url, json=body, timeout=90, headers={"Authorization": f"Bearer {client_key.token(url)}"})

    def slow_call() -> None:
        try:
            post(hook_request([med_order()], omit=QUERIED, fhir_server=ehr.base))
        except requests.RequestException:
            pass

    try:
        slow = [threading.Thread(target=slow_call, daemon=True) for _ in range(4)]
        for t in slow:
            t.start()
        assert _until(lambda: ehr.connections >= 2, 10.0), "two calls should be reading the dripping EHR"
        resp = post(hook_request([med_order()], conditions=[]))
        dripping = sum(t.is_alive() for t in slow)
    finally:
        ehr.close()  # the dripping answers end, so the server stops at once
        server.stop()
    assert resp.status_code == 200, resp.text
    assert dripping >= 1, "some calls should still be held by the dripping EHR"
    assert ehr.finished == 0


# --- 4. next links stay on the FHIR server ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url,same",
    [
        ("https://ehr.example/fhir/Condition?page=2", True),
        ("https://ehr.example:443/fhir/Condition", True),
        ("https://EHR.example/fhir/x", True),
        ("https://ehr.example/fhirEVIL/Condition", False),
        ("https://ehr.example.attacker.net/fhir/Condition", False),
        ("http://ehr.example/fhir/Condition", False),
        ("https://ehr.example:8443/fhir/Condition", False),
        ("https://ehr.example/other", False),
        ("https://ehr.example/fhir/../admin", False),
        ("https://ehr.example/fhir/%2e%2e/admin", False),
        ("https://user@ehr.example/fhir/Condition", False),
        ("ftp://ehr.example/fhir/Condition", False),
    ],
)
def test_same_server_compares_scheme_host_port_and_path_segments(url: str, same: bool) -> None:
    assert same_server("https://ehr.example/fhir", url) is same


def test_next_links_away_from_the_server_do_not_receive_the_token(servers: list[RawServer]) -> None:
    elsewhere = raw_server(servers, lambda conn, server: conn.sendall(_answer(bundle())))
    for target in ("/fhirEVIL/Condition?page=2", elsewhere.base + "/Condition?page=2"):

        def paged(conn: socket.socket, server: RawServer, target: str = target) -> None:
            link = target if target.startswith("http") else server.base.removesuffix("/fhir") + target
            conn.sendall(_answer({**bundle(), "link": [{"relation": "next", "url": link}]}))

        ehr = raw_server(servers, paged)
        client = FhirClient(
            ehr.base, "ehr-token-123", connect_timeout=1, read_timeout=2, budget_seconds=5, max_bytes=10**6
        )
        with pytest.raises(FhirReadError, match="away from the FHIR server"):
            client.search("Condition?patient=pat-1")
        client.close()
        assert ehr.paths == ["/fhir/Condition?patient=pat-1"], "the link was followed"
    assert elsewhere.connections == 0


# --- 5. which FHIR servers, and how large an answer ------------------------------------------------------------------
def test_allowlist_patterns() -> None:
    assert allowed("http://127.0.0.1:5555/fhir", ["http://127.0.0.1:*"])
    assert not allowed("http://127.0.0.2:5555/fhir", ["http://127.0.0.1:*"])
    assert allowed("https://ehr.example.org/r4/fhir", ["https://ehr.example.org"])
    assert not allowed("https://ehr.example.org.evil.net/fhir", ["https://ehr.example.org"])
    assert not allowed("http://169.254.169.254/latest", ["https://ehr.example.org"])
    assert origin_of("https://ehr.example.org/cds-client") == "https://ehr.example.org:443"
    assert origin_of("urn:cds:demo-client") is None


@pytest.fixture
def ehr() -> Iterator[FakeEHR]:
    with FakeEHR() as server:
        server.add(*ehr_chart())
        yield server


def signed(client: FlaskClient, key: ClientKey, body: dict[str, Any]) -> Any:
    return post_hook(client, body, headers={"Authorization": f"Bearer {key.token(URL)}"})


def test_a_fhir_server_outside_the_clients_origin_is_not_queried(
    make_app: Callable[..., Flask], client_key: ClientKey, ehr: FakeEHR
) -> None:
    client = make_app(auth_required=True).test_client()  # the client's iss is https://ehr.test: its origin only
    resp = signed(client, client_key, hook_request([med_order()], omit=QUERIED, fhir_server=ehr.base))
    assert resp.status_code == 412
    assert "fhir_servers" in resp.get_json()["issue"][0]["details"]["text"]
    assert ehr.requests == [], "nothing may be sent to a server the client may not name"


def test_a_configured_fhir_server_is_queried(
    make_app: Callable[..., Flask], client_key: ClientKey, ehr: FakeEHR
) -> None:
    clients = [{"iss": TEST_ISS, "jwks": client_key.jwks, "fhir_servers": [ehr.base]}]
    client = make_app(auth_required=True, clients=clients).test_client()
    resp = signed(client, client_key, hook_request([med_order()], omit=QUERIED, fhir_server=ehr.base))
    assert resp.status_code == 200 and ehr.requests


def test_without_authentication_only_the_configured_servers_are_queried(
    make_app: Callable[..., Flask], ehr: FakeEHR
) -> None:
    client = make_app(fhir_servers=["https://ehr.example.org"]).test_client()
    resp = post_hook(client, hook_request([med_order()], omit=QUERIED, fhir_server=ehr.base))
    assert resp.status_code == 412 and ehr.requests == []


def test_a_bad_fhir_servers_setting_stops_the_service(make_app: Callable[..., Flask]) -> None:
    from cds.errors import ConfigError

    with pytest.raises(ConfigError, match="fhir_servers"):
        make_app(fhir_servers=["ehr.example.org"])


def test_an_answer_larger_than_the_cap_fails_that_read(
    make_app: Callable[..., Flask], servers: list[RawServer]
) -> None:
    big = {"resourceType": "Bundle", "type": "searchset", "entry": [], "padding": "x" * 300_000}

    def chunked(conn: socket.socket, server: RawServer) -> None:  # no Content-Length: the cap applies as bytes arrive
        data = json.dumps(big).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(data), 8192):
            part = data[i : i + 8192]
            conn.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.sendall(b"0\r\n\r\n")

    client = make_app(fhir_max_response_bytes=100_000).test_client()
    for handler in (chunked, lambda conn, server: conn.sendall(_answer(big))):
        ehr = raw_server(servers, handler)
        resp = post_hook(client, hook_request([med_order()], omit=QUERIED, fhir_server=ehr.base))
        assert any("larger than 100000 bytes" in r for r in reasons(resp)), reasons(resp)


# --- also seen: junk the EHR returns is the EHR's, not the client's -----------------------------------------------
def test_an_invalid_coverage_from_the_ehr_is_412(make_app: Callable[..., Flask]) -> None:
    with FakeEHR() as ehr:
        ehr.add(patient(), coverage(period={"start": "not a date"}))
        client = make_app().test_client()
        resp = post_hook(client, hook_request([med_order()], omit=("coverage",), fhir_server=ehr.base))
    assert resp.status_code == 412
    assert "read from the EHR" in resp.get_json()["issue"][0]["details"]["text"]


def test_an_invalid_coverage_in_the_prefetch_is_400(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    resp = post_hook(client, hook_request([med_order()], the_coverage=coverage(period={"start": "not a date"})))
    assert resp.status_code == 400
    assert resp.get_json()["issue"][0]["expression"][0].startswith("prefetch.coverage")
