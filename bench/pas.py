"""Load test of PAS `Claim/$submit`, `Claim/$inquire` and reviewer decisions over real HTTP against `cds serve`,
beside a trivial JSON echo route.

Starts the server as `cds serve` does (gunicorn workers, SQLite store, JWT and SMART Backend Services on), signs two
orders through order-sign (acquired hemophilia: the record meets IP0356 and CRD issues a PA; factor VII deficiency:
the indication is left open), gets an access token, then submits PAS request Bundles for them at a fixed rate (open
loop, latency from the scheduled send time), every request with its own Bundle.identifier, so each one is checked,
decided and stored (one row, one audit event) before it is answered:

- auto-approved: A1 certified with the PA the CRD assertion issued;
- pended: A4, the open criteria in processNote, queued for a reviewer.

Then `$inquire` for one patient of another provider with two requests on record (by example: the item's HCPCS code
and the A1's authorization number, one matches), and a signed-in reviewer approving pended requests through
`POST /review/api/requests/{id}/decision`, each a different request (the decision, the PA it grants superseding the
one before, the audit events and the notification stored in one transaction).

Usage: python bench/pas.py [--rate 100] [--seconds 10]
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
import uuid
from pathlib import Path

import requests
from cryptography.hazmat.primitives.asymmetric import ec
from dtr import ISS, access_token, hook_token, post
from harness import Target, arguments, client_key, closed_loop, config_file, free_port, open_loop, serve, table

from cds.pas.reviewers import hash_password

ROOT = Path(__file__).resolve().parent.parent
APPROVED = ROOT / "fixtures" / "requests" / "order-sign-acquired-hemophilia.json"
PENDED = ROOT / "fixtures" / "requests" / "order-sign-factor-vii-deficiency.json"
FHIR = "application/fhir+json"
PAS = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/"
OTHER_NPI = "1999999992"  # the provider of the inquiry's requests
REVIEWER, PASSWORD = "bench.reviewer", "bench reviewer password"


def signed_order(key: ec.EllipticCurvePrivateKey, base: str, fixture: Path) -> tuple[dict, dict]:
    """The order as CRD returned it (with its coverage-information), and the request's Coverage."""
    body = json.loads(fixture.read_text())
    body["hookInstance"] = str(uuid.uuid4())
    aud = f"{base}/cds-services/order-sign"
    got = post(
        aud,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {hook_token(key, aud)}"},
    )
    order = copy.deepcopy(got["systemActions"][0]["resource"])
    order["status"] = "active"
    return order, body["prefetch"]["coverage"]["entry"][0]["resource"]


def pas_bundle(order: dict, coverage: dict, ident: str, *, npi: str = "1234567893", number: str = "") -> bytes:
    """A PAS request Bundle for one NovoSeven item (J7189) whose requested service is the signed order, from the
    provider with this NPI (``number``: the item's authorizationNumber, as an inquiry names it)."""
    claim = {
        "resourceType": "Claim",
        "id": f"claim-{ident}",
        "identifier": [{"system": "urn:trnorg:BENCH", "value": ident}],
        "status": "active",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "preauthorization",
        "patient": {"reference": "Patient/pat-1"},
        "created": "2026-12-03T10:00:00Z",
        "insurer": {"reference": "Organization/payer-1"},
        "provider": {"reference": "Organization/prov-1"},
        "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": f"Coverage/{coverage['id']}"}}],
        "item": [
            {
                "sequence": 1,
                "extension": [
                    {
                        "url": PAS + "extension-certificationType",
                        "valueCodeableConcept": {
                            "coding": [{"system": "https://codesystem.x12.org/005010/1322", "code": "I"}]
                        },
                    },
                    {
                        "url": PAS + "extension-requestedService",
                        "valueReference": {"reference": f"MedicationRequest/{order['id']}"},
                    },
                    *([{"url": PAS + "extension-authorizationNumber", "valueString": number}] if number else []),
                ],
                "category": {"coding": [{"system": "https://codesystem.x12.org/005010/1365", "code": "1"}]},
                "productOrService": {
                    "coding": [{"system": "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets", "code": "J7189"}]
                },
                "locationCodeableConcept": {
                    "coding": [
                        {"system": "https://www.cms.gov/Medicare/Coding/place-of-service-code-set", "code": "11"}
                    ]
                },
                "quantity": {"value": 1},
            }
        ],
    }
    resources = [
        {"resourceType": "Patient", "id": "pat-1", "identifier": [{"system": "urn:ehr:mrn", "value": "MRN-1"}]},
        coverage,
        {
            "resourceType": "Organization",
            "id": "payer-1",
            "identifier": [{"system": "urn:cds:payer-id", "value": "cigna"}],
        },
        {
            "resourceType": "Organization",
            "id": "prov-1",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": npi}],
        },
        {"resourceType": "Practitioner", "id": "pract-1"},
        order,
    ]
    bundle = {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ehr:pas-tx", "value": ident},
        "type": "collection",
        "timestamp": "2026-12-03T10:00:00Z",
        "entry": [
            {"fullUrl": f"urn:uuid:{claim['id']}", "resource": claim},
            *({"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}", "resource": r} for r in resources),
        ],
    }
    return json.dumps(bundle).encode()


def review_codes(bundle: dict) -> list[str]:
    """The X12 306 review action of each item of a PAS response Bundle."""
    claim_response = bundle["entry"][0]["resource"]
    return [
        code["code"]
        for item in claim_response.get("item", ())
        for adjudication in item.get("adjudication", ())
        for action in adjudication.get("extension", ())
        for part in action.get("extension", ())
        if part["url"].endswith("extension-reviewActionCode")
        for code in part["valueCodeableConcept"]["coding"]
    ]


def reviewer_session(base: str) -> dict[str, str]:
    """Sign the bench reviewer in: the session cookie and CSRF header a decision needs."""
    web = requests.Session()
    form = web.get(f"{base}/review/signin", timeout=10).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf, "no sign-in form"
    data = {"username": REVIEWER, "password": PASSWORD, "csrf": csrf.group(1)}
    signed = web.post(f"{base}/review/signin", data=data, allow_redirects=False, timeout=30)
    assert signed.status_code == 303, signed.status_code
    token = web.get(f"{base}/review/api/session", timeout=10).json()["csrf"]
    return {"Cookie": f"cds_review={web.cookies['cds_review']}", "X-CSRF-Token": token}


def main() -> int:
    args = arguments(__doc__, connections=None).parse_args()

    key, jwk = client_key()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    count = int(args.rate * args.seconds)
    account = (
        f'[[reviewers]]\nusername = "{REVIEWER}"\nname = "Bench Reviewer"\n'
        f'password_hash = "{hash_password(PASSWORD)}"\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = config_file(tmp, workers=args.workers, threads=args.threads, iss=ISS, jwk=jwk, extra=account)
        server = serve(ROOT, config, port)
        try:
            bearer = access_token(key, base, "system/Claim.cr")
            headers = {"Content-Type": FHIR, "Authorization": f"Bearer {bearer}"}
            rows = []
            echo = Target("echo", "/_echo", b'{"resourceType":"Bundle"}', None)
            closed_loop(port, echo, 2, 2)
            rows.append((echo.name, f"open {args.rate:g}/s", open_loop(port, echo, args.rate, args.seconds)))
            orders = {}
            for name, fixture in (("submit A1", APPROVED), ("submit A4", PENDED)):
                order, coverage = orders[name] = signed_order(key, base, fixture)
                for _ in range(20):  # warm up, and show what this request is answered with
                    answer = post(f"{base}/fhir/Claim/$submit", pas_bundle(order, coverage, uuid.uuid4().hex), headers)
                print(f"{name}: review action {review_codes(answer)}", flush=True)
                bodies = [pas_bundle(order, coverage, uuid.uuid4().hex) for _ in range(count)]
                target = Target(name, "/fhir/Claim/$submit", b"", None, bearer=bearer, bodies=bodies, content_type=FHIR)
                rows.append((name, f"open {args.rate:g}/s", open_loop(port, target, args.rate, args.seconds)))

            # $inquire: another provider's two requests for the patient, one of which the example names
            numbers = []
            for name in ("submit A1", "submit A4"):
                order, coverage = orders[name]
                got = post(
                    f"{base}/fhir/Claim/$submit", pas_bundle(order, coverage, uuid.uuid4().hex, npi=OTHER_NPI), headers
                )
                numbers.append(got["entry"][0]["resource"].get("preAuthRef", ""))
            order, coverage = orders["submit A1"]
            inquiry = pas_bundle(order, coverage, "inquiry", npi=OTHER_NPI, number=numbers[0])
            found = post(f"{base}/fhir/Claim/$inquire", inquiry, headers)
            print(f"$inquire: {len(found.get('parameter', []))} of 2 requests on record match", flush=True)
            target = Target("$inquire", "/fhir/Claim/$inquire", inquiry, None, bearer=bearer, content_type=FHIR)
            rows.append(("$inquire", f"open {args.rate:g}/s", open_loop(port, target, args.rate, args.seconds)))

            # reviewer decisions, each on its own pended request
            order, coverage = orders["submit A4"]
            pended = [
                post(f"{base}/fhir/Claim/$submit", pas_bundle(order, coverage, uuid.uuid4().hex), headers)["entry"][0][
                    "resource"
                ]["id"]
                for _ in range(count)
            ]
            decision = json.dumps({"action": "approve", "period_end": "2027-06-30"}).encode()
            target = Target(
                "decision",
                "",
                decision,
                None,
                paths=[f"/review/api/requests/{rid}/decision" for rid in pended],
                extra_headers=reviewer_session(base),
            )
            rows.append(("decision", f"open {args.rate:g}/s", open_loop(port, target, args.rate, args.seconds)))
        finally:
            server.terminate()
            server.wait(timeout=15)
    print(
        f"\n{args.workers} workers x {args.threads} threads; {os.cpu_count()} cores shared with this load generator\n"
    )
    table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
