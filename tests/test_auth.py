"""The CDS Hooks JWT: every rejection is a bare 401; ES384 and RS384 tokens shaped like Inferno's are accepted."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import jwt
import pytest
from builders import condition, hook_request, med_order
from conftest import BASE, TEST_ISS, ClientKey
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask

AUD = f"{BASE}/cds-services/order-sign"


@pytest.fixture
def secured(make_app: Any) -> Flask:
    return make_app(auth_required=True)


def call(app: Flask, token: str | None, body: dict[str, Any] | None = None, header: str | None = None) -> Any:
    headers = {"Authorization": header if header is not None else f"Bearer {token}"} if (token or header) else {}
    return app.test_client().post("/cds-services/order-sign", json=body or hook_request([med_order()]), headers=headers)


def assert_401(resp: Any) -> None:
    assert resp.status_code == 401
    # RFC 7235 §3.1 / RFC 6750 §3: the scheme wanted, and the error code only when a token was sent
    challenge = resp.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{BASE}"'), challenge
    sent = resp.request.headers.get("Authorization", "").lower().startswith("bearer ")
    assert ('error="invalid_token"' in challenge) is sent, challenge
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["details"]["text"] == "Unauthorized"  # no reason is given away


def test_valid_es384_token_is_accepted(secured: Flask, client_key: ClientKey) -> None:
    assert call(secured, client_key.token(AUD)).status_code == 200


def test_inferno_shaped_token_with_jku_and_aud_list(make_app: Any, client_key: ClientKey) -> None:
    url = "https://inferno.test/custom/crd_server/jwks.json"
    app = make_app(auth_required=True, clients=[{"iss": TEST_ISS, "jwks_url": url}])
    fetched: list[str] = []
    app.extensions["cds"].verifier.fetch = lambda u: (fetched.append(u), client_key.jwks)[1]
    token = client_key.token([AUD], headers={"jku": url})
    assert call(app, token).status_code == 200
    assert call(app, client_key.token(AUD, headers={"jku": url})).status_code == 200
    assert fetched == [url], "the JWK Set is fetched once and cached"


def test_rs384_is_accepted(make_app: Any) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "rsa-1", "alg": "RS384", "use": "sig"})
    app = make_app(auth_required=True, clients=[{"iss": "rsa-client", "jwks": {"keys": [jwk]}}])
    now = int(time.time())
    token = jwt.encode(
        {"iss": "rsa-client", "aud": AUD, "exp": now + 60, "iat": now, "jti": secrets.token_hex(8)},
        key,
        algorithm="RS384",
        headers={"kid": "rsa-1", "typ": "JWT"},
    )
    assert call(app, token).status_code == 200
    rs256 = jwt.encode(
        {"iss": "rsa-client", "aud": AUD, "exp": now + 60, "iat": now, "jti": "x2"},
        key,
        algorithm="RS256",
        headers={"kid": "rsa-1", "typ": "JWT"},
    )
    assert_401(call(app, rs256))


def test_no_header(secured: Flask) -> None:
    assert_401(call(secured, None))


def test_not_bearer(secured: Flask, client_key: ClientKey) -> None:
    assert_401(call(secured, None, header=f"Basic {client_key.token(AUD)}"))


def test_not_a_jwt(secured: Flask) -> None:
    assert_401(call(secured, "definitely-not-a-jwt"))


def test_alg_none(secured: Flask) -> None:
    now = int(time.time())
    token = jwt.encode(
        {"iss": TEST_ISS, "aud": AUD, "exp": now + 60, "iat": now, "jti": "n1"},
        None,
        algorithm="none",
        headers={"kid": "test-es384", "typ": "JWT"},
    )
    assert_401(call(secured, token))


def test_symmetric_hs256(secured: Flask) -> None:
    now = int(time.time())
    token = jwt.encode(
        {"iss": TEST_ISS, "aud": AUD, "exp": now + 60, "iat": now, "jti": "h1"},
        "shared-secret-" * 3,
        algorithm="HS256",
        headers={"kid": "test-es384", "typ": "JWT"},
    )
    assert_401(call(secured, token))


def test_forged_signature(secured: Flask) -> None:
    impostor = ClientKey()  # same kid, a different key
    assert_401(call(secured, impostor.token(AUD)))


def test_unknown_issuer(secured: Flask, client_key: ClientKey) -> None:
    assert_401(call(secured, client_key.token(AUD, iss="https://evil.test")))


def test_jku_not_registered_is_never_fetched(make_app: Any, client_key: ClientKey) -> None:
    app = make_app(auth_required=True)
    fetched: list[str] = []
    app.extensions["cds"].verifier.fetch = lambda u: (fetched.append(u), client_key.jwks)[1]
    assert_401(call(app, client_key.token(AUD, headers={"jku": "https://evil.test/jwks.json"})))
    assert fetched == []


def test_unknown_kid(secured: Flask, client_key: ClientKey) -> None:
    assert_401(call(secured, client_key.token(AUD, headers={"kid": "other"})))


def test_missing_kid(secured: Flask, client_key: ClientKey) -> None:
    now = int(time.time())
    token = jwt.encode(
        {"iss": TEST_ISS, "aud": AUD, "exp": now + 60, "iat": now, "jti": "k1"},
        client_key.key,
        algorithm="ES384",
        headers={"typ": "JWT"},
    )
    assert_401(call(secured, token))


def test_wrong_typ(secured: Flask, client_key: ClientKey) -> None:
    assert_401(call(secured, client_key.token(AUD, headers={"typ": "at+jwt"})))


def test_wrong_audience(secured: Flask, client_key: ClientKey) -> None:
    assert_401(call(secured, client_key.token(f"{BASE}/cds-services/order-select")))


def test_expired(secured: Flask, client_key: ClientKey) -> None:
    assert_401(call(secured, client_key.token(AUD, lifetime=-120)))


def test_issued_in_the_future(secured: Flask, client_key: ClientKey) -> None:
    assert_401(call(secured, client_key.token(AUD, iat=int(time.time()) + 3600, lifetime=7200)))


def test_too_old(secured: Flask, client_key: ClientKey) -> None:
    assert_401(call(secured, client_key.token(AUD, iat=int(time.time()) - 7200, lifetime=7300)))


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "jti"])
def test_missing_required_claim(secured: Flask, client_key: ClientKey, claim: str) -> None:
    assert_401(call(secured, client_key.token(AUD, drop=(claim,))))


def test_replayed_jti(secured: Flask, client_key: ClientKey) -> None:
    token = client_key.token(AUD)
    assert call(secured, token).status_code == 200
    assert_401(call(secured, token))


def test_tenant_is_enforced_when_configured(make_app: Any, client_key: ClientKey) -> None:
    app = make_app(auth_required=True, clients=[{"iss": TEST_ISS, "jwks": client_key.jwks, "tenant": "hospital-a"}])
    assert_401(call(app, client_key.token(AUD)))
    assert call(app, client_key.token(AUD, tenant="hospital-a")).status_code == 200


def test_no_sub_claim_is_needed(secured: Flask, client_key: ClientKey) -> None:
    assert call(secured, client_key.token(AUD, drop=("sub",))).status_code == 200


def test_rejected_calls_are_not_processed_or_stored(secured: Flask) -> None:
    body = hook_request([med_order()], conditions=[condition("D68.311")])
    assert_401(call(secured, "x.y.z", body))
    assert secured.extensions["cds"].store.exchanges_for(body["hookInstance"]) == []


def test_discovery_is_open_by_default_and_can_require_a_token(make_app: Any, client_key: ClientKey) -> None:
    assert make_app(auth_required=True).test_client().get("/cds-services").status_code == 200
    app = make_app(auth_required=True, discovery_auth_required=True)
    assert_401(app.test_client().get("/cds-services"))
    token = client_key.token(f"{BASE}/cds-services")
    assert app.test_client().get("/cds-services", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_the_draft_response_needs_a_token_for_its_own_url(make_app: Any, client_key: ClientKey) -> None:
    from builders import coverage_info, role

    app = make_app(auth_required=True)
    body = hook_request([med_order()], conditions=[condition("D68.2")], roles=[role("207RX0202X")])
    resp = call(app, client_key.token(AUD), body)
    assertion = coverage_info(resp.get_json()["systemActions"][0]["resource"])["coverage-assertion-id"][0]
    url = f"/fhir/QuestionnaireResponse/{assertion}"
    assert_401(app.test_client().get(url))
    token = client_key.token(f"{BASE}{url}")
    got = app.test_client().get(url, headers={"Authorization": f"Bearer {token}"})
    assert got.status_code == 200 and got.get_json()["resourceType"] == "QuestionnaireResponse"


def test_an_ec_key_on_another_curve_is_refused(make_app: Any) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "p256"})
    app = make_app(auth_required=True, clients=[{"iss": "p256", "jwks": {"keys": [jwk]}}])
    now = int(time.time())
    token = jwt.encode(
        {"iss": "p256", "aud": AUD, "exp": now + 60, "iat": now, "jti": "c1"},
        key,
        algorithm="ES256",
        headers={"kid": "p256", "typ": "JWT"},
    )
    assert_401(call(app, token))
