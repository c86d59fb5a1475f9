"""End to end over real HTTP: `cds serve` (gunicorn, several workers) in its own process, a small FHIR server
standing in for the EHR, and a CDS client signing its calls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from builders import condition, coverage_info, ehr_chart, hook_request, med_order, role
from conftest import TEST_ISS, ClientKey
from fake_ehr import FakeEHR

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, tmp: Path, key: ClientKey, **settings: Any) -> None:
        """``settings`` replace or add top-level settings (numbers, strings, booleans, lists of strings)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = tmp / "cds.toml"
        jwks = json.dumps(key.jwks)
        top = {"data_dir": str(tmp / "data"), "workers": 2, "threads": 2, "log_level": "WARNING", **settings}
        config.write_text(
            "".join(f"{name} = {json.dumps(value)}\n" for name, value in top.items())
            + f'[[clients]]\niss = "{TEST_ISS}"\njwks = \'{jwks}\'\nfhir_servers = ["http://127.0.0.1:*"]\n'
        )
        env = {**os.environ, "CDS_CONFIG": str(config), "CDS_PORT": str(self.port)}
        self.log = (tmp / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cds.cli", "serve"], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base}/cds-services", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"cds serve did not start: {(tmp / 'server.log').read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def ehr() -> Iterator[FakeEHR]:
    with FakeEHR() as server:
        server.add(*ehr_chart())
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("e2e"), client_key)
    yield s
    s.stop()


def call(
    server: Server, key: ClientKey, body: dict[str, Any], service: str = "order-sign", token: str | None = None
) -> requests.Response:
    url = f"{server.base}/cds-services/{service}"
    return requests.post(url, json=body, timeout=10, headers={"Authorization": f"Bearer {token or key.token(url)}"})


def test_discovery_over_http(server: Server) -> None:
    services = requests.get(f"{server.base}/cds-services", timeout=5).json()["services"]
    assert {s["hook"] for s in services} >= {"order-sign", "order-select"}


def test_order_sign_queries_the_ehr_for_what_prefetch_lacks(
    server: Server, client_key: ClientKey, ehr: FakeEHR
) -> None:
    body = hook_request([med_order()], omit=("conditions", "observations"), fhir_server=ehr.base)
    resp = call(server, client_key, body)
    assert resp.status_code == 200, resp.text
    info = coverage_info(resp.json()["systemActions"][0]["resource"])
    assert info["pa-needed"] == ["satisfied"] and info["satisfied-pa-id"][0].startswith("PA-")
    queried = [path for path, auth in ehr.requests if auth == "Bearer ehr-token-123"]
    assert any(p.startswith("/fhir/Condition?patient=pat-1") for p in queried)
    assert any(p.startswith("/fhir/Observation?patient=pat-1") for p in queried)


def test_the_questionnaire_canonical_resolves(server: Server, client_key: ClientKey) -> None:
    body = hook_request([med_order()], conditions=[condition("D68.311")], roles=[role("207RX0202X")])
    resp = call(server, client_key, body)
    canonical = coverage_info(resp.json()["systemActions"][0]["resource"])["questionnaire"][0]
    url, version = canonical.split("|")
    assert url.startswith(server.base)
    got = requests.get(url, timeout=5)
    assert got.status_code == 200 and got.json()["version"] == version
    assert got.headers["Content-Type"].startswith("application/fhir+json")


def test_a_token_is_refused_by_every_worker_once_used(server: Server, client_key: ClientKey) -> None:
    url = f"{server.base}/cds-services/order-sign"
    token = client_key.token(url)
    body = hook_request([med_order()], conditions=[condition("D68.311")])
    assert call(server, client_key, body, token=token).status_code == 200
    for _ in range(4):  # whichever worker answers, the replay is seen (the store is shared)
        assert call(server, client_key, body, token=token).status_code == 401


def test_no_token_is_401(server: Server) -> None:
    resp = requests.post(f"{server.base}/cds-services/order-sign", json=hook_request([med_order()]), timeout=5)
    assert resp.status_code == 401 and resp.json()["resourceType"] == "OperationOutcome"


def test_bad_input_over_http_is_an_operation_outcome(server: Server, client_key: ClientKey) -> None:
    url = f"{server.base}/cds-services/order-sign"
    resp = requests.post(
        url,
        data="{oops",
        timeout=5,
        headers={"Authorization": f"Bearer {client_key.token(url)}", "Content-Type": "application/json"},
    )
    assert resp.status_code == 400 and resp.json()["resourceType"] == "OperationOutcome"


def test_the_policy_page_is_served(server: Server) -> None:
    page = requests.get(f"{server.base}/policies/cigna-ip0356", timeout=5)
    assert page.status_code == 200 and "IP0356-4A.ii" in page.text
