"""A small FHIR server standing in for the EHR: serves resources from memory over real HTTP, records each request
(path and Authorization header), and can be told to be slow or to fail."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class FakeEHR:
    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}  # "Type/id" -> resource
        self.requests: list[tuple[str, str | None]] = []  # (path with query, Authorization header)
        self.delay = 0.0
        self.fail_status: int | None = None
        self.token = "ehr-token-123"
        ehr = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                ehr.requests.append((self.path, self.headers.get("Authorization")))
                if ehr.delay:
                    time.sleep(ehr.delay)
                if ehr.fail_status:
                    self._send(
                        ehr.fail_status,
                        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]},
                    )
                    return
                if self.headers.get("Authorization") != f"Bearer {ehr.token}":
                    self._send(
                        401, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}
                    )
                    return
                self._send(200, ehr.answer(self.path))

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/fhir"

    def add(self, *resources: dict[str, Any]) -> None:
        for r in resources:
            self.resources[f"{r['resourceType']}/{r['id']}"] = r

    def answer(self, path: str) -> Any:
        url = urlparse(path)
        parts = url.path.removeprefix("/fhir/").strip("/").split("/")
        if len(parts) == 2:
            found = self.resources.get("/".join(parts))
            return found if found is not None else {"resourceType": "OperationOutcome", "issue": []}
        rtype = parts[0]
        query = parse_qs(url.query)
        matches = []
        for key, res in self.resources.items():
            if not key.startswith(rtype + "/"):
                continue
            patient = query.get("patient", [None])[0]
            subject = (res.get("subject") or res.get("beneficiary") or {}).get("reference", "")
            if patient and subject not in (f"Patient/{patient}", patient):
                continue
            practitioner = query.get("practitioner", [None])[0]
            if practitioner and (res.get("practitioner") or {}).get("reference") != practitioner:
                continue
            codes = query.get("code", [None])[0]
            if codes:
                wanted = {c.split("|")[-1] for c in codes.split(",")}
                have = {c.get("code") for c in (res.get("code") or {}).get("coding", [])}
                if not wanted & have:
                    continue
            matches.append(res)
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "entry": [{"fullUrl": f"{self.base}/{r['resourceType']}/{r['id']}", "resource": r} for r in matches],
        }

    def __enter__(self) -> FakeEHR:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
