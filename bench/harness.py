"""What the benchmarks share: a free port, keep-alive POSTs, open- and closed-loop load, percentiles, a table.

Open loop: requests sent at a fixed rate, latency counted from each request's scheduled send time, so a stalled
server cannot hide its queue (no coordinated omission). Closed loop: N connections back to back (throughput).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Target:
    """One route under load: a fixed body (or one per request from ``bodies``), a fixed path (or one per request from
    ``paths``), a fresh bearer token per request from ``tokens`` (or one ``bearer`` for all, or none), and any
    ``extra_headers`` (a session cookie, a CSRF token)."""

    def __init__(
        self,
        name: str,
        path: str,
        body: bytes,
        tokens: list[str] | None,
        *,
        bearer: str | None = None,
        bodies: list[bytes] | None = None,
        content_type: str = "application/json",
        ok: tuple[int, ...] = (200,),
        method: str = "POST",
        paths: list[str] | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        self.name, self.path, self.body, self.tokens = name, path, body, tokens
        self.bearer, self.bodies, self.content_type, self.ok = bearer, bodies, content_type, ok
        self.method, self.paths, self.extra_headers = method, paths, extra_headers or {}
        self._lock = threading.Lock()

    def next_path(self) -> str:
        if self.paths is None:
            return self.path
        with self._lock:
            return self.paths.pop()

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": self.content_type, "Connection": "keep-alive", **self.extra_headers}
        if self.tokens is not None:
            with self._lock:
                h["Authorization"] = f"Bearer {self.tokens.pop()}"
        elif self.bearer is not None:
            h["Authorization"] = f"Bearer {self.bearer}"
        return h

    def next_body(self) -> bytes:
        if self.bodies is None:
            return self.body
        with self._lock:
            return self.bodies.pop()


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def send(conn: http.client.HTTPConnection, port: int, target: Target) -> tuple[http.client.HTTPConnection, int]:
    """Send the target's request (a POST unless it says otherwise); a broken connection is replaced and the request
    counts as an error (status 0)."""
    try:
        body = target.next_body() if target.method in ("POST", "PUT") else None
        conn.request(target.method, target.next_path(), body=body, headers=target.headers())
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
                if status not in target.ok:
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
                if status not in target.ok:
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


def client_key(kid: str = "bench") -> tuple[Any, dict[str, Any]]:
    """The bench client's ES384 signing key and its public JWK (for ``[[clients]]``)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "alg": "ES384", "use": "sig"})
    return key, jwk


def config_file(tmp: str, *, workers: int, threads: int, iss: str, jwk: dict[str, Any], extra: str = "") -> Path:
    """A `cds serve` configuration for a benchmark: its own data directory, the echo route on, quiet logs, no demo
    client, the bench client trusted; ``extra`` is more TOML (top-level keys first, then tables)."""
    config = Path(tmp) / "bench.toml"
    config.write_text(
        f'data_dir = "{tmp}/data"\nworkers = {workers}\nthreads = {threads}\n'
        f'bench_echo = true\nlog_level = "WARNING"\ndemo_client = false\n{extra}'
        f"[[clients]]\niss = \"{iss}\"\njwks = '{json.dumps({'keys': [jwk]})}'\n"
    )
    return config


def serve(root: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    """`cds serve` on ``port`` with the TOML file ``config``, started as in production (gunicorn), and up."""
    env = {**os.environ, "CDS_CONFIG": str(config), "CDS_PORT": str(port)}
    server = subprocess.Popen(
        [sys.executable, "-m", "cds.cli", "serve"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(port)
    except BaseException:
        server.terminate()
        raise
    return server


def wait_until_up(port: int, path: str = "/cds-services", seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("cds serve did not start")
        time.sleep(0.2)


def table(rows: list[tuple[str, str, dict[str, float]]]) -> None:
    print(
        f"{'route':<14} {'load':<17} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7}"
    )
    for name, load, r in rows:
        print(
            f"{name:<14} {load:<17} {r['n']:>8.0f} {r['errors']:>6.0f} {r['rps']:>7.0f} {r['p50']:>7.2f} "
            f"{r['p95']:>7.2f} {r['p99']:>7.2f} {r['max']:>7.1f}"
        )


def arguments(
    doc: str | None, *, rate: float = 100.0, seconds: float = 10.0, connections: int | None = 4
) -> argparse.ArgumentParser:
    """The options every benchmark takes (its first doc line as description): open-loop ``--rate`` and
    ``--seconds``, closed-loop ``--connections`` (None: the benchmark has no closed loop), the server's ``--workers``
    and ``--threads``. A benchmark adds its own before ``parse_args``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=rate, help=f"open-loop requests per second (default {rate:g})")
    parser.add_argument("--seconds", type=float, default=seconds, help=f"length of each run (default {seconds:g})")
    if connections is not None:
        parser.add_argument(
            "--connections", type=int, default=connections, help=f"closed-loop connections (default {connections})"
        )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2, one per core)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker (default 8, as cds serve)")
    return parser
