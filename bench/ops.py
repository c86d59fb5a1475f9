"""Load test of the operational routes over real HTTP against `cds serve`, beside a trivial JSON echo route.

What a load balancer, Prometheus and SMART clients call: `GET /healthz` (no I/O), `GET /readyz` (a store query and
the migration version), `GET /metrics` (every worker's counts merged, plus the store's COUNT queries),
`GET /openapi.json` (the description rebuilt from the route registry) and `POST /auth/token` (an ES384 client
assertion verified, its jti stored, the rate limits counted in the store, an access token signed; every request with
its own assertion, the per-client limit off for the run).

Usage: python bench/ops.py [--rate 100] [--seconds 10]
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import jwt
from dtr import ISS
from harness import Target, arguments, client_key, closed_loop, config_file, free_port, open_loop, serve, table

ROOT = Path(__file__).resolve().parent.parent
FORM = "application/x-www-form-urlencoded"


def token_forms(key: object, base: str, count: int) -> list[bytes]:
    """``count`` token requests, each with its own client assertion (a jti is accepted once)."""
    now = int(time.time())
    forms = []
    for _ in range(count):
        claims = {"iss": ISS, "sub": ISS, "aud": f"{base}/auth/token", "exp": now + 280, "jti": secrets.token_hex(16)}
        assertion = jwt.encode(claims, key, algorithm="ES384", headers={"kid": "bench"})  # type: ignore[arg-type]
        forms.append(
            urllib.parse.urlencode(
                {
                    "grant_type": "client_credentials",
                    "scope": "system/Questionnaire.rs",
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    "client_assertion": assertion,
                }
            ).encode()
        )
    return forms


def main() -> int:
    args = arguments(__doc__, connections=8).parse_args()

    key, jwk = client_key()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        extra = "token_requests_per_minute = 0\ntoken_refusals_per_minute = 0\n"
        config = config_file(tmp, workers=args.workers, threads=args.threads, iss=ISS, jwk=jwk, extra=extra)
        server = serve(ROOT, config, port)
        try:
            echo = Target("echo", "/_echo", b'{"ping":1}', None)
            gets = [
                Target(name, path, b"", None, method="GET")
                for name, path in (
                    ("healthz", "/healthz"),
                    ("readyz", "/readyz"),
                    ("metrics", "/metrics"),
                    ("openapi.json", "/openapi.json"),
                )
            ]
            n = int(args.rate * args.seconds)
            rows = []
            load = f"open {args.rate:g}/s"
            for target in (echo, *gets):
                open_loop(port, target, args.rate, 1.0)  # warm up
                rows.append((target.name, load, open_loop(port, target, args.rate, args.seconds)))
            token = Target("auth/token", "/auth/token", b"", None, bodies=token_forms(key, base, n), content_type=FORM)
            rows.append((token.name, load, open_loop(port, token, args.rate, args.seconds)))
            closed = f"closed {args.connections} conn"
            for target in (echo, *gets):
                rows.append((target.name, closed, closed_loop(port, target, args.connections, 5.0)))
        finally:
            server.terminate()
            server.wait(timeout=15)
    print(f"\n{args.workers} workers x {args.threads} threads, SQLite, {os.cpu_count()} cores shared with the load\n")
    table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
