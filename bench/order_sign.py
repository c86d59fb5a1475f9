"""Load test: order-sign with full prefetch over real HTTP against `cds serve`, beside a trivial JSON echo route.

Starts the server as `cds serve` does (gunicorn workers, SQLite store, JWT verification on), drives it from this
process with keep-alive connections, and prints latency percentiles and throughput:

- open loop at a fixed rate (default 200 requests/s): latency counted from each request's scheduled send time, so a
  stalled server cannot hide its queue (no coordinated omission);
- closed loop with N connections (default 8): the sustained throughput.

Every order-sign call carries a fresh ES384 token (minted before the run), so the JWT check, the jti replay check and
the audit write all happen as in production. Usage: python bench/order_sign.py [--rate 200] [--seconds 20]
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from harness import Target, arguments, client_key, closed_loop, config_file, free_port, open_loop, serve, table

ROOT = Path(__file__).resolve().parent.parent
REQUEST = ROOT / "fixtures" / "requests" / "order-sign-acquired-hemophilia.json"
ISS = "https://bench.invalid/client"


def mint(key: ec.EllipticCurvePrivateKey, aud: str, count: int) -> list[str]:
    now = int(time.time())
    return [
        jwt.encode(
            {"iss": ISS, "aud": aud, "exp": now + 3600, "iat": now, "jti": secrets.token_hex(32)},
            key,
            algorithm="ES384",
            headers={"kid": "bench", "typ": "JWT"},
        )
        for _ in range(count)
    ]


def main() -> int:
    parser = arguments(__doc__, rate=200.0, seconds=20.0, connections=8)
    parser.add_argument(
        "--only", nargs="*", help="load only these policy folders (to show the cost is flat in their number)"
    )
    args = parser.parse_args()

    key, jwk = client_key()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        only = ""
        if args.only:  # a policy directory with just these folders, and the Cigna payer naming them
            for name in args.only:
                shutil.copytree(ROOT / "policies" / name, Path(tmp) / "policies" / name)
            only = (
                f'policy_dir = "{tmp}/policies"\n[[payers]]\nid = "cigna"\nname = "Cigna Healthcare"\n'
                f'identifier_system = "urn:cds:payer-id"\nidentifier_value = "cigna"\n'
                f"policies = {json.dumps([n for n in args.only if n.startswith('cigna')])}\n"
            )
        config = config_file(tmp, workers=args.workers, threads=args.threads, iss=ISS, jwk=jwk, extra=only)
        server = serve(ROOT, config, port)
        try:
            request = json.loads(REQUEST.read_text())
            request["hookInstance"] = str(uuid.uuid4())
            body = json.dumps(request).encode()
            aud = f"{base}/cds-services/order-sign"
            expected_closed = int(args.seconds * 1500)
            print(f"minting {int(args.rate * args.seconds) + expected_closed + 500} tokens ...", flush=True)
            tokens = mint(key, aud, int(args.rate * args.seconds) + expected_closed + 500)
            sign = Target("order-sign", "/cds-services/order-sign", body, tokens)
            echo = Target("echo", "/_echo", body, None)
            # warm up both routes
            closed_loop(port, sign, 2, 2)
            closed_loop(port, echo, 2, 2)
            rows = []
            for target in (echo, sign):
                rows.append((target.name, f"open {args.rate:g}/s", open_loop(port, target, args.rate, args.seconds)))
                rows.append(
                    (
                        target.name,
                        f"closed {args.connections} conn",
                        closed_loop(port, target, args.connections, args.seconds),
                    )
                )
        finally:
            server.terminate()
            server.wait(timeout=15)
    print(
        f"\nbody {len(body):,} bytes (full prefetch); {args.workers} workers x {args.threads} threads; "
        f"{os.cpu_count()} cores shared with this load generator\n"
    )
    table(rows)
    by = {(n, load.split()[0]): r for n, load, r in rows}
    print(
        f"\nratio order-sign / echo: p50 {by[('order-sign', 'open')]['p50'] / by[('echo', 'open')]['p50']:.1f}x, "
        f"throughput {by[('order-sign', 'closed')]['rps'] / by[('echo', 'closed')]['rps']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
