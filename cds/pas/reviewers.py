"""Clinical reviewers: their accounts, sign-in, and their sessions on the reviewer queue (:mod:`cds.pas.review`).

Accounts come from the ``reviewers`` setting, a list of tables ``{username, name, password_hash}``; the hash is
werkzeug's ``scrypt:32768:8:1$salt$hex`` (or ``pbkdf2:sha256:...``), made by ``cds reviewer hash`` from a password
read on stdin. Checking a password always runs the KDF once: a wrong password and an unknown user take the same time.
Failed sign-ins are counted by :mod:`cds.ratelimit` (in the store: every worker sees them), per username and network
address and per username alone: after ``review_signin_failures_per_address`` failures from one address in
:data:`FAILURE_WINDOW` seconds, sign-in for that username from that address is refused (429) until the window has
passed, without checking the password; after ``review_signin_failures_per_user`` from any addresses, from every
address. So one address guessing a reviewer's password does not keep the reviewer out, and many addresses together
guess no faster.

A session is a random token in a cookie (HttpOnly, SameSite=Strict, Secure when ``base_url`` is https, path
``/review``). The store keeps only its HMAC (keyed from the service secret, purpose ``review-session``), the
username, a random CSRF token and when it was made and expires (``review_session_seconds`` after sign-in, however
active). Signing in makes a new token (no fixation); signing out deletes the row.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import Column, DateTime, String, Table, delete, insert, select
from werkzeug.security import check_password_hash, generate_password_hash

from cds import ratelimit
from cds.errors import ConfigError
from cds.pas.store import audit
from cds.runtime import Runtime, as_utc
from cds.smart import service_key
from cds.store import metadata

FAILURE_WINDOW = 60  # seconds
UNKNOWN_ACTOR = "(unknown username)"
HASH_METHOD = "scrypt"  # werkzeug: scrypt:32768:8:1
ACCEPTED_METHODS = ("scrypt:", "pbkdf2:")

review_sessions = Table(
    "review_sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),  # HMAC-SHA256 of the cookie's token, hex
    Column("username", String(128), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)


@dataclass(frozen=True)
class Reviewer:
    username: str
    name: str
    password_hash: str


@dataclass(frozen=True)
class Session:
    reviewer: Reviewer
    csrf: str
    created_at: datetime
    expires_at: datetime


# --- accounts ---------------------------------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    if not password:
        raise ValueError("the password is empty")
    return generate_password_hash(password, method=HASH_METHOD)


def verify_password(password_hash: str, password: str) -> bool:
    """One KDF run, compared in constant time (werkzeug uses hmac.compare_digest)."""
    return check_password_hash(password_hash, password)


@cache
def _dummy_hash() -> str:
    """What an unknown username is checked against, so that it costs what a wrong password costs."""
    return hash_password(secrets.token_hex(16))


def accounts(config: Any) -> dict[str, Reviewer]:
    """The configured reviewers by username (lower case). :raise ConfigError: a table that is not an account."""
    found: dict[str, Reviewer] = {}
    for i, entry in enumerate(config["reviewers"]):
        where = f"reviewers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table with username, name and password_hash")
        for key in ("username", "name", "password_hash"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ConfigError(f"{where}: missing '{key}'")
        if not entry["password_hash"].startswith(ACCEPTED_METHODS):
            raise ConfigError(f"{where}: password_hash is not a scrypt or pbkdf2 hash (make one: cds reviewer hash)")
        username = entry["username"].strip().lower()
        if username in found:
            raise ConfigError(f"{where}: username '{username}' is configured twice")
        found[username] = Reviewer(username, entry["name"], entry["password_hash"])
    return found


def _mac(rt: Runtime, purpose: str, value: str) -> str:
    return hmac.new(service_key(rt, purpose), value.encode(), hashlib.sha256).hexdigest()


def authenticate(
    rt: Runtime, reviewers: dict[str, Reviewer], username: str, password: str, *, address: str = ""
) -> Reviewer | None:
    """The reviewer whose password this is, else None (a failure is counted).

    Refusals are audited (``signin-refused``, ``signin-throttled``) with the network ``address``; the actor is the
    username only when it is a reviewer's (what someone typed into the field may be a password).

    :raise ratelimit.RateLimited: too many failures for this username lately, from this address or from all of them;
        the password was not checked."""
    now = rt.clock()
    name = username.strip().lower()
    # the username is keyed (HMAC) before the limiter digests it: what was typed into the field may be a password
    counted = [
        (_limit(rt, "address"), _mac(rt, "review-signin", f"{name}\n{address}")),
        (_limit(rt, "user"), _mac(rt, "review-signin", name)),
    ]
    reviewer = reviewers.get(name)
    actor = reviewer.username if reviewer else UNKNOWN_ACTOR
    try:
        for limit, key in counted:
            ratelimit.check(rt, limit, key, "Too many failed sign-ins for this username; wait a minute and try again")
    except ratelimit.RateLimited:
        with rt.store.engine.begin() as conn:
            audit(conn, kind="signin-throttled", actor=actor, subject=None, at=now, detail={"address": address})
        raise
    # one KDF run whoever asks: an unknown username costs what a wrong password costs
    ok = verify_password(reviewer.password_hash if reviewer else _dummy_hash(), password)
    if ok and reviewer is not None:
        return reviewer
    for limit, key in counted:
        ratelimit.record(rt, limit, key)
    with rt.store.engine.begin() as conn:
        audit(conn, kind="signin-refused", actor=actor, subject=None, at=now, detail={"address": address})
    return None


def failure_limit(rt: Runtime, per: str) -> int:
    """Failed sign-ins a minute per username and ``address``, or per ``user`` from any (0: no limit)."""
    return int(rt.config[f"review_signin_failures_per_{per}"])


def _limit(rt: Runtime, per: str) -> ratelimit.Limit:
    return ratelimit.Limit(f"review-signin-{per}", failure_limit(rt, per), FAILURE_WINDOW)


# --- sessions ---------------------------------------------------------------------------------------------------------
def open_session(rt: Runtime, reviewer: Reviewer, *, address: str = "") -> tuple[str, Session]:
    """A new session: the cookie's token, and the session (its CSRF token). Audited as ``signin``."""
    now = as_utc(rt.clock())
    token = secrets.token_urlsafe(32)
    session = Session(reviewer, secrets.token_urlsafe(32), now, now + timedelta(seconds=lifetime(rt)))
    with rt.store.engine.begin() as conn:
        conn.execute(delete(review_sessions).where(review_sessions.c.expires_at <= now))
        conn.execute(
            insert(review_sessions).values(
                token_hash=_mac(rt, "review-session", token),
                username=reviewer.username,
                csrf=session.csrf,
                created_at=now,
                expires_at=session.expires_at,
            )
        )
        audit(conn, kind="signin", actor=reviewer.username, subject=None, at=now, detail={"address": address})
    return token, session


def lifetime(rt: Runtime) -> int:
    return int(rt.config["review_session_seconds"])


def find_session(rt: Runtime, reviewers: dict[str, Reviewer], token: str | None) -> Session | None:
    """The live session of a cookie's token; None when there is none, it expired, or its reviewer was removed."""
    if not token or len(token) > 256:
        return None
    with rt.store.engine.connect() as conn:
        row = (
            conn.execute(
                select(review_sessions).where(review_sessions.c.token_hash == _mac(rt, "review-session", token))
            )
            .mappings()
            .first()
        )
    if row is None:
        return None
    expires_at = as_utc(row["expires_at"])
    reviewer = reviewers.get(row["username"])
    if reviewer is None or expires_at <= as_utc(rt.clock()):
        return None
    return Session(reviewer, row["csrf"], as_utc(row["created_at"]), expires_at)


def close_session(rt: Runtime, token: str | None, *, username: str = UNKNOWN_ACTOR, address: str = "") -> None:
    """End the session of a cookie's token (audited as ``signout`` when there was one)."""
    if token:
        with rt.store.engine.begin() as conn:
            gone = conn.execute(
                delete(review_sessions).where(review_sessions.c.token_hash == _mac(rt, "review-session", token))
            ).rowcount
            if gone:
                audit(conn, kind="signout", actor=username, subject=None, at=rt.clock(), detail={"address": address})


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


# --- the sign-in form's CSRF token (no session yet) -------------------------------------------------------------------
def signin_nonce() -> str:
    return secrets.token_urlsafe(24)


def signin_token(rt: Runtime, nonce: str) -> str:
    """The sign-in form's hidden field for the nonce in its cookie (double submit, MACed so a forged cookie fails)."""
    return _mac(rt, "review-signin-form", nonce)


def signin_token_ok(rt: Runtime, nonce: str | None, given: str | None) -> bool:
    return bool(nonce) and csrf_ok(signin_token(rt, nonce or ""), given)
