"""Settings, declared once, loaded in layers.

Order (later wins): the defaults below, a TOML file named by ``CDS_CONFIG``, ``CDS_*`` environment variables,
then the mapping handed to :func:`cds.create_app` (tests). Every setting here is documented in README.md; a test
keeps the two in step.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds.constants import DTR_VERSIONS, LOOPBACK_FHIR_SERVERS, LOOPBACK_NETWORKS
from cds.errors import ConfigError
from cds.scopes import parse as parse_scope


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str


DEFAULT_PAYERS: tuple[dict[str, Any], ...] = (
    {
        "id": "cigna",
        "name": "Cigna Healthcare",
        "identifier_system": "urn:cds:payer-id",
        "identifier_value": "cigna",
        "policies": ["cigna-ip0356", "cigna-ip0355", "cigna-1701"],
    },
    {
        "id": "bcbsks",
        "name": "Blue Cross and Blue Shield of Kansas",
        "identifier_system": "urn:cds:payer-id",
        "identifier_value": "bcbsks",
        "policies": ["bcbsks-hemgenix"],
    },
    {
        "id": "ny-pharmacy-109",
        "name": "New York health plan (PHARMACY-109)",
        "identifier_system": "urn:cds:payer-id",
        "identifier_value": "ny-pharmacy-109",
        "policies": ["ph109-gene-therapy"],
    },
)

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "base_url",
        "",
        "Public base URL of this service (JWT `aud` and canonicals derive from it); empty means "
        "`http://{host}:{port}`.",
    ),
    Setting("host", "127.0.0.1", "Address `cds serve` binds."),
    Setting("port", 8080, "Port `cds serve` binds."),
    Setting("workers", 2, "gunicorn worker processes for `cds serve` (one per core is a good start)."),
    Setting("threads", 8, "Threads per gunicorn worker (gthread worker class, keep-alive)."),
    Setting(
        "ehr_calls",
        4,
        "Hook calls per worker that may wait on EHR reads at once (at most `threads` - 1); the other threads keep "
        "serving calls whose prefetch is complete, and a call finding none free is answered without querying.",
    ),
    Setting("data_dir", "./data", "Directory for the embedded SQLite database and the demo signing key."),
    Setting("database_url", "", "SQLAlchemy URL of the store; empty means SQLite at `{data_dir}/cds.sqlite3`."),
    Setting("auth_required", True, "Verify the CDS Hooks JWT on every hook call (401 otherwise)."),
    Setting("discovery_auth_required", False, "Also require the JWT on `GET /cds-services`."),
    Setting(
        "demo_client", True, "Trust a locally generated demo key (`cds token` mints tokens). Turn off in production."
    ),
    Setting(
        "clients",
        [],
        "Trusted CDS clients: list of tables with `iss` and `jwks_url` or inline `jwks`; optional `scopes`, the SMART "
        "scopes the client may be granted at `/auth/token` (default: every scope offered); optional "
        "`org_identifiers`, the PAS sending-system ids whose notifications it may subscribe to (default: none).",
    ),
    Setting("jwt_max_age", 3600, "Seconds a token's `iat` may lie in the past (a `jti` is remembered until `exp`)."),
    Setting("jwt_leeway", 60, "Clock skew tolerated on `exp` and `iat`, in seconds."),
    Setting("jwks_cache_seconds", 300, "How long a JWK Set fetched from `jwks_url` is cached."),
    Setting(
        "token_secret",
        "",
        "Secret (at least 32 characters) that signs SMART access tokens and form links (HMAC-SHA256); empty means a "
        "random one created once in `{data_dir}/token-secret` (mode 0600), shared by every worker.",
    ),
    Setting("access_token_seconds", 300, "Lifetime of a SMART access token issued by `POST /auth/token`."),
    Setting(
        "token_requests_per_minute",
        30,
        "Access tokens `POST /auth/token` issues to one client per minute, counted by every worker together (429 "
        "with `Retry-After` above; a client should reuse its token until it expires). 0 turns the limit off.",
    ),
    Setting(
        "proxy_hops",
        0,
        "Reverse proxies in front of the service that append to `X-Forwarded-For` (0: none, the peer address is the "
        "client's). The client address is what refused token requests are counted by; never trust more hops than "
        "you run.",
    ),
    Setting(
        "token_refusals_per_minute",
        20,
        "Refused token requests (bad assertion, unknown client, wrong scope) accepted from one network address per "
        "minute before every request from it is answered 429 until the minute has passed. 0 turns the limit off.",
    ),
    Setting("form_link_seconds", 3600, "Lifetime of the link to a coverage assertion's form page (`/dtr/{id}?t=...`)."),
    Setting("fhir_connect_timeout", 0.5, "Seconds to connect to the EHR FHIR server when prefetch is missing."),
    Setting("fhir_read_timeout", 1.5, "Seconds to wait for an EHR FHIR server response."),
    Setting(
        "fhir_total_timeout",
        3.0,
        "Seconds all EHR reads of one hook call may take together: a hard deadline, reads in flight are cut.",
    ),
    Setting("fhir_max_response_bytes", 4_000_000, "Largest EHR FHIR response read; a larger one fails that read."),
    Setting(
        "fhir_servers",
        list(LOOPBACK_FHIR_SERVERS),
        "FHIR servers a call with no verified client (`auth_required = false`) may name in `fhirServer`; each "
        "client's own list is its `fhir_servers` in `[[clients]]`. A port `*` matches any port.",
    ),
    Setting("max_request_bytes", 5_000_000, "Largest request body accepted (413 above)."),
    Setting(
        "payers",
        list(DEFAULT_PAYERS),
        "Payer registry: `id`, `name`, `identifier_system`, `identifier_value`, `policies`.",
    ),
    Setting("policy_dir", "", "Directory of policy folders; empty means the policies shipped in `policies/`."),
    Setting(
        "dtr_version",
        "2.2.0",
        "DTR shape of `$questionnaire-package` output and prefilled answers: `2.2.0` (`packagebundle`, "
        "`qr-coverage`, `auto-server`), or `2.0.1` (`PackageBundle`, `qr-context`, `auto`: what Inferno's DTR payer "
        "suite validates).",
    ),
    Setting(
        "dtr_adaptive",
        False,
        "`$questionnaire-package` returns adaptive forms (an empty `dtr-questionnaire-adapt-search` Questionnaire, "
        "answered through `Questionnaire/$next-question`) instead of the standard ones.",
    ),
    Setting(
        "reviewers",
        [],
        "Clinical reviewers who may sign in to `/review`: list of tables with `username`, `name` and `password_hash` "
        "(scrypt or pbkdf2, made by `cds reviewer hash`).",
    ),
    Setting("review_session_seconds", 28800, "Lifetime of a reviewer's session from sign-in, however active."),
    Setting(
        "review_signin_failures_per_address",
        5,
        "Failed reviewer sign-ins a minute for one username from one network address; then sign-in for that username "
        "from that address is refused (429) until the minute has passed. 0 turns the limit off.",
    ),
    Setting(
        "review_signin_failures_per_user",
        30,
        "Failed reviewer sign-ins a minute for one username from all addresses together; then sign-in for that "
        "username is refused from everywhere until the minute has passed (many addresses guess no faster than "
        "this). 0 turns the limit off.",
    ),
    Setting(
        "notify_delivery",
        True,
        "Run the PAS notification delivery worker (a thread in each `cds serve` worker process) that sends the "
        "outbox: Subscription handshakes and event notifications.",
    ),
    Setting("notify_poll_seconds", 1.0, "Seconds the delivery worker waits between looks at the outbox when idle."),
    Setting(
        "notify_max_attempts",
        12,
        "Attempts to deliver one notification (exponential backoff with jitter, 2 s doubling up to 10 min) before "
        "it is given up and its subscription set to `error`.",
    ),
    Setting(
        "notify_timeout_seconds",
        5.0,
        "Seconds one notification POST may take in all (connect, send, answer); the connection is cut after.",
    ),
    Setting(
        "notify_allowed_networks",
        list(LOOPBACK_NETWORKS),
        "Networks (CIDR) beyond the public internet that notifications may be sent to. A subscriber's endpoint is "
        "resolved when it is sent to, and private, link-local (cloud metadata), shared and reserved addresses are "
        "refused unless listed here. The default admits this machine's loopback (local testing, Inferno on the same "
        "host): set `[]` in production, or list a partner network you route to.",
    ),
    Setting("bench_echo", False, "Expose `POST /_echo`, a trivial JSON echo route the benchmark compares against."),
    Setting("log_level", "INFO", "Python logging level. Logs never carry patient data or tokens."),
    Setting(
        "log_format",
        "json",
        "`json`: every log line is one JSON object (the request lines, the app's and gunicorn's); `text`: one line "
        "of plain text each.",
    ),
    Setting(
        "request_log",
        True,
        "One line per request on the `cds.request` logger (route template, method, status, duration, correlation "
        "id; never paths' values, queries, headers or bodies), at INFO whatever `log_level`.",
    ),
    Setting(
        "request_log_probes",
        True,
        "Also write the request lines of `/healthz`, `/readyz` and `/metrics` that succeeded (a load balancer or "
        "Prometheus calling every few seconds); their failures are written either way.",
    ),
    Setting("metrics", True, "Serve Prometheus metrics at `GET /metrics` and count requests, decisions and EHR reads."),
    Setting(
        "metrics_token",
        "",
        "When set, `GET /metrics` needs `Authorization: Bearer <metrics_token>` (401 otherwise); empty: open.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    values: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    @property
    def base_url(self) -> str:
        url = str(self.values["base_url"]).rstrip("/")
        return url or f"http://{self.values['host']}:{self.values['port']}"

    @property
    def database_url(self) -> str:
        url = str(self.values["database_url"])
        if url:
            return url
        return f"sqlite:///{Path(self.values['data_dir']).resolve() / 'cds.sqlite3'}"


def _coerce(name: str, raw: Any, source: str) -> Any:
    default = _BY_NAME[name].default
    if isinstance(raw, str) and not isinstance(default, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            if isinstance(default, bool):
                low = raw.strip().lower()
                if low in {"true", "yes", "on", "1"}:
                    return True
                if low in {"false", "no", "off", "0"}:
                    return False
            raise ConfigError(
                f"{source}: setting '{name}' has value {raw!r}, not a valid {type(default).__name__}"
            ) from None
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise ConfigError(f"{source}: setting '{name}' must be true or false, got {raw!r}")
    elif isinstance(default, int | float) and not isinstance(default, bool):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{source}: setting '{name}' must be a number, got {raw!r}")
        raw = type(default)(raw) if isinstance(default, float) else raw
    elif isinstance(default, list) and not isinstance(raw, list):
        raise ConfigError(f"{source}: setting '{name}' must be a list, got {type(raw).__name__}")
    elif isinstance(default, str) and not isinstance(raw, str):
        raise ConfigError(f"{source}: setting '{name}' must be a string, got {raw!r}")
    return raw


def _merge(target: dict[str, Any], layer: Mapping[str, Any], source: str) -> None:
    for key, raw in layer.items():
        if key not in _BY_NAME:
            raise ConfigError(f"{source}: unknown setting '{key}'")
        target[key] = _coerce(key, raw, source)


def load_config(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, the TOML file, the environment and ``overrides``.

    :raise ConfigError: unknown setting, wrong type, or unreadable file (message names the source).
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    path = env.get("CDS_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                _merge(values, tomllib.load(fh), path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration file ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    env_layer = {key[4:].lower(): value for key, value in env.items() if key.startswith("CDS_") and key != "CDS_CONFIG"}
    _merge(values, env_layer, "environment")
    if overrides:
        _merge(values, overrides, "create_app(config)")
    _check_clients(values["clients"])
    _check_servers("fhir_servers", values["fhir_servers"])
    _check_payers(values["payers"])
    _check_networks("notify_allowed_networks", values["notify_allowed_networks"])
    if values["log_format"] not in ("json", "text"):
        raise ConfigError(f"log_format is json or text, not {values['log_format']!r}")
    if values["dtr_version"] not in DTR_VERSIONS:
        raise ConfigError(f"dtr_version is one of {', '.join(DTR_VERSIONS)}, not {values['dtr_version']!r}")
    return Config(values)


def _check_servers(where: str, servers: Any) -> None:
    if not isinstance(servers, list) or not all(
        isinstance(u, str) and u.startswith(("http://", "https://")) for u in servers
    ):
        raise ConfigError(f"{where}: must be a list of http(s) base URLs")


def _check_networks(where: str, networks: list[Any]) -> None:
    for n in networks:
        try:
            ipaddress.ip_network(n, strict=False)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: {str(n)[:64]!r} is not a network in CIDR notation (e.g. 10.1.0.0/16)"
            ) from None


def _check_clients(clients: list[Any]) -> None:
    for i, client in enumerate(clients):
        where = f"clients[{i}]"
        if not isinstance(client, dict) or not client.get("iss"):
            raise ConfigError(f"{where}: each client needs an 'iss'")
        if not client.get("jwks_url") and not client.get("jwks"):
            raise ConfigError(f"{where}: client '{client['iss']}' needs 'jwks_url' or 'jwks'")
        if "fhir_servers" in client:
            _check_servers(f"{where}.fhir_servers", client["fhir_servers"])
        orgs = client.get("org_identifiers")
        if orgs is not None and not (isinstance(orgs, list) and all(isinstance(x, str) and x for x in orgs)):
            raise ConfigError(f"{where}.org_identifiers: must be a list of sending-system ids (strings)")
        scopes = client.get("scopes")
        if scopes is not None and not (isinstance(scopes, list) and all(_is_scope(x) for x in scopes)):
            raise ConfigError(f"{where}.scopes: must be a list of SMART system scopes, e.g. 'system/Questionnaire.rs'")


def _is_scope(value: Any) -> bool:
    return isinstance(value, str) and parse_scope(value) is not None


def _check_payers(payers: list[Any]) -> None:
    seen: set[tuple[str, str]] = set()
    for i, payer in enumerate(payers):
        where = f"payers[{i}]"
        if not isinstance(payer, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in ("id", "name", "identifier_system", "identifier_value"):
            if not payer.get(key):
                raise ConfigError(f"{where}: missing '{key}'")
        if not isinstance(payer.get("policies", []), list):
            raise ConfigError(f"{where}: 'policies' must be a list of policy ids")
        ident = (payer["identifier_system"], payer["identifier_value"])
        if ident in seen:
            raise ConfigError(f"{where}: identifier {ident[0]}|{ident[1]} is used by two payers")
        seen.add(ident)
