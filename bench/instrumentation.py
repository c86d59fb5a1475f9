"""What the instrumentation costs: Prometheus metrics and the JSON request log on vs off, in the same run.

Starts `cds serve` again and again, one after the other on the same machine (gunicorn workers, SQLite, JWT
verification on), in rounds: first with ``metrics = false`` and ``request_log = false``, then with both on
(``log_format = "json"``, the server's stdout and stderr written to a file, as a log shipper would read them).
Against each it measures the echo route (``bench_echo``: the cost of a request on this server, where the
instrumentation's share is largest) and order-sign with full prefetch (a fresh ES384 token per call), open loop at a
fixed rate and closed loop, and prints both side by side with the difference (medians of the rounds: the machine
is shared, with the load generator at least). Then, in one process each (the Flask test client, no HTTP), the CPU
time per echo request with the instrumentation off and on, metrics in multiprocess mode as under gunicorn: the
steadiest figure of the cost.

Usage: python bench/instrumentation.py [--rate 150] [--sign-rate 40] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from harness import Target, arguments, client_key, closed_loop, config_file, free_port, open_loop, wait_until_up
from order_sign import ISS, REQUEST, mint

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "off": "metrics = false\nrequest_log = false\n",
    "on": 'metrics = true\nrequest_log = true\nlog_format = "json"\n',
}
COLUMNS = ("rps", "p50", "p95", "p99")

IN_PROCESS = """
import json, os, sys, tempfile, time
from cds import create_app
mode, n = sys.argv[1], int(sys.argv[2])
app = create_app({"data_dir": tempfile.mkdtemp(), "bench_echo": True, "auth_required": False, "demo_client": False,
                  "metrics": mode == "on", "request_log": mode == "on", "log_level": "WARNING"})
client = app.test_client()
body = json.dumps({"resourceType": "Parameters"})
for _ in range(300):
    client.post("/_echo", data=body, content_type="application/json")
began = time.process_time()
for _ in range(n):
    client.post("/_echo", data=body, content_type="application/json")
print((time.process_time() - began) / n * 1e6)
"""


def run_server(mode: str, tmp: Path, args: argparse.Namespace, body: bytes) -> dict[tuple[str, str], Any]:
    key, jwk = client_key()
    port = free_port()
    where = tmp / mode
    where.mkdir(parents=True)
    config = config_file(str(where), workers=args.workers, threads=args.threads, iss=ISS, jwk=jwk, extra=MODES[mode])
    log_path = where / "server.log"
    env = {**os.environ, "CDS_CONFIG": str(config), "CDS_PORT": str(port)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cds.cli", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_until_up(port)
            aud = f"http://127.0.0.1:{port}/cds-services/order-sign"
            count = int(args.sign_rate * args.seconds + 400 * args.seconds + 400)
            print(f"[{mode}] minting {count} tokens ...", flush=True)
            sign = Target("order-sign", "/cds-services/order-sign", body, mint(key, aud, count))
            echo = Target("echo", "/_echo", body, None)
            closed_loop(port, sign, 2, 2)  # warm up both routes
            closed_loop(port, echo, 2, 2)
            out: dict[tuple[str, str], Any] = {}
            for target, rate in ((echo, args.rate), (sign, args.sign_rate)):
                print(f"[{mode}] {target.name} ...", flush=True)
                out[(target.name, f"open {rate:g}/s")] = open_loop(port, target, rate, args.seconds)
                out[(target.name, f"closed {args.connections} conn")] = closed_loop(
                    port, target, args.connections, args.seconds
                )
            out[("scrape", "")] = _scrape(port) if mode == "on" else None
        finally:
            server.terminate()
            server.wait(timeout=15)
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    out[("log", "")] = {
        "request_lines": sum(1 for x in lines if x.get("logger") == "cds.request"),
        "bytes": log_path.stat().st_size,
    }
    return out


def _median(found: list[dict[tuple[str, str], Any]]) -> dict[tuple[str, str], Any]:
    """Each figure's median over the rounds (the scrape and the log: the last round's)."""
    out: dict[tuple[str, str], Any] = {}
    for key, last in found[-1].items():
        if key[0] in ("scrape", "log"):
            out[key] = last
        else:
            out[key] = {col: statistics.median(r[key][col] for r in found) for col in last}
    return out


def _scrape(port: int) -> dict[str, float]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    began = time.perf_counter()
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    took = (time.perf_counter() - began) * 1000
    total = 0.0
    for line in text.splitlines():
        if line.startswith("cds_http_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return {"status": resp.status, "ms": took, "bytes": len(text), "requests_counted": total}


def in_process(mode: str, n: int, tmp: Path) -> float:
    """CPU microseconds per echo request in one process (metrics in multiprocess mode, as under gunicorn)."""
    env = {**os.environ}
    if mode == "on":
        multiproc = tmp / f"mp-{uuid.uuid4().hex[:6]}"
        multiproc.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
    log = (tmp / f"inprocess-{mode}.log").open("wb")
    with log:
        done = subprocess.run(
            [sys.executable, "-c", IN_PROCESS, mode, str(n)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            check=True,
        )
    return float(done.stdout.decode().strip().splitlines()[-1])


def main() -> int:
    parser = arguments(__doc__, rate=150.0, connections=8)  # --rate: the echo route's
    parser.add_argument(
        "--sign-rate", type=float, default=40.0, help="open-loop order-sign calls per second (default 40)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds, medians reported (default 2)")
    parser.add_argument("--requests", type=int, default=3000, help="in-process echo requests per mode (default 3000)")
    args = parser.parse_args()

    request = json.loads(REQUEST.read_text())
    request["hookInstance"] = str(uuid.uuid4())
    body = json.dumps(request).encode()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        runs: dict[str, list[dict[tuple[str, str], Any]]] = {"off": [], "on": []}
        for i in range(args.rounds):  # off, on, off, on: drift on a shared machine hits both alike
            for mode in ("off", "on"):
                runs[mode].append(run_server(mode, tmp / f"round-{i}", args, body))
        results = {mode: _median(found) for mode, found in runs.items()}
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(3):
            for mode in ("off", "on"):
                times[mode].append(in_process(mode, args.requests, tmp))
        cpu = {mode: statistics.median(found) for mode, found in times.items()}

    print(
        f"\nbody {len(body):,} bytes (full prefetch); {args.workers} workers x {args.threads} threads; "
        f"{os.cpu_count()} cores shared with this load generator; {args.rounds} rounds of off then on, "
        f"{args.seconds:g} s per run, medians of the rounds\n"
    )
    print(f"{'route':<11} {'load':<16} {'measure':<8} {'off':>9} {'on':>9} {'on - off':>9} {'change':>8}")
    for (route, load), off in results["off"].items():
        if route in ("scrape", "log"):
            continue
        on = results["on"][(route, load)]
        for col in COLUMNS:
            unit = "req/s" if col == "rps" else f"{col} ms"
            a, b = off[col], on[col]
            change = (b - a) / a * 100 if a else 0.0
            print(f"{route:<11} {load:<16} {unit:<8} {a:>9.2f} {b:>9.2f} {b - a:>+9.2f} {change:>+7.1f}%")
        if off["errors"] or on["errors"]:
            print(f"{route:<11} {load:<16} errors   {off['errors']:>9.0f} {on['errors']:>9.0f}")
    scrape = results["on"][("scrape", "")]
    logged = results["on"][("log", "")]
    sent = sum(int(r["n"]) for (route, _), r in runs["on"][-1].items() if route not in ("scrape", "log"))
    print(
        f"\nin one process, CPU per echo request: off {cpu['off']:.0f} us, on {cpu['on']:.0f} us "
        f"({cpu['on'] - cpu['off']:+.0f} us, metrics in multiprocess mode + one JSON line)"
    )
    per_line = logged["bytes"] / max(1, logged["request_lines"])
    print(
        f"on (last round): {logged['request_lines']} request lines ({per_line:.0f} bytes each) for {sent} measured "
        f"requests plus warm-up; /metrics answered {scrape['status']} in {scrape['ms']:.1f} ms "
        f"({scrape['bytes']:,} bytes), counting {scrape['requests_counted']:.0f} requests"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
