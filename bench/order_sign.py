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

import argparse
import http.client
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from queue import Empty, Queue

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
REQUEST = ROOT / "fixtures" / "requests" / "order-sign-acquired-hemophilia.json"
ISS = "https://bench.invalid/client"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Target:
    def __init__(self, name: str, path: str, body: bytes, tokens: list[str] | None) -> None:
        self.name, self.path, self.body, self.tokens = name, path, body, tokens
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Connection": "keep-alive"}
        if self.tokens is not None:
            with self._lock:
                h["Authorization"] = f"Bearer {self.tokens.pop()}"
        return h


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def send(conn: http.client.HTTPConnection, port: int, target: Target) -> tuple[http.client.HTTPConnection, int]:
    """POST the target; a broken connection is replaced and the request counts as an error (status 0)."""
    try:
        conn.request("POST", target.path, body=target.body, headers=target.headers())
        resp = conn.getresponse()
        resp.read()
        return conn, resp.status
    except (OSError, http.client.HTTPException):
        conn.close()
        return connect(port), 0


def open_loop(port: int, target: Target, rate: float, seconds: float, threads: int = 24) -> dict[str, float]:
    """Send at a fixed rate; latency from the scheduled time to the end of the response."""
    jobs: Queue[float | None] = Queue()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker() -> None:
        conn = connect(port)
        while True:
            try:
                scheduled = jobs.get(timeout=seconds + 30)
            except Empty:
                break
            if scheduled is None:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            conn, status = send(conn, port, target)
            done = time.perf_counter()
            with lock:
                latencies.append(done - scheduled)
                if status != 200:
                    errors[0] += 1
        conn.close()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    start = time.perf_counter() + 0.2
    total = int(rate * seconds)
    for i in range(total):
        jobs.put(start + i / rate)
    for _ in pool:
        jobs.put(None)
    for t in pool:
        t.join()
    return summary(latencies, errors[0], seconds)


def closed_loop(port: int, target: Target, connections: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker() -> None:
        conn = connect(port)
        while time.perf_counter() < stop:
            began = time.perf_counter()
            conn, status = send(conn, port, target)
            with lock:
                latencies.append(time.perf_counter() - began)
                if status != 200:
                    errors[0] += 1
        conn.close()

    began = time.perf_counter()
    pool = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return summary(latencies, errors[0], time.perf_counter() - began)


def summary(latencies: list[float], errors: int, seconds: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {
        "n": len(ms),
        "errors": errors,
        "rps": len(ms) / seconds,
        "p50": q[49],
        "p95": q[94],
        "p99": q[98],
        "max": ms[-1],
    }


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second (default 200)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run (default 20)")
    parser.add_argument("--connections", type=int, default=8, help="closed-loop connections (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2, one per core)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker (default 8, as cds serve)")
    parser.add_argument(
        "--only", nargs="*", help="load only these policy folders (to show the cost is flat in their number)"
    )
    args = parser.parse_args()

    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "bench", "alg": "ES384", "use": "sig"})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        only = ""
        if args.only:  # a policy directory with just these folders, and the Cigna payer naming them
            for name in args.only:
                shutil.copytree(ROOT / "policies" / name, Path(tmp) / "policies" / name)
            only = (
                f'policy_dir = "{tmp}/policies"\n[[payers]]\nid = "cigna"\nname = "Cigna Healthcare"\n'
                f'identifier_system = "urn:cds:payer-id"\nidentifier_value = "cigna"\n'
                f"policies = {json.dumps([n for n in args.only if n.startswith('cigna')])}\n"
            )
        config.write_text(
            f'data_dir = "{tmp}/data"\nworkers = {args.workers}\nthreads = {args.threads}\n'
            f'bench_echo = true\nlog_level = "WARNING"\ndemo_client = false\n{only}'
            f"[[clients]]\niss = \"{ISS}\"\njwks = '{json.dumps({'keys': [jwk]})}'\n"
        )
        env = {**os.environ, "CDS_CONFIG": str(config), "CDS_PORT": str(port)}
        server = subprocess.Popen(
            [sys.executable, "-m", "cds.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                    conn.request("GET", "/cds-services")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("cds serve did not start") from None
                    time.sleep(0.2)
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
    print(
        f"{'route':<11} {'load':<17} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7}"
    )
    for name, load, r in rows:
        print(
            f"{name:<11} {load:<17} {r['n']:>8.0f} {r['errors']:>6.0f} {r['rps']:>7.0f} {r['p50']:>7.2f} "
            f"{r['p95']:>7.2f} {r['p99']:>7.2f} {r['max']:>7.1f}"
        )
    by = {(n, load.split()[0]): r for n, load, r in rows}
    print(
        f"\nratio order-sign / echo: p50 {by[('order-sign', 'open')]['p50'] / by[('echo', 'open')]['p50']:.1f}x, "
        f"throughput {by[('order-sign', 'closed')]['rps'] / by[('echo', 'closed')]['rps']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
