"""Hostile requests to `cds serve` over real HTTP: what gunicorn refuses before the app sees it is answered in the
service's own shape (a JSON OperationOutcome, not gunicorn's HTML), and no response names the server software."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ClientKey
from test_e2e import Server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("hardening"), client_key)
    yield s
    s.stop()


def exchange(server: Server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (every request here asks the server to close), split it up."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(target: str, *extra_headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in ("Host: 127.0.0.1", "Connection: close", *extra_headers))
    return f"GET {target} HTTP/1.1\r\n{head}\r\n".encode("latin-1")


def outcome(headers: dict[str, str], body: bytes, code: str) -> dict[str, Any]:
    assert headers["content-type"].startswith("application/json"), body[:200]
    assert int(headers["content-length"]) == len(body)
    parsed: dict[str, Any] = json.loads(body)
    assert parsed["resourceType"] == "OperationOutcome"
    assert parsed["issue"][0]["code"] == code
    assert "server" not in headers
    return parsed


def test_a_5000_character_url_is_414_as_an_operation_outcome(server: Server) -> None:
    status, headers, body = exchange(server, get("/cds-services/" + "a" * 5_000))
    assert status == 414
    text = outcome(headers, body, "too-long")["issue"][0]["details"]["text"]
    assert "4094 bytes" in text and "aaaa" not in text


def test_a_url_just_under_gunicorns_limit_is_414_from_the_app_in_the_same_shape(server: Server) -> None:
    status, headers, body = exchange(server, get("/cds-services/" + "a" * 4_020))
    assert status == 414
    assert "at most 4000" in outcome(headers, body, "too-long")["issue"][0]["details"]["text"]


def test_too_many_headers_is_431_as_an_operation_outcome(server: Server) -> None:
    status, headers, body = exchange(server, get("/cds-services", *(f"X-H{i}: v" for i in range(150))))
    assert status == 431
    outcome(headers, body, "too-long")


def test_a_request_that_is_not_http_is_400_as_an_operation_outcome(server: Server) -> None:
    status, headers, body = exchange(server, get("/cds-services", "this line has no colon"))
    assert status == 400
    outcome(headers, body, "invalid")


def test_no_response_names_the_server_software(server: Server) -> None:
    ok = requests.get(f"{server.base}/cds-services", timeout=5)
    assert ok.status_code == 200
    missing = requests.get(f"{server.base}/nothing", timeout=5)
    assert missing.status_code == 404
    for resp in (ok, missing):
        assert "Server" not in resp.headers, resp.headers


def test_nested_json_over_http_is_400(server: Server, client_key: ClientKey) -> None:
    url = f"{server.base}/cds-services/order-sign"
    resp = requests.post(
        url,
        data="[" * 10_000 + "]" * 10_000,
        headers={"Authorization": f"Bearer {client_key.token(url)}", "Content-Type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["issue"][0]["code"] == "structure"


def test_what_gunicorn_refuses_is_logged_escaped_and_bounded(server: Server) -> None:
    name = "Bad\x1b[2J" + "n" * 7_000
    status, _, _ = exchange(server, get("/cds-services", f"{name}: v"))
    assert status == 400
    log = Path(server.log.name)
    deadline = time.monotonic() + 10
    while b"Invalid request" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in log.read_bytes().splitlines() if b"Invalid request" in line]
    assert lines
    for line in lines:
        assert len(line) < 400 and b"\x1b" not in line


def post_head(target: str, *extra_headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in ("Host: 127.0.0.1", "Connection: close", *extra_headers))
    return f"POST {target} HTTP/1.1\r\n{head}\r\n".encode("latin-1")


def exchange_early(server: Server, head: bytes, body_parts: Iterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    """Send ``head``, then the body part by part until the server answers (it may answer and close before the body
    is all sent, which is the point), then read the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(head)
        for part in body_parts:
            if select.select([conn], [], [], 0)[0]:
                break  # an answer is waiting: stop sending
            try:
                conn.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_a_body_declared_over_the_limit_is_413_before_it_is_sent(server: Server, client_key: ClientKey) -> None:
    """Content-Length over max_request_bytes (5 MB): refused on the headers alone, the body never read."""
    token = client_key.token(f"{server.base}/cds-services/order-sign")
    head = post_head(
        "/cds-services/order-sign",
        "Content-Type: application/json",
        "Content-Length: 50000000",
        f"Authorization: Bearer {token}",
    )
    status, headers, body = exchange_early(server, head, iter(()))
    assert status == 413
    assert "5000000" in outcome(headers, body, "too-long")["issue"][0]["details"]["text"]


def test_a_chunked_body_over_the_limit_is_413(server: Server, client_key: ClientKey) -> None:
    """No Content-Length to refuse early: the body is read up to the limit and no further."""
    token = client_key.token(f"{server.base}/cds-services/order-sign")
    head = post_head(
        "/cds-services/order-sign",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
        f"Authorization: Bearer {token}",
    )
    chunk = b"[" * 65_536
    parts = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(200))  # 13 MB if the server never stopped
    status, headers, body = exchange_early(server, head, parts)
    assert status == 413, body
    outcome(headers, body, "too-long")


def test_a_chunked_body_within_the_limit_is_read_whole(server: Server, client_key: ClientKey) -> None:
    from builders import hook_request, med_order

    token = client_key.token(f"{server.base}/cds-services/order-sign")
    body = json.dumps(hook_request([med_order()])).encode()
    head = post_head(
        "/cds-services/order-sign",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
        f"Authorization: Bearer {token}",
    )
    parts = (b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:100], body[100:], b""))
    status, _, answer = exchange_early(server, head, parts)
    assert status == 200, answer[:300]
    assert json.loads(answer)["systemActions"]
