"""The clinician's form in a browser: the page the documentation card links to.

``GET /dtr/{coverage-assertion-id}?t=<token>`` is an HTML shell with no patient data and no inline script or style;
``form.js`` fetches the DTR package as JSON (``/package``), renders it with LHC-Forms (npm ``lforms``, served from
``js/node_modules/lforms/dist/lforms`` by this service, never a CDN), marks the answers prefilled from the record,
and posts the completed QuestionnaireResponse to ``/response``, then shows the decision criterion by criterion.

Every route of an assertion needs its form link token (:mod:`cds.links`): ``t`` on the page, the ``X-Form-Link``
header (or ``t``) on the JSON routes. The page and its JSON carry patient data: ``Cache-Control: no-store``, and no
``Referer`` leaves the page (the token is in its URL).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, render_template, request, send_file, url_for
from werkzeug.security import safe_join

from cds import constants, jsonsafe, links
from cds.dtr import service
from cds.errors import CdsError, Forbidden, InvalidResource, MalformedJson, NotFound, UnsupportedMedia
from cds.runtime import Runtime, current

bp = Blueprint("dtr_page", __name__)

ROOT = Path(__file__).resolve().parents[2]
LFORMS_DIR = ROOT / "js" / "node_modules" / "lforms" / "dist" / "lforms"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "dtr"
LINK_HEADER = "X-Form-Link"

# what the page loads from lforms' build, in order (the README's list); any file of that directory may be fetched
# (the web component loads its own assets), but only with these kinds of content
LFORMS_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".map": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".svg": "image/svg+xml",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
}
OWN_ASSETS = {"form.js": "text/javascript", "form.css": "text/css"}
LONG_CACHE = "public, max-age=31536000, immutable"

# Applied to the HTML page. LHC-Forms is an Angular web component that adds <style> elements at run time, so styles
# allow 'unsafe-inline'; scripts come only from this origin, with no inline script, no eval.
PAGE_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)


def _private(resp: Response) -> Response:
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _json(body: Any, status: int = 200) -> Response:
    return _private(Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json"))


def _token() -> str | None:
    return request.headers.get(LINK_HEADER) or request.args.get("t") or None


@cache
def _lforms_version() -> str:
    try:
        return str(json.loads((LFORMS_DIR.parents[1] / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "missing"


def _own_version(name: str) -> str:
    try:
        return hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


# -- the page --------------------------------------------------------------------------------------------------------


@bp.get("/dtr/<assertion_id>")
def page(assertion_id: str) -> Response:
    rt = current()
    status = 200
    problem = None
    try:
        links.check_form_link(rt, assertion_id, request.args.get("t"))
    except CdsError as exc:
        status = exc.http_status
        # a 401 says nothing about why (like every 401 here); an expired link (403) says what to do
        problem = (
            "This form link is not valid. Open the form again from the order in the EHR."
            if status == 401
            else exc.message
        )
    html = render_template(
        "dtr_form.html",
        problem=problem,
        package_url=url_for("dtr_page.package", assertion_id=assertion_id),
        submit_url=url_for("dtr_page.submit", assertion_id=assertion_id),
        lforms=lambda path: url_for("dtr_page.lforms", path=path, v=_lforms_version()),
        asset=lambda name: url_for("dtr_page.asset", name=name, v=_own_version(name)),
    )
    resp = _private(Response(html, status=status, mimetype="text/html"))
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    return resp


# -- the page's JSON -------------------------------------------------------------------------------------------------


def _entries(bundle: Mapping[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in bundle.get("entry") or ()
        if isinstance(e, Mapping)
        and isinstance(e.get("resource"), Mapping)
        and e["resource"].get("resourceType") == rtype
    ]


def _questions(items: Any) -> list[dict[str, str]]:
    """The questions of a Questionnaire in order (nested ones too): what the form asks."""
    found: list[dict[str, str]] = []
    for item in items or ():
        if item.get("type") not in ("display", "group") and item.get("linkId") != constants.ATTESTATION_LINK:
            found.append({"linkId": str(item.get("linkId", "")), "text": str(item.get("text", ""))})
        found.extend(_questions(item.get("item")))
    return found


def _header(rt: Runtime, assertion_id: str, questionnaire: Mapping[str, Any]) -> dict[str, Any]:
    """What the page says above the form, patient-free: the policy, the drug and what is asked."""
    header: dict[str, Any] = {
        "title": questionnaire.get("title") or "Prior authorization documentation",
        "publisher": questionnaire.get("publisher"),
        "description": questionnaire.get("description"),
        "asked": _questions(questionnaire.get("item")),
        "signatureRequired": any(
            e.get("url") == constants.SIGNATURE_REQUIRED for e in questionnaire.get("extension", ())
        ),
    }
    record = rt.store.assertion(assertion_id)
    policy = rt.policies.policies.get((record.policy or "").split("|")[0]) if record else None
    if record is not None and policy is not None:
        header["policy"] = {
            "ref": policy.ref,
            "number": policy.number,
            "title": policy.title,
            "publisher": policy.publisher,
            "url": url_for("pages.policy", policy_id=policy.id),
        }
        product = next((p for p in policy.products if p.id == record.product), None)
        if product is not None:
            header["drug"] = product.title
    return header


@bp.get("/dtr/<assertion_id>/package")
def package(assertion_id: str) -> Response:
    """The package for the page: its Questionnaire, the response the service prefilled, and the header."""
    rt = current()
    links.check_form_link(rt, assertion_id, _token())
    bundle = service.package_for(rt, assertion_id)
    questionnaires = _entries(bundle, "Questionnaire")
    if not questionnaires:
        raise CdsError("The documentation package holds no Questionnaire")
    questionnaire = questionnaires[0]
    responses = _entries(bundle, "QuestionnaireResponse")
    return _json(
        {
            "assertionId": assertion_id,
            "header": _header(rt, assertion_id, questionnaire),
            "questionnaire": questionnaire,
            "response": responses[0] if responses else None,
        }
    )


def _check_names_assertion(rt: Runtime, response: Mapping[str, Any], assertion_id: str) -> None:
    """A link opens one assertion's form: a response naming another assertion is refused."""
    system = rt.base_url + constants.ASSERTION_ID_PATH
    ids = response.get("identifier")
    named = [ids] if isinstance(ids, Mapping) else ids if isinstance(ids, list) else []
    for ident in named:
        if isinstance(ident, Mapping) and ident.get("system") == system and ident.get("value") != assertion_id:
            raise Forbidden("The response names another coverage assertion than this form link")


@bp.post("/dtr/<assertion_id>/response")
def submit(assertion_id: str) -> Response:
    """The page's submit: the completed QuestionnaireResponse; answers the decision, criterion by criterion."""
    rt = current()
    links.check_form_link(rt, assertion_id, _token())
    ctype = request.mimetype
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMedia(f"Send the response as application/json, not {ctype}")
    body = jsonsafe.loads(request.get_data())
    if not isinstance(body, dict):
        raise MalformedJson("The body is not a JSON object")
    if body.get("resourceType") != "QuestionnaireResponse":
        raise InvalidResource("The body is not a QuestionnaireResponse", expression="QuestionnaireResponse")
    _check_names_assertion(rt, body, assertion_id)
    if not body.get("identifier"):
        body["identifier"] = {"system": rt.base_url + constants.ASSERTION_ID_PATH, "value": assertion_id}
    settled = service.submit(rt, body, via="form")
    return _json(
        {
            "decision": settled.decision,
            "paId": settled.pa_id,
            "summary": settled.summary,
            "criteria": list(settled.criteria),
            "policy": dict(settled.policy),
            "response": settled.response,
        }
    )


# -- static files ----------------------------------------------------------------------------------------------------


def static_file(path: Path, mimetype: str, cache_control: str) -> Response:
    """A file streamed from disk (main.js is 1.8 MB), with an ETag and If-None-Match / Range handling."""
    resp = send_file(path, mimetype=mimetype, conditional=True, etag=True)
    resp.headers["Cache-Control"] = cache_control
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


@bp.get("/dtr/assets/lforms/<path:path>")
def lforms(path: str) -> Response:
    """A file of LHC-Forms' build (``dist/lforms`` of the npm package), nothing outside it."""
    joined = safe_join(str(LFORMS_DIR), path)
    suffix = Path(path).suffix.lower()
    if joined is None or suffix not in LFORMS_TYPES:
        raise NotFound(f"No form library file '{path}' here")
    target = Path(joined).resolve()
    if not target.is_relative_to(LFORMS_DIR.resolve()) or not target.is_file():
        raise NotFound(f"No form library file '{path}' here")
    return static_file(target, LFORMS_TYPES[suffix], LONG_CACHE)


@bp.get("/dtr/assets/<name>")
def asset(name: str) -> Response:
    """The page's own script and style sheet."""
    mimetype = OWN_ASSETS.get(name)
    if mimetype is None:
        raise NotFound(f"No asset '{name}' here")
    # revalidated (ETag) rather than cached for long: a deployment changes them without renaming
    return static_file(STATIC_DIR / name, mimetype, "no-cache")
