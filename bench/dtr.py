"""Load test of the DTR payer service over real HTTP against `cds serve`, beside a trivial JSON echo route.

Starts the server as `cds serve` does (gunicorn workers, SQLite store, JWT and SMART Backend Services on), signs
orders through order-sign to make coverage assertions that need documentation (the factor VII deficiency fixture:
one question), gets an access token at /auth/token, then measures, each in an open loop at a fixed rate (latency
from the scheduled send time) and a closed loop:

- `$questionnaire-package` for an assertion (the form, its draft, the CQL libraries and value sets);
- `$next-question`, the first step of the adaptive form (no store writes until the last answer);
- `POST QuestionnaireResponse`, a completed form that settles its assertion (evaluation, PA issue, one transaction):
  every request settles a different assertion, so the runs are as long as the assertions made for them.

Usage: python bench/dtr.py [--rate 100] [--seconds 10]
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from harness import Target, arguments, client_key, closed_loop, config_file, free_port, open_loop, serve, table

ROOT = Path(__file__).resolve().parent.parent
REQUEST = ROOT / "fixtures" / "requests" / "order-sign-factor-vii-deficiency.json"
ISS = "https://bench.invalid/client"
FHIR = "application/fhir+json"


def post(url: str, body: bytes, headers: dict[str, str]) -> dict:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def hook_token(key: ec.EllipticCurvePrivateKey, aud: str) -> str:
    now = int(time.time())
    return jwt.encode(
        {"iss": ISS, "aud": aud, "exp": now + 3600, "iat": now, "jti": secrets.token_hex(32)},
        key,
        algorithm="ES384",
        headers={"kid": "bench", "typ": "JWT"},
    )


def access_token(
    key: ec.EllipticCurvePrivateKey,
    base: str,
    scope: str = "system/Questionnaire.rs system/Library.rs system/ValueSet.rs system/QuestionnaireResponse.cu",
) -> str:
    now = int(time.time())
    assertion = jwt.encode(
        {"iss": ISS, "sub": ISS, "aud": f"{base}/auth/token", "exp": now + 240, "jti": secrets.token_hex(16)},
        key,
        algorithm="ES384",
        headers={"kid": "bench"},
    )
    form = urllib.parse.urlencode(
        {
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        }
    ).encode()
    got = post(f"{base}/auth/token", form, {"Content-Type": "application/x-www-form-urlencoded"})
    return str(got["access_token"])


def sign_orders(key: ec.EllipticCurvePrivateKey, base: str, count: int) -> list[str]:
    """Coverage assertions that need documentation, one per order-sign call."""
    template = json.loads(REQUEST.read_text())
    out = []
    for _ in range(count):
        body = copy.deepcopy(template)
        body["hookInstance"] = str(uuid.uuid4())
        order = body["context"]["draftOrders"]["entry"][0]["resource"]
        order["id"] = f"mr-{uuid.uuid4().hex[:12]}"
        aud = f"{base}/cds-services/order-sign"
        got = post(
            aud,
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {hook_token(key, aud)}"},
        )
        ext = next(
            e for e in got["systemActions"][0]["resource"]["extension"] if e["url"].endswith("coverage-information")
        )
        out.append(next(s["valueString"] for s in ext["extension"] if s["url"] == "coverage-assertion-id"))
    return out


def package_body(assertion_id: str, coverage: dict, adaptive: str | None = None) -> bytes:
    parts = [{"name": "coverage", "resource": coverage}, {"name": "context", "valueString": assertion_id}]
    if adaptive:
        parts.append({"name": "questionnaire", "valueCanonical": adaptive})
    return json.dumps({"resourceType": "Parameters", "parameter": parts}).encode()


def completed(draft: dict) -> bytes:
    qr = copy.deepcopy(draft)
    qr["status"] = "completed"
    qr["author"] = {"reference": "Practitioner/pract-1"}
    qr["item"] = [
        {"linkId": "IP0356-1", "answer": [{"valueBoolean": True}]},
        {"linkId": "attestation", "answer": [{"valueBoolean": True}]},
    ]
    return json.dumps(qr).encode()


def main() -> int:
    args = arguments(__doc__).parse_args()

    key, jwk = client_key()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    submits = int(args.rate * args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        config = config_file(tmp, workers=args.workers, threads=args.threads, iss=ISS, jwk=jwk)
        server = serve(ROOT, config, port)
        try:
            print(f"signing {submits + 2} orders for their assertions ...", flush=True)
            assertions = sign_orders(key, base, submits + 2)
            bearer = access_token(key, base)
            auth = {"Authorization": f"Bearer {bearer}", "Content-Type": FHIR}
            coverage = json.loads(REQUEST.read_text())["prefetch"]["coverage"]["entry"][0]["resource"]
            first = post(
                f"{base}/fhir/Questionnaire/$questionnaire-package", package_body(assertions[0], coverage), auth
            )
            bundle = first["parameter"][0]["resource"]
            form = bundle["entry"][0]["resource"]
            adaptive_canonical = f"{form['url']}-adaptive|{form['version']}"
            adaptive = post(
                f"{base}/fhir/Questionnaire/$questionnaire-package",
                package_body(assertions[0], coverage, adaptive_canonical),
                auth,
            )["parameter"][0]["resource"]
            step = next(
                e["resource"] for e in adaptive["entry"] if e["resource"]["resourceType"] == "QuestionnaireResponse"
            )
            drafts = []
            for aid in assertions[1:]:  # each submit settles its own assertion: its draft, completed
                got = post(f"{base}/fhir/Questionnaire/$questionnaire-package", package_body(aid, coverage), auth)
                drafts.append(
                    next(
                        e["resource"]
                        for e in got["parameter"][0]["resource"]["entry"]
                        if e["resource"]["resourceType"] == "QuestionnaireResponse"
                    )
                )
            bodies = [completed(d) for d in drafts]
            size = len(json.dumps(bundle))
            pkg = Target(
                "package",
                "/fhir/Questionnaire/$questionnaire-package",
                package_body(assertions[0], coverage),
                None,
                bearer=bearer,
                content_type=FHIR,
            )
            nxt = Target(
                "next-question",
                "/fhir/Questionnaire/$next-question",
                json.dumps(step).encode(),
                None,
                bearer=bearer,
                content_type=FHIR,
            )
            sub = Target(
                "QR submit",
                "/fhir/QuestionnaireResponse",
                b"",
                None,
                bearer=bearer,
                bodies=bodies,
                content_type=FHIR,
                ok=(201,),
            )
            echo = Target("echo", "/_echo", package_body(assertions[0], coverage), None)
            for warm in (pkg, nxt, echo):
                closed_loop(port, warm, 2, 2)
            rows = []
            for target in (echo, pkg, nxt):
                rows.append((target.name, f"open {args.rate:g}/s", open_loop(port, target, args.rate, args.seconds)))
                rows.append(
                    (
                        target.name,
                        f"closed {args.connections} conn",
                        closed_loop(port, target, args.connections, args.seconds),
                    )
                )
            rows.append((sub.name, f"open {args.rate:g}/s", open_loop(port, sub, args.rate, args.seconds)))
        finally:
            server.terminate()
            server.wait(timeout=15)
    print(
        f"\npackage {size:,} bytes ({len(bundle['entry'])} entries); {args.workers} workers x {args.threads} threads; "
        f"{os.cpu_count()} cores shared with this load generator\n"
    )
    table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
