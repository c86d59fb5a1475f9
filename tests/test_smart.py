"""SMART Backend Services: the token endpoint, the access tokens FHIR endpoints check, the form page links."""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import BASE, FIXED_NOW, TEST_ISS, ClientKey
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask, current_app, request

from cds import create_app, scopes, smart
from cds.cli import main
from cds.config import load_config
from cds.demo import DEMO_ISS
from cds.errors import ConfigError, Forbidden, Unauthorized, to_operation_outcome
from cds.links import EXPIRED, check_form_link, form_link

TOKEN_URL = f"{BASE}/auth/token"
RSA_ISS = "https://rsa-ehr.test/dtr"
NARROW_ISS = "https://narrow.test/dtr"  # may have system/Questionnaire.rs only
WILD_ISS = "https://wild.test/dtr"  # may have system/*.rs
Q = "system/Questionnaire.rs"


class RsaKey:
    def __init__(self, kid: str = "rsa-1") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": kid, "alg": "RS384", "use": "sig"})
        self.jwks = {"keys": [jwk]}

    def token(self, aud: str = TOKEN_URL, *, iss: str = RSA_ISS, lifetime: int = 300, alg: str = "RS384") -> str:
        now = int(time.time())
        claims = {"iss": iss, "sub": iss, "aud": aud, "exp": now + lifetime, "jti": secrets.token_hex(16)}
        return jwt.encode(claims, self.key, algorithm=alg, headers={"kid": self.kid, "typ": "JWT"})


class Clock:
    """The runtime's clock, movable by a test."""

    def __init__(self) -> None:
        self.now = FIXED_NOW

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def rsa_key() -> RsaKey:
    return RsaKey()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _probe() -> dict[str, Any]:
    """A FHIR endpoint of the tests: needs the scopes named in ``need``."""
    return {"client": smart.require_scopes(current_app.extensions["cds"], *request.args.getlist("need"))}


@pytest.fixture
def build(tmp_path: Path, client_key: ClientKey, rsa_key: RsaKey, clock: Clock) -> Iterator[Callable[..., Flask]]:
    """An app with SMART clients (ES384, RS384, one allowed Questionnaire only, one allowed ``system/*.rs``), auth
    on, the movable clock, and ``GET /fhir/_probe?need=...`` calling :func:`cds.smart.require_scopes`."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        settings = {
            "data_dir": str(tmp_path / "data"),
            "base_url": BASE,
            "auth_required": True,
            "demo_client": False,
            "clients": [
                {"iss": TEST_ISS, "jwks": client_key.jwks},
                {"iss": RSA_ISS, "jwks": rsa_key.jwks},
                {"iss": NARROW_ISS, "jwks": client_key.jwks, "scopes": [Q]},
                {"iss": WILD_ISS, "jwks": client_key.jwks, "scopes": ["system/*.rs"]},
            ],
            "log_level": "WARNING",
            **config,
        }
        app = create_app(settings, environ={}, clock=clock)
        app.add_url_rule("/fhir/_probe", "probe", _probe)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["cds"].store.dispose()


@pytest.fixture
def app(build: Callable[..., Flask]) -> Flask:
    return build()


def assertion(key: ClientKey, *, iss: str = TEST_ISS, aud: str = TOKEN_URL, **kw: Any) -> str:
    """A client assertion as an EHR or DTR app makes it (ES384, iss = sub = client id, exp in 5 minutes)."""
    kw.setdefault("sub", iss)
    return key.token(aud, iss=iss, **kw)


def exchange(app: Flask, client_assertion: str | None, scope: str | None = Q, **form: str | None) -> Any:
    data = {
        "grant_type": "client_credentials",
        "client_assertion_type": smart.ASSERTION_TYPE,
        "client_assertion": client_assertion,
        "scope": scope,
        **form,
    }
    return app.test_client().post("/auth/token", data={k: v for k, v in data.items() if v is not None})


def access(app: Flask, key: ClientKey, scope: str = Q, iss: str = TEST_ISS) -> str:
    resp = exchange(app, assertion(key, iss=iss), scope)
    assert resp.status_code == 200, resp.get_json()
    return str(resp.get_json()["access_token"])


def probe(app: Flask, token: str | None, *need: str, header: str | None = None) -> Any:
    headers = {"Authorization": header or f"Bearer {token}"} if (token or header) else {}
    return app.test_client().get("/fhir/_probe", query_string=[("need", n) for n in need], headers=headers)


def refused(resp: Any, error: str, status: int = 400) -> str:
    assert resp.status_code == status
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.get_json()
    assert set(body) == {"error", "error_description"} and body["error"] == error
    assert "Traceback" not in resp.get_data(as_text=True)
    return str(body["error_description"])


def refused_client(resp: Any, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """An invalid_client answer, refused for ``reason`` (the log says why, the answer does not)."""
    description = refused(resp, "invalid_client", 401)
    assert description == smart.ASSERTION_REFUSED
    assert reason in caplog.text, caplog.text


@pytest.fixture(autouse=True)
def _smart_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cds.smart")


def assert_401(resp: Any, challenge: str = 'error="invalid_token"') -> None:
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith(f'Bearer realm="{BASE}"')
    assert challenge in resp.headers["WWW-Authenticate"]
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"
    assert body["issue"][0]["details"]["text"] == "Unauthorized"


# --- the token endpoint --------------------------------------------------------------------------------------------


def test_es384_exchange_gives_an_access_token(app: Flask, client_key: ClientKey) -> None:
    resp = exchange(app, assertion(client_key), f"{Q} system/Library.rs")
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    body = resp.get_json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 300
    assert body["scope"] == f"{Q} system/Library.rs"
    header = jwt.get_unverified_header(body["access_token"])
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert header["alg"] == "HS256" and header["typ"] == "at+jwt"
    assert claims["client_id"] == TEST_ISS and claims["scope"] == body["scope"] and len(claims["jti"]) >= 16
    assert claims["exp"] - claims["iat"] == 300 and claims["iat"] == int(FIXED_NOW.timestamp())
    assert probe(app, body["access_token"], Q).get_json() == {"client": TEST_ISS}


def test_rs384_exchange(app: Flask, rsa_key: RsaKey) -> None:
    resp = exchange(app, rsa_key.token())
    assert resp.status_code == 200, resp.get_json()
    assert probe(app, resp.get_json()["access_token"], Q).get_json() == {"client": RSA_ISS}


def test_rs256_is_not_accepted(app: Flask, rsa_key: RsaKey, caplog: pytest.LogCaptureFixture) -> None:
    refused_client(exchange(app, rsa_key.token(alg="RS256")), caplog, "algorithm 'RS256' not accepted")


def test_access_token_lifetime_is_a_setting(build: Callable[..., Flask], client_key: ClientKey) -> None:
    body = exchange(build(access_token_seconds=120), assertion(client_key)).get_json()
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert body["expires_in"] == 120 and claims["exp"] - claims["iat"] == 120


def test_wrong_audience(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture) -> None:
    refused_client(
        exchange(app, assertion(client_key, aud=f"{BASE}/cds-services/order-sign")), caplog, "InvalidAudienceError"
    )
    refused_client(
        exchange(app, assertion(client_key, aud="https://other.test/auth/token")), caplog, "InvalidAudienceError"
    )


def test_expired_assertion(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture) -> None:
    refused_client(exchange(app, assertion(client_key, lifetime=-120)), caplog, "ExpiredSignatureError")


def test_exp_more_than_five_minutes_ahead(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture) -> None:
    refused_client(exchange(app, assertion(client_key, lifetime=600)), caplog, "exp more than five minutes ahead")
    assert exchange(app, assertion(client_key, lifetime=300)).status_code == 200


def test_replayed_jti(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture) -> None:
    once = assertion(client_key)
    assert exchange(app, once).status_code == 200
    refused_client(exchange(app, once), caplog, "jti replayed")


def test_the_jti_is_kept_in_the_store_all_workers_share(app: Flask, client_key: ClientKey) -> None:
    jti = secrets.token_hex(16)
    assert exchange(app, assertion(client_key, jti=jti)).status_code == 200
    store = app.extensions["cds"].store
    assert not store.remember_token(TEST_ISS, jti, FIXED_NOW), "the token endpoint recorded it in seen_jwt_ids"


def test_unknown_client(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture) -> None:
    refused_client(exchange(app, assertion(client_key, iss="https://evil.test")), caplog, "issuer not trusted")


def test_wrong_key(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    impostor = ClientKey()  # same kid, another key
    refused_client(exchange(app, assertion(impostor)), caplog, "InvalidSignatureError")


def test_unknown_kid(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture) -> None:
    refused_client(exchange(app, assertion(client_key, headers={"kid": "nope"})), caplog, "unknown kid")


def test_alg_that_does_not_fit_the_key_is_refused(
    app: Flask, client_key: ClientKey, rsa_key: RsaKey, caplog: pytest.LogCaptureFixture
) -> None:
    now = int(time.time())
    claims = {"iss": TEST_ISS, "sub": TEST_ISS, "aud": TOKEN_URL, "exp": now + 60, "jti": secrets.token_hex(8)}
    # an RS384 header naming the client's EC key (signed with an RSA key the attacker holds)
    token = jwt.encode(claims, rsa_key.key, algorithm="RS384", headers={"kid": client_key.kid, "typ": "JWT"})
    refused_client(exchange(app, token), caplog, f"key '{client_key.kid}' is not a key for RS384")


def test_an_ec_key_on_another_curve_is_refused(build: Callable[..., Flask], caplog: pytest.LogCaptureFixture) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "p256"
    app = build(clients=[{"iss": "p256", "jwks": {"keys": [jwk]}}])
    claims = {"iss": "p256", "sub": "p256", "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": "j"}
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "p256", "typ": "JWT"})
    refused_client(exchange(app, token), caplog, "algorithm 'ES256' not accepted")


def test_sub_must_be_the_client_id(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture) -> None:
    refused_client(exchange(app, assertion(client_key, sub="someone-else")), caplog, "sub is not the client id")
    refused_client(exchange(app, assertion(client_key, drop=("sub",))), caplog, "MissingRequiredClaimError")


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "jti"])
def test_missing_claim(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture, claim: str) -> None:
    refused(exchange(app, assertion(client_key, drop=(claim,))), "invalid_client", 401)


def test_iat_is_optional(app: Flask, client_key: ClientKey) -> None:
    assert exchange(app, assertion(client_key, drop=("iat",))).status_code == 200


def test_client_id_parameter_must_match(app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture) -> None:
    assert exchange(app, assertion(client_key), client_id=TEST_ISS).status_code == 200
    refused(exchange(app, assertion(client_key), client_id=RSA_ISS), "invalid_client", 401)


def test_not_a_jwt(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    refused_client(exchange(app, "not.a.jwt"), caplog, "not a JWT")


def test_wrong_grant_type(app: Flask, client_key: ClientKey) -> None:
    refused(exchange(app, assertion(client_key), grant_type="authorization_code"), "unsupported_grant_type")
    refused(exchange(app, assertion(client_key), grant_type="password"), "unsupported_grant_type")


@pytest.mark.parametrize("field", ["grant_type", "client_assertion_type", "client_assertion"])
def test_missing_field(app: Flask, client_key: ClientKey, field: str) -> None:
    if field == "client_assertion":
        resp = exchange(app, None)
    else:
        resp = exchange(app, assertion(client_key), **{field: None})
    assert field in refused(resp, "invalid_request")


def test_wrong_assertion_type(app: Flask, client_key: ClientKey) -> None:
    wrong = "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"
    refused(exchange(app, assertion(client_key), client_assertion_type=wrong), "invalid_request")


def test_missing_scope(app: Flask, client_key: ClientKey) -> None:
    refused(exchange(app, assertion(client_key), scope=None), "invalid_scope")
    refused(exchange(app, assertion(client_key), scope="  "), "invalid_scope")


def test_not_form_encoded(app: Flask, client_key: ClientKey) -> None:
    body = {
        "grant_type": "client_credentials",
        "client_assertion_type": smart.ASSERTION_TYPE,
        "client_assertion": assertion(client_key),
        "scope": Q,
    }
    refused(app.test_client().post("/auth/token", json=body), "invalid_request")
    # multipart would fill request.form just as well: RFC 6749 says form-urlencoded, so it is refused
    resp = app.test_client().post("/auth/token", data=body, content_type="multipart/form-data")
    assert "x-www-form-urlencoded" in refused(resp, "invalid_request")


def test_repeated_parameter(app: Flask, client_key: ClientKey) -> None:
    data = [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", smart.ASSERTION_TYPE),
        ("client_assertion", assertion(client_key)),
        ("scope", Q),
        ("scope", "system/*.rs"),
    ]
    body = "&".join(f"{k}={v}" for k, v in data)
    resp = app.test_client().post("/auth/token", data=body, content_type="application/x-www-form-urlencoded")
    assert "scope" in refused(resp, "invalid_request")


def test_errors_never_echo_the_assertion_and_logs_hold_no_token(
    app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture
) -> None:
    bad = assertion(client_key, aud="https://other.test/auth/token")
    resp = exchange(app, bad)
    assert bad not in resp.get_data(as_text=True) and bad.split(".")[1] not in resp.get_data(as_text=True)
    good = assertion(client_key)
    token = exchange(app, good).get_json()["access_token"]
    assert probe(app, token, Q).status_code == 200
    for secret_text in (bad, good, token, bad.split(".")[2], token.split(".")[2]):
        assert secret_text not in caplog.text
    assert "access token issued to https://ehr.test/cds-client" in caplog.text


def test_token_endpoint_is_post_only(app: Flask) -> None:
    resp = app.test_client().get("/auth/token")
    assert resp.status_code == 405 and resp.get_json()["resourceType"] == "OperationOutcome"


# --- scopes ----------------------------------------------------------------------------------------------------------


def test_scope_is_narrowed_to_what_the_client_may_have(app: Flask, client_key: ClientKey) -> None:
    resp = exchange(app, assertion(client_key, iss=NARROW_ISS), f"{Q} system/Library.rs system/ValueSet.rs")
    assert resp.get_json()["scope"] == Q
    assert (
        "Library"
        in probe(app, resp.get_json()["access_token"], "system/Library.rs").get_json()["issue"][0]["details"]["text"]
    )
    refused(exchange(app, assertion(client_key, iss=NARROW_ISS), "system/Library.rs"), "invalid_scope")


def test_unknown_and_unsupported_scopes_are_dropped(app: Flask, client_key: ClientKey) -> None:
    asked = f"launch openid patient/Patient.rs system/Patient.rs system/Questionnaire.rs?x=1 {Q}"
    assert exchange(app, assertion(client_key), asked).get_json()["scope"] == Q
    refused(exchange(app, assertion(client_key), "launch openid system/Patient.rs"), "invalid_scope")


def test_a_wildcard_request_is_granted_the_scopes_offered(app: Flask, client_key: ClientKey) -> None:
    body = exchange(app, assertion(client_key), "system/*.rs").get_json()
    # every offered scope a read wildcard covers, narrowed to reading: not the write scope for answered forms
    assert body["scope"] == (
        "system/Questionnaire.rs system/Library.rs system/ValueSet.rs system/Subscription.rs system/Claim.r"
    )
    assert probe(app, body["access_token"], Q, "system/Library.rs", "system/ValueSet.rs").status_code == 200
    assert probe(app, body["access_token"], "system/QuestionnaireResponse.cu").status_code == 403


def test_a_wildcard_client_gets_the_wildcard(app: Flask, client_key: ClientKey) -> None:
    body = exchange(app, assertion(client_key, iss=WILD_ISS), "system/*.rs").get_json()
    assert body["scope"] == "system/*.rs"
    assert probe(app, body["access_token"], Q, "system/Patient.rs").get_json() == {"client": WILD_ISS}
    assert probe(app, body["access_token"], "system/Claim.c").status_code == 403
    wider = exchange(app, assertion(client_key, iss=WILD_ISS), "system/*.cruds").get_json()
    assert wider["scope"] == "system/*.rs"


def test_v1_scopes(app: Flask, client_key: ClientKey) -> None:
    body = exchange(app, assertion(client_key), "system/Questionnaire.read system/Library.read").get_json()
    assert body["scope"] == "system/Questionnaire.read system/Library.read"
    assert probe(app, body["access_token"], Q, "system/Library.rs").status_code == 200
    assert probe(app, body["access_token"], "system/ValueSet.rs").status_code == 403
    narrowed = exchange(app, assertion(client_key), "system/Questionnaire.*").get_json()
    assert narrowed["scope"] == Q  # v1 "*" is cruds: narrowed to what may be had, in v2 form


def test_resource_types_are_case_insensitive(app: Flask, client_key: ClientKey) -> None:
    asked = "system/questionnaire.rs system/library.rs system/valueset.rs"  # as the DTR text writes them
    body = exchange(app, assertion(client_key, iss=NARROW_ISS), asked).get_json()
    assert body["scope"] == "system/questionnaire.rs"
    assert probe(app, body["access_token"], Q).status_code == 200


def test_permissions_are_narrowed_too(build: Callable[..., Flask], client_key: ClientKey) -> None:
    app = build(clients=[{"iss": TEST_ISS, "jwks": client_key.jwks, "scopes": ["system/Questionnaire.r"]}])
    body = exchange(app, assertion(client_key), Q).get_json()
    assert body["scope"] == "system/Questionnaire.r"
    assert probe(app, body["access_token"], "system/Questionnaire.r").status_code == 200
    assert probe(app, body["access_token"], Q).status_code == 403


def test_scope_grammar() -> None:
    assert scopes.parse("system/Questionnaire.rs") == scopes.Scope("Questionnaire", frozenset("rs"), Q)
    assert scopes.parse("system/*.read") == scopes.Scope("*", frozenset("rs"), "system/*.read")
    assert scopes.parse("system/Claim.write") == scopes.Scope("Claim", frozenset("cud"), "system/Claim.write")
    for bad in ("system/Questionnaire.sr", "system/Questionnaire.", "patient/Patient.rs", "system/Q.rs?a=b", "rs"):
        assert scopes.parse(bad) is None, bad
    allowed = [s for s in map(scopes.parse, ["system/*.rs", "system/Claim.c"]) if s]
    assert scopes.grant(["system/*.cruds"], allowed) == ["system/*.rs", "system/Claim.c"]
    allowed = [s for s in map(scopes.parse, ["system/*.rs", "system/Questionnaire.rs", "system/Library.r"]) if s]
    assert scopes.grant(["system/*.rs"], allowed) == ["system/*.rs"], "a wildcard grant covers the types it includes"
    allowed = [s for s in map(scopes.parse, ["system/Questionnaire.r", "system/Questionnaire.s"]) if s]
    assert scopes.grant([Q], allowed) == [Q]
    q = scopes.parse(Q)
    assert q is not None
    assert scopes.covers([s for s in map(scopes.parse, ["system/*.r", "system/questionnaire.s"]) if s], q)
    assert not scopes.covers([s for s in map(scopes.parse, ["system/Library.rs"]) if s], q)


# --- access tokens at FHIR endpoints ---------------------------------------------------------------------------------


def test_no_token_is_401_with_a_bearer_challenge(app: Flask) -> None:
    resp = probe(app, None, Q)
    assert_401(resp, challenge="")
    assert "error=" not in resp.headers["WWW-Authenticate"]
    assert_401(probe(app, None, Q, header="Basic dXNlcjpwYXNz"), challenge="")


def test_expired_access_token(app: Flask, client_key: ClientKey, clock: Clock) -> None:
    token = access(app, client_key)
    clock.advance(299)
    assert probe(app, token, Q).status_code == 200
    clock.advance(1)
    assert_401(probe(app, token, Q))


def test_forged_access_tokens(build: Callable[..., Flask], app: Flask, client_key: ClientKey) -> None:
    token = access(app, client_key, "system/Library.rs")
    claims = jwt.decode(token, options={"verify_signature": False})
    head, _, sig = token.split(".")
    widened = jwt.encode({**claims, "scope": Q}, "x" * 32, algorithm="HS256", headers={"typ": "at+jwt"})
    rt = app.extensions["cds"]
    forgeries = [
        f"{head}.{widened.split('.')[1]}.{sig}",  # payload changed under the real signature
        jwt.encode({**claims, "scope": Q}, secrets.token_bytes(32), algorithm="HS256", headers={"typ": "at+jwt"}),
        jwt.encode({**claims, "scope": Q}, None, algorithm="none", headers={"typ": "at+jwt"}),
        client_key.token(BASE, client_id=TEST_ISS, scope=Q),  # a client's own ES384 JWT
        # the service's own key, but not an access token / the form link key
        jwt.encode(claims, smart.service_key(rt, "access-token"), algorithm="HS256", headers={"typ": "JWT"}),
        jwt.encode(claims, smart.service_key(rt, "form-link"), algorithm="HS256", headers={"typ": "at+jwt"}),
        jwt.encode(
            {**claims, "aud": "https://other.test"}, smart.service_key(rt, "access-token"), headers={"typ": "at+jwt"}
        ),
        "x" * 9000,
    ]
    for forged in forgeries:
        assert_401(probe(app, forged, "system/Library.rs"))
    good = jwt.encode(claims, smart.service_key(rt, "access-token"), algorithm="HS256", headers={"typ": "at+jwt"})
    assert probe(app, good, "system/Library.rs").status_code == 200, "the forgeries differ from a good token only so"


def test_a_token_of_another_secret_is_refused(
    build: Callable[..., Flask], client_key: ClientKey, tmp_path: Path
) -> None:
    token = access(build(token_secret="a" * 40), client_key)
    assert_401(probe(build(token_secret="b" * 40), token, Q))
    # the configured secret, not the data directory, is what hosts serving one base_url share
    assert probe(build(token_secret="a" * 40, data_dir=str(tmp_path / "other")), token, Q).status_code == 200


def test_a_client_no_longer_trusted_loses_its_tokens(build: Callable[..., Flask], client_key: ClientKey) -> None:
    token = access(build(), client_key, iss=NARROW_ISS)
    assert_401(probe(build(clients=[{"iss": TEST_ISS, "jwks": client_key.jwks}]), token, Q))


def test_a_missing_scope_is_403(app: Flask, client_key: ClientKey) -> None:
    token = access(app, client_key, "system/Library.rs")
    resp = probe(app, token, Q)
    assert resp.status_code == 403
    issue = resp.get_json()["issue"][0]
    assert resp.get_json()["resourceType"] == "OperationOutcome" and issue["code"] == "forbidden"
    assert Q in issue["details"]["text"]
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    assert probe(app, token, "system/Library.rs", Q).status_code == 403, "every scope named is needed"
    assert probe(app, token).get_json() == {"client": TEST_ISS}, "no scope named: a valid token suffices"


def test_auth_not_required_checks_nothing(build: Callable[..., Flask], client_key: ClientKey) -> None:
    app = build(auth_required=False)
    assert probe(app, None, Q).get_json() == {"client": None}
    assert probe(app, "forged", Q).get_json() == {"client": None}
    assert "WWW-Authenticate" not in probe(app, "forged", Q).headers
    # the token endpoint still works (DTR clients always ask), with the same clients
    assert exchange(app, assertion(client_key)).status_code == 200


def test_each_401_carries_its_own_challenge(app: Flask, client_key: ClientKey) -> None:
    """A CDS Hooks 401 names the Bearer scheme too (RFC 7235), and never an earlier answer's error or scope."""
    assert probe(app, access(app, client_key), "system/Claim.cr").status_code == 403  # insufficient_scope
    resp = app.test_client().post("/cds-services/order-sign", json={})
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == f'Bearer realm="{BASE}"'
    resp = app.test_client().post("/cds-services/order-sign", json={}, headers={"Authorization": "Bearer x.y.z"})
    assert resp.headers["WWW-Authenticate"] == f'Bearer realm="{BASE}", error="invalid_token"'


def test_one_verifier_and_key_cache_serve_hooks_and_the_token_endpoint(
    build: Callable[..., Flask], client_key: ClientKey
) -> None:
    from builders import hook_request, med_order

    url = "https://ehr.test/jwks.json"
    app = build(clients=[{"iss": TEST_ISS, "jwks_url": url}])
    verifier = app.extensions["cds"].verifier
    assert app.extensions["cds.smart"] is verifier
    fetched: list[str] = []
    verifier.fetch = lambda u: (fetched.append(u), client_key.jwks)[1]
    hook = client_key.token(f"{BASE}/cds-services/order-sign")
    resp = app.test_client().post(
        "/cds-services/order-sign", json=hook_request([med_order()]), headers={"Authorization": f"Bearer {hook}"}
    )
    assert resp.status_code == 200
    assert exchange(app, assertion(client_key, headers={"jku": url})).status_code == 200
    assert fetched == [url]


# --- discovery -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"])
def test_smart_configuration(app: Flask, path: str) -> None:
    body = app.test_client().get(path).get_json()
    assert body["token_endpoint"] == TOKEN_URL
    assert body["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert body["token_endpoint_auth_signing_alg_values_supported"] == ["ES384", "RS384"]
    assert body["grant_types_supported"] == ["client_credentials"]
    assert set(body["scopes_supported"]) == {
        Q,
        "system/Library.rs",
        "system/ValueSet.rs",
        "system/QuestionnaireResponse.cu",
        "system/Subscription.cruds",
        "system/Claim.cr",
    }
    assert "client-confidential-asymmetric" in body["capabilities"]


# --- the service secret and settings ---------------------------------------------------------------------------------


def test_the_secret_is_made_once_with_mode_0600_and_shared(build: Callable[..., Flask], client_key: ClientKey) -> None:
    first = build()
    path = Path(first.extensions["cds"].config["data_dir"]) / smart.SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 64
    smart._secrets.clear()  # as a freshly started worker would
    token = access(first, client_key)
    assert probe(build(), token, Q).status_code == 200


def test_concurrent_starters_agree_on_one_secret(tmp_path: Path) -> None:
    found: list[bytes] = []
    threads = [threading.Thread(target=lambda: found.append(smart._load_or_create(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8 and len(set(found)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [smart.SECRET_FILE]


def test_a_configured_secret_writes_no_file(build: Callable[..., Flask], tmp_path: Path) -> None:
    build(token_secret="s" * 32)
    assert not (tmp_path / "data" / smart.SECRET_FILE).exists()


@pytest.mark.parametrize(
    "setting, problem",
    [
        ({"token_secret": "short"}, "token_secret"),
        ({"access_token_seconds": 0}, "access_token_seconds"),
        ({"form_link_seconds": -5}, "form_link_seconds"),
    ],
)
def test_bad_settings_stop_startup(build: Callable[..., Flask], setting: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build(**setting)


@pytest.mark.parametrize("value", ["system/Questionnaire.rs", ["system/Questionnaire.rs", "read everything"], [3]])
def test_client_scopes_are_checked(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"clients\[0\].scopes"):
        load_config({"clients": [{"iss": "a", "jwks_url": "https://a/jwks", "scopes": value}]}, environ={})
    cfg = load_config({"clients": [{"iss": "a", "jwks_url": "https://a/jwks", "scopes": ["system/*.read"]}]})
    assert cfg["clients"][0]["scopes"] == ["system/*.read"]


# --- form links ------------------------------------------------------------------------------------------------------

ASSERTION_ID = "00000000-0000-4000-8000-000000000001"


def _token_of(link: str) -> str:
    return link.split("?t=", 1)[1]


def test_a_form_link_is_valid_for_its_assertion(app: Flask) -> None:
    rt = app.extensions["cds"]
    link = form_link(rt, ASSERTION_ID)
    assert link.startswith(f"{BASE}/dtr/{ASSERTION_ID}?t=")
    expires = int(_token_of(link).split(".")[0])
    assert expires == int(FIXED_NOW.timestamp()) + 3600
    check_form_link(rt, ASSERTION_ID, _token_of(link))


def test_a_form_link_expires(app: Flask, clock: Clock) -> None:
    rt = app.extensions["cds"]
    token = _token_of(form_link(rt, ASSERTION_ID))
    clock.advance(3599)
    check_form_link(rt, ASSERTION_ID, token)
    clock.advance(1)
    with pytest.raises(Forbidden) as caught:
        check_form_link(rt, ASSERTION_ID, token)
    assert caught.value.message == EXPIRED and "sign the order again" in EXPIRED
    outcome = to_operation_outcome(caught.value)["issue"][0]
    assert caught.value.http_status == 403 and outcome["code"] == "forbidden"


def test_form_link_lifetime_is_a_setting(build: Callable[..., Flask], clock: Clock) -> None:
    rt = build(form_link_seconds=60).extensions["cds"]
    token = _token_of(form_link(rt, ASSERTION_ID))
    clock.advance(61)
    with pytest.raises(Forbidden):
        check_form_link(rt, ASSERTION_ID, token)


def test_a_form_link_for_another_assertion_is_refused(app: Flask) -> None:
    rt = app.extensions["cds"]
    token = _token_of(form_link(rt, ASSERTION_ID))
    with pytest.raises(Unauthorized) as caught:
        check_form_link(rt, "00000000-0000-4000-8000-000000000002", token)
    assert caught.value.http_status == 401


def test_a_tampered_form_link_is_refused(app: Flask, clock: Clock) -> None:
    rt = app.extensions["cds"]
    token = _token_of(form_link(rt, ASSERTION_ID))
    expires, mac = token.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    later = str(int(expires) + 86400)
    for bad in (
        f"{expires}.{flipped}",
        f"{later}.{mac}",
        f"{expires}.{mac}=",
        f" {token}",
        "",
        None,
        "1.2",
        token[:-1],
    ):
        with pytest.raises(Unauthorized):
            check_form_link(rt, ASSERTION_ID, bad)
    clock.advance(86400 * 2)  # a forged extension is no expiry: still 401 once the real link has expired
    with pytest.raises(Unauthorized):
        check_form_link(rt, ASSERTION_ID, f"{later}.{mac}")


def test_a_form_link_of_another_secret_is_refused(build: Callable[..., Flask]) -> None:
    token = _token_of(form_link(build(token_secret="a" * 32).extensions["cds"], ASSERTION_ID))
    with pytest.raises(Unauthorized):
        check_form_link(build(token_secret="b" * 32).extensions["cds"], ASSERTION_ID, token)


def test_form_link_ids_are_quoted(app: Flask) -> None:
    rt = app.extensions["cds"]
    link = form_link(rt, "a/b?c")
    assert "/dtr/a%2Fb%3Fc?t=" in link
    check_form_link(rt, "a/b?c", _token_of(link))


# --- the CLI ---------------------------------------------------------------------------------------------------------


class _Answer:
    def __init__(self, resp: Any) -> None:
        self.status_code = resp.status_code
        self._body = resp.get_json()

    def json(self) -> Any:
        return self._body


def test_cds_token_access_exchanges_a_demo_assertion(
    build: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import requests

    app = build(demo_client=True, base_url="https://payer.test")
    posted: list[str] = []

    def post(url: str, data: dict[str, str], timeout: float) -> _Answer:
        posted.append(url)
        return _Answer(app.test_client().post(url.removeprefix("https://payer.test"), data=data))

    monkeypatch.setattr(requests, "post", post)
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDS_CONFIG", raising=False)
    assert main(["token", "--access", "--base-url", "https://payer.test", "--scope", "system/Library.rs"]) == 0
    token = capsys.readouterr().out.strip()
    assert posted == ["https://payer.test/auth/token"] and "\n" not in token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["client_id"] == DEMO_ISS and claims["scope"] == "system/Library.rs"
    resp = app.test_client().get(
        "/fhir/_probe", query_string={"need": "system/Library.rs"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.get_json() == {"client": DEMO_ISS}

    monkeypatch.setenv("CDS_BASE_URL", "https://payer.test")  # the config's base_url, and every scope by default
    assert main(["token", "--access"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["scope"] == " ".join(smart.SCOPES)

    assert main(["token", "--access", "--scope", "system/Patient.rs"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "invalid_scope" in out.err


def test_cds_token_access_without_a_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CDS_CONFIG", raising=False)
    assert main(["token", "--access", "--base-url", "http://127.0.0.1:9"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "cannot reach http://127.0.0.1:9/auth/token" in out.err
    assert os.listdir(tmp_path) == ["demo-client-key.pem"]


# --- rate limits (issue 10 item 6) ------------------------------------------------------------------------------------
def exchange_from(app: Flask, address: str, client_assertion: str, scope: str = Q) -> Any:
    data = {
        "grant_type": "client_credentials",
        "client_assertion_type": smart.ASSERTION_TYPE,
        "client_assertion": client_assertion,
        "scope": scope,
    }
    return app.test_client().post("/auth/token", data=data, environ_base={"REMOTE_ADDR": address})


def throttled(resp: Any) -> int:
    """The seconds a 429 of the token endpoint asks the client to wait (its body is the RFC 6749 error shape)."""
    refused(resp, "invalid_request", 429)
    return int(resp.headers["Retry-After"])


def test_tokens_issued_to_one_client_are_limited_per_minute(
    build: Callable[..., Flask], client_key: ClientKey, rsa_key: RsaKey, clock: Clock
) -> None:
    app = build(token_requests_per_minute=3)
    for _ in range(3):
        assert exchange(app, assertion(client_key)).status_code == 200
        clock.advance(10)
    wait = throttled(exchange(app, assertion(client_key)))
    assert wait == 30  # the first of the three was 30 s ago: one more is allowed when it leaves the window
    assert exchange(app, rsa_key.token()).status_code == 200  # another client has its own count
    clock.advance(wait)
    assert exchange(app, assertion(client_key)).status_code == 200


def test_the_count_is_shared_by_every_worker(build: Callable[..., Flask], client_key: ClientKey) -> None:
    """Two apps on one database stand for two gunicorn workers: a client cannot get around the limit by being
    answered by another worker."""
    first, second = build(token_requests_per_minute=2), build(token_requests_per_minute=2)
    assert exchange(first, assertion(client_key)).status_code == 200
    assert exchange(second, assertion(client_key)).status_code == 200
    throttled(exchange(first, assertion(client_key)))
    throttled(exchange(second, assertion(client_key)))


def test_refused_requests_throttle_the_address_not_the_client_they_name(
    build: Callable[..., Flask], client_key: ClientKey, clock: Clock
) -> None:
    """Bad assertions in a client's name from one address cannot lock that client out: the address is throttled,
    and before its assertion is even checked (the good assertion below is still unused afterwards)."""
    app = build(token_refusals_per_minute=3)
    forged = ClientKey("forged")
    for _ in range(3):
        refused(exchange_from(app, "203.0.113.9", assertion(forged)), "invalid_client", 401)
    good = assertion(client_key)
    assert throttled(exchange_from(app, "203.0.113.9", good)) == 60
    assert exchange_from(app, "198.51.100.4", good).status_code == 200  # the client itself, from its own address
    clock.advance(60)
    assert exchange_from(app, "203.0.113.9", assertion(client_key)).status_code == 200


def test_tokens_issued_are_not_refusals(build: Callable[..., Flask], client_key: ClientKey) -> None:
    app = build(token_refusals_per_minute=1)
    for _ in range(3):
        assert exchange_from(app, "198.51.100.4", assertion(client_key)).status_code == 200


def test_zero_turns_a_limit_off(build: Callable[..., Flask], client_key: ClientKey) -> None:
    app = build(token_requests_per_minute=0, token_refusals_per_minute=0)
    for _ in range(40):
        refused(exchange(app, "not-a-jwt"), "invalid_client", 401)
    for _ in range(35):
        assert exchange(app, assertion(client_key)).status_code == 200


def test_behind_a_proxy_the_forwarded_address_is_counted(build: Callable[..., Flask], client_key: ClientKey) -> None:
    app = build(token_refusals_per_minute=1, proxy_hops=1)

    def bad_from(address: str) -> Any:
        data = {"grant_type": "client_credentials", "client_assertion_type": smart.ASSERTION_TYPE}
        data |= {"client_assertion": "not-a-jwt", "scope": Q}
        return app.test_client().post("/auth/token", data=data, headers={"X-Forwarded-For": address})

    refused(bad_from("203.0.113.9"), "invalid_client", 401)
    throttled(bad_from("203.0.113.9"))
    refused(bad_from("198.51.100.4"), "invalid_client", 401)  # another client behind the same proxy


def test_the_request_log_line_names_the_client_of_the_access_token(
    app: Flask, client_key: ClientKey, caplog: pytest.LogCaptureFixture
) -> None:
    from test_request_log import request_lines

    token = access(app, client_key)
    with caplog.at_level(logging.INFO, logger="cds.request"):
        assert probe(app, token, Q).status_code == 200
    (line,) = [line for line in request_lines(caplog) if line["route"] == "/fhir/_probe"]
    assert line["client_id"] == TEST_ISS and token not in caplog.text
