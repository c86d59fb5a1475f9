"""A subscriber's rest-hook endpoint for the notification tests: records every POST (headers and JSON body) over
real HTTP, and can be told to fail the next few requests or to be slow. Also a fake PAS response Bundle."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cds.pas import notify


class Receiver:
    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], Any, float]] = []  # (headers, body, monotonic time) of 2xx answers
        self.attempts: list[float] = []  # every request's monotonic time
        self.fail_next = 0  # answer 500 to this many requests
        self.delay = 0.0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.attempts.append(time.monotonic())
                    failing = receiver.fail_next > 0
                    if failing:
                        receiver.fail_next -= 1
                if receiver.delay:
                    time.sleep(receiver.delay)
                if failing:
                    self._send(500)
                    return
                with receiver.lock:
                    receiver.received.append((dict(self.headers.items()), json.loads(body), time.monotonic()))
                self._send(200)

            def _send(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def bodies(self) -> list[Any]:
        with self.lock:
            return [body for _, body, _ in self.received]

    def wait_for(self, count: int, seconds: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if len(self.received) >= count:
                return self.bodies()
            time.sleep(0.02)
        raise AssertionError(f"{len(self.received)} notifications received, {count} expected")

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def subscription(endpoint: str, org: str = "8189991234", **channel: Any) -> dict[str, Any]:
    """A PAS Subscription like the IG's example (Inferno's fixture), to ``endpoint``."""
    return {
        "resourceType": "Subscription",
        "meta": {"profile": [notify.BACKPORT_SUBSCRIPTION_PROFILE, notify.PAS_SUBSCRIPTION_PROFILE]},
        "status": "requested",
        "reason": "Prior Authorization Update Notification Subscription",
        "criteria": notify.PAS_TOPIC,
        "_criteria": {"extension": [{"url": notify.FILTER_CRITERIA_URL, "valueString": f"org-identifier={org}"}]},
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": notify.PAYLOAD_CONTENT_URL, "valueCode": "full-resource"}]},
            **channel,
        },
    }


def pas_response(n: int = 1) -> dict[str, Any]:
    """A fake PAS response Bundle: a collection, the ClaimResponse first, what it references after."""
    return {
        "resourceType": "Bundle",
        "id": f"resp-{n}",
        "meta": {"profile": [notify.PAS_RESPONSE_BUNDLE_PROFILE]},
        "identifier": {"system": "urn:test:bundle", "value": f"resp-{n}"},
        "type": "collection",
        "timestamp": "2026-11-23T15:00:00Z",
        "entry": [
            {
                "fullUrl": f"http://cds.test/fhir/ClaimResponse/cr-{n}",
                "resource": {
                    "resourceType": "ClaimResponse",
                    "id": f"cr-{n}",
                    "status": "active",
                    "use": "preauthorization",
                    "outcome": "complete",
                    "patient": {"reference": "Patient/p1"},
                },
            },
            {"fullUrl": "http://cds.test/fhir/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"}},
        ],
    }
