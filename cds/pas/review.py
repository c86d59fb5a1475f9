"""The reviewer queue: a payer's clinical reviewer decides the PAS requests the policy did not settle.

Pages (HTML, no inline script or style, ``Cache-Control: no-store``): ``GET /review`` the pended requests by due
time (CMS-0057-F: 72 h expedited, 7 calendar days standard; overdue ones flagged), ``GET /review/requests/{id}`` one
request criterion by criterion with its evidence, the submitted answers and documents and the current response, and
its decision form (``POST /review/requests/{id}/decision``: approve with a period end, modify the quantity or the
period, deny with a reason). ``GET``/``POST /review/signin``, ``POST /review/signout``.

JSON API (the same session cookie only; every POST needs the session's CSRF token in ``X-CSRF-Token``):
``GET /review/api/session`` (who, the CSRF token, when it expires), ``GET /review/api/requests?status=pended``,
``GET /review/api/requests/{id}``, ``POST /review/api/requests/{id}/decision`` with
``{"action": "approve"|"modify"|"deny", "reason": ..., "period_end": "YYYY-MM-DD", "quantity": n}``. Errors are
OperationOutcomes, as everywhere in this service; the pages show theirs in the page.

Sessions and CSRF: :mod:`cds.pas.reviewers`. The decision itself (what it does to the response, who and when,
the notification) is :func:`cds.pas.service.decide`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request, url_for
from flask.sansio.blueprints import BlueprintSetupState

from cds import jsonsafe, ratelimit
from cds.dtr.page import static_file
from cds.errors import (
    CdsError,
    ClientError,
    ConfigError,
    Forbidden,
    InvalidRequest,
    MalformedJson,
    NotFound,
    Unauthorized,
    UnsupportedMedia,
    to_operation_outcome,
)
from cds.pas import reviewers
from cds.pas.reviewers import Reviewer, Session
from cds.runtime import current

bp = Blueprint("review", __name__, url_prefix="/review")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "review"
OWN_ASSETS = {"review.js": "text/javascript", "review.css": "text/css"}
SESSION_COOKIE = "cds_review"
SIGNIN_COOKIE = "cds_review_signin"
CSRF_HEADER = "X-CSRF-Token"
ACTIONS = ("approve", "modify", "deny")
OPEN = ("pended", "partial")  # a request a reviewer still decides (cds.pas.store.OPEN)
CODES = {"A1": "certified", "A3": "denied", "A4": "pended", "A6": "modified", "C": "cancelled"}  # X12 306
MAX_REASON = 2000

PAGE_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)


# --- setup and plumbing -------------------------------------------------------------------------------------------
@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    rt = state.app.extensions["cds"]
    state.app.extensions["cds.reviewers"] = reviewers.accounts(rt.config)  # a bad account stops the start
    if reviewers.lifetime(rt) < 60:
        raise ConfigError("review_session_seconds: must be at least 60")
    for per in ("address", "user"):
        if reviewers.failure_limit(rt, per) < 0:
            raise ConfigError(f"review_signin_failures_per_{per}: must be 0 (no limit) or more")


def _accounts() -> dict[str, Reviewer]:
    found: dict[str, Reviewer] = current_app.extensions["cds.reviewers"]
    return found


def _service() -> ModuleType:
    """The PAS service (imported when first used: this module does not depend on its import order)."""
    return importlib.import_module("cds.pas.service")


def _secure() -> bool:
    return current().base_url.startswith("https://")


def _private(resp: Response) -> Response:
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _json(body: Any, status: int = 200) -> Response:
    text = json.dumps(body, separators=(",", ":"), default=_jsonable)
    return _private(Response(text, status=status, mimetype="application/json"))


def _page(template: str, status: int = 200, **context: Any) -> Response:
    html = render_template(template, asset=_asset_url, when=when, **context)
    resp = _private(Response(html, status=status, mimetype="text/html"))
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    return resp


def _asset_url(name: str) -> str:
    try:
        version = hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
    except OSError:
        version = "missing"
    return url_for("review.asset", name=name, v=version)


def when(value: Any) -> str:
    """A moment as the pages show it: ``2026-11-23 15:00 UTC``."""
    if isinstance(value, str):
        text = value
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            return text
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return str(value.strftime("%Y-%m-%d %H:%M UTC"))
    if isinstance(value, date):
        return value.isoformat()
    return "" if value is None else str(value)


def _session() -> Session | None:
    return reviewers.find_session(current(), _accounts(), request.cookies.get(SESSION_COOKIE))


def _set_cookie(resp: Response, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(name, value, max_age=max_age, path="/review", secure=_secure(), httponly=True, samesite="Strict")


def _clear_cookie(resp: Response, name: str) -> None:
    resp.delete_cookie(name, path="/review", secure=_secure(), httponly=True, samesite="Strict")


def _see_other(target: str) -> Response:
    return _private(Response(status=303, headers={"Location": target}))


# --- sign-in and sign-out -------------------------------------------------------------------------------------------
def _signin_page(status: int = 200, problem: str | None = None, username: str = "") -> Response:
    nonce = reviewers.signin_nonce()
    resp = _page(
        "review_signin.html",
        status,
        problem=problem,
        username=username,
        csrf=reviewers.signin_token(current(), nonce),
        configured=bool(_accounts()),
    )
    _set_cookie(resp, SIGNIN_COOKIE, nonce, 3600)
    return resp


@bp.get("/signin")
def signin_form() -> Response:
    if _session() is not None:
        return _see_other(url_for("review.queue"))
    return _signin_page()


@bp.post("/signin")
def signin() -> Response:
    rt = current()
    username = (request.form.get("username") or "").strip()[:128]
    password = request.form.get("password") or ""
    if not reviewers.signin_token_ok(rt, request.cookies.get(SIGNIN_COOKIE), request.form.get("csrf")):
        return _signin_page(403, "The sign-in form had expired. Sign in again.", username)
    if not username or not password:
        return _signin_page(400, "Enter your username and password.", username)
    try:
        reviewer = reviewers.authenticate(rt, _accounts(), username, password[:1024], address=_address())
    except ratelimit.RateLimited as exc:
        refused = _signin_page(exc.http_status, exc.message, username)
        refused.headers["Retry-After"] = str(exc.retry_after)
        return refused
    if reviewer is None:
        return _signin_page(401, "The username or password is not right.", username)
    token, _ = reviewers.open_session(rt, reviewer, address=_address())
    resp = _see_other(url_for("review.queue"))
    _set_cookie(resp, SESSION_COOKIE, token, reviewers.lifetime(rt))
    _clear_cookie(resp, SIGNIN_COOKIE)
    return resp


def _address() -> str:
    """The client's network address, for the audit of sign-ins (behind proxies, see the ``proxy_hops`` setting)."""
    return (request.remote_addr or "")[:64]


@bp.post("/signout")
def signout() -> Response:
    session = _session()
    if session is not None:
        if not reviewers.csrf_ok(session.csrf, request.form.get("csrf")):
            raise Forbidden("The form's CSRF token is missing or wrong")
        reviewers.close_session(
            current(), request.cookies.get(SESSION_COOKIE), username=session.reviewer.username, address=_address()
        )
    resp = _see_other(url_for("review.signin_form"))
    _clear_cookie(resp, SESSION_COOKIE)
    return resp


# --- pages --------------------------------------------------------------------------------------------------------
def _page_session() -> Session | Response:
    session = _session()
    if session is None:
        resp = _see_other(url_for("review.signin_form"))
        if request.cookies.get(SESSION_COOKIE):
            _clear_cookie(resp, SESSION_COOKIE)
        return resp
    return session


@bp.get("/")
@bp.get("")
def queue() -> Response:
    session = _page_session()
    if isinstance(session, Response):
        return session
    decided = request.args.get("decided")
    return _page(
        "review_queue.html",
        session=session,
        requests=_service().pended(current()),
        decided=decided[:64] if decided else None,
    )


def _answers(items: Any, depth: int = 0) -> list[dict[str, Any]]:
    """A QuestionnaireResponse's items as rows: question, answers as text, nesting depth."""
    rows: list[dict[str, Any]] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, Mapping):
            continue
        shown = [_answer_text(a) for a in item.get("answer") or () if isinstance(a, Mapping)]
        rows.append(
            {
                "linkId": item.get("linkId", ""),
                "text": item.get("text") or item.get("linkId", ""),
                "answers": shown,
                "depth": depth,
            }
        )
        rows.extend(_answers(item.get("item"), depth + 1))
        for answer in item.get("answer") or ():
            if isinstance(answer, Mapping):
                rows.extend(_answers(answer.get("item"), depth + 1))
    return rows


def _answer_text(answer: Mapping[str, Any]) -> str:
    for key, value in answer.items():
        if not key.startswith("value"):
            continue
        if isinstance(value, bool):
            return "Yes" if value else "No"
        if isinstance(value, Mapping):
            if key == "valueCoding":
                return str(value.get("display") or value.get("code") or "")
            if key == "valueQuantity":
                return f"{value.get('value', '')} {value.get('unit') or value.get('code') or ''}".strip()
            if key == "valueReference":
                return str(value.get("display") or value.get("reference") or "")
            if key == "valueAttachment":
                return str(value.get("title") or value.get("url") or "attachment")
            return json.dumps(value)
        return str(value)
    return ""


def _resources(entries: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """The view's ``answers`` / ``documents``: ``{reference, resource}`` pairs (a resource not in the Bundle is {})."""
    out = []
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, Mapping):
            resource = entry.get("resource") if "reference" in entry else entry
            out.append((str(entry.get("reference") or ""), resource if isinstance(resource, Mapping) else {}))
    return out


def _questionnaire_responses(view: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The submitted answers as the page lists them: one block per QuestionnaireResponse (a DTR QR Bundle's too)."""
    blocks = []
    for reference, resource in _resources(view.get("answers")):
        found = [resource]
        if resource.get("resourceType") == "Bundle":
            found = [
                e["resource"]
                for e in resource.get("entry") or ()
                if isinstance(e, Mapping)
                and isinstance(e.get("resource"), Mapping)
                and e["resource"].get("resourceType") == "QuestionnaireResponse"
            ]
        for qr in found:
            blocks.append(
                {
                    "reference": reference,
                    "questionnaire": str(qr.get("questionnaire") or ""),
                    "rows": _answers(qr.get("item")),
                }
            )
    return blocks


def _documents(view: Mapping[str, Any]) -> list[dict[str, str]]:
    shown = []
    for reference, doc in _resources(view.get("documents")):
        content = doc.get("content")
        first = content[0] if isinstance(content, list) and content and isinstance(content[0], Mapping) else {}
        found_attachment, found_kind = first.get("attachment"), doc.get("type")
        attachment: Mapping[str, Any] = found_attachment if isinstance(found_attachment, Mapping) else {}
        kind: Mapping[str, Any] = found_kind if isinstance(found_kind, Mapping) else {}
        shown.append(
            {
                "reference": reference,
                "title": str(doc.get("description") or kind.get("text") or attachment.get("title") or reference),
                "type": str(attachment.get("contentType") or doc.get("resourceType") or ""),
                "date": str(doc.get("date") or ""),
            }
        )
    return shown


def _request_page(
    session: Session, request_id: str, *, status: int = 200, problem: str | None = None, form: Any = None
) -> Response:
    view = _service().request_view(current(), request_id)
    return _page(
        "review_request.html",
        status,
        session=session,
        request_id=request_id,
        view=view,
        answers=_questionnaire_responses(view),
        documents=_documents(view),
        response_json=json.dumps(view.get("response"), indent=2, default=_jsonable),
        problem=problem,
        form=form or {},
        today=current().clock().date().isoformat(),
        open=view.get("status") in OPEN,
        codes=CODES,
    )


@bp.get("/requests/<request_id>")
def request_page(request_id: str) -> Response:
    session = _page_session()
    if isinstance(session, Response):
        return session
    try:
        return _request_page(session, request_id)
    except NotFound as exc:
        return _page(
            "review_queue.html", 404, session=session, requests=_service().pended(current()), problem=exc.message
        )


@bp.post("/requests/<request_id>/decision")
def decide_form(request_id: str) -> Response:
    session = _page_session()
    if isinstance(session, Response):
        return session
    if not reviewers.csrf_ok(session.csrf, request.form.get("csrf")):
        raise Forbidden("The form's CSRF token is missing or wrong")
    form = {k: request.form.get(k, "") for k in ("action", "reason", "period_end", "quantity")}
    try:
        _decide(session, request_id, form)
    except ClientError as exc:
        return _request_page(session, request_id, status=exc.http_status, problem=exc.message, form=form)
    return _see_other(url_for("review.queue", decided=request_id))


def _decide(session: Session, request_id: str, given: Mapping[str, Any]) -> Any:
    """Check the decision's shape and hand it to the PAS service (which checks its meaning)."""
    action = given.get("action")
    if action not in ACTIONS:
        raise InvalidRequest("Choose approve, modify or deny", expression="action")
    reason = given.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise InvalidRequest("reason is text", expression="reason")
    reason = (reason or "").strip()[:MAX_REASON] or None
    period_end = _date(given.get("period_end"))
    quantity = _quantity(given.get("quantity"))
    if action == "deny" and not reason:
        raise InvalidRequest("A denial needs a reason", expression="reason")
    decide: Callable[..., Any] = _service().decide
    return decide(
        current(),
        request_id,
        action=action,
        reviewer=session.reviewer.username,
        reason=reason,
        period_end=period_end,
        quantity=quantity,
    )


def _date(value: Any) -> date | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise InvalidRequest("period_end is a date (YYYY-MM-DD)", expression="period_end")
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequest(f"period_end '{value[:20]}' is not a date (YYYY-MM-DD)", expression="period_end") from None


def _quantity(value: Any) -> float | None:
    if value in (None, ""):
        return None
    if isinstance(value, bool):
        raise InvalidRequest("quantity is a number", expression="quantity")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest("quantity is a number", expression="quantity") from None
    if not number > 0 or number > 1e9:
        raise InvalidRequest("quantity is a positive number", expression="quantity")
    return number


# --- the JSON API -------------------------------------------------------------------------------------------------
def _api_session() -> Session:
    session = _session()
    if session is None:
        raise Unauthorized("no reviewer session")
    return session


@bp.get("/api/session")
def api_session() -> Response:
    session = _api_session()
    return _json(
        {
            "username": session.reviewer.username,
            "name": session.reviewer.name,
            "csrf": session.csrf,
            "expiresAt": session.expires_at,
        }
    )


@bp.get("/api/requests")
def api_requests() -> Response:
    _api_session()
    status = request.args.get("status", "pended")
    if status != "pended":
        raise InvalidRequest("Only status=pended is listed here", expression="status")
    return _json({"status": "pended", "requests": _service().pended(current())})


@bp.get("/api/requests/<request_id>")
def api_request(request_id: str) -> Response:
    _api_session()
    return _json(_service().request_view(current(), request_id))


@bp.post("/api/requests/<request_id>/decision")
def api_decide(request_id: str) -> Response:
    session = _api_session()
    if not reviewers.csrf_ok(session.csrf, request.headers.get(CSRF_HEADER)):
        raise Forbidden(f"The {CSRF_HEADER} header is missing or wrong")
    ctype = request.mimetype
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMedia(f"Send the decision as application/json, not {ctype or 'nothing'}")
    body = jsonsafe.loads(request.get_data())
    if not isinstance(body, dict):
        raise MalformedJson("The body is not a JSON object")
    return _json(_decide(session, request_id, body))


@bp.errorhandler(CdsError)
def _error(exc: CdsError) -> Response:
    """The API answers an OperationOutcome; a page shows the problem in a page (a 401 sends to the sign-in)."""
    if request.path.startswith("/review/api/"):
        return _json(to_operation_outcome(exc), exc.http_status)
    session = _session()
    if session is None:
        return _see_other(url_for("review.signin_form"))
    message = exc.message if exc.http_status < 500 else "Something went wrong; nothing was changed."
    return _page("review_error.html", exc.http_status, session=session, problem=message)


# --- static files -------------------------------------------------------------------------------------------------
@bp.get("/assets/<name>")
def asset(name: str) -> Response:
    mimetype = OWN_ASSETS.get(name)
    if mimetype is None:
        raise NotFound(f"No asset '{name}' here")
    return static_file(STATIC_DIR / name, mimetype, "no-cache")
