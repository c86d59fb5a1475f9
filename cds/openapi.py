"""The OpenAPI 3.1 description of this service: ``GET /openapi.json`` (no auth, no patient data, cacheable).

Paths, methods and path parameters come from the route registry (``app.url_map``) each time the document is asked
for, so they cannot drift from the routes: a Flask ``<name>`` becomes ``{name}`` (``<path:name>`` is a path
parameter that may hold ``/``, marked ``x-flask-converter: path``); each operation's summary and description are
its view's docstring, and ``x-endpoint`` names its Flask endpoint. What the registry cannot know (tag, request
body and its media types, responses, security) is :data:`OPERATIONS`, one entry per endpoint name;
``tests/test_openapi.py`` fails when a route has no entry or an entry names no route. The CDS Hooks service ids are
the hook registry's (``app.extensions["cds.services"]``).

The security of each operation follows this deployment's settings (``auth_required``, ``discovery_auth_required``):
an operation that checks nothing here lists no security requirement.

Errors: every documented 4xx and 5xx is the service's one error shape, an ``OperationOutcome`` (FHIR JSON under
``/fhir``, plain JSON elsewhere: :func:`cds.app._error`), except where the protocol fixes another: the RFC 6749 §5.2
error of ``POST /auth/token`` (:func:`cds.errors.to_oauth_error`), the HTML pages of the reviewer and of the
clinician's form (their errors are pages too), and the readiness probe's 503, which names the failing checks.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app

from cds import smart
from cds.dtr import http as dtr_http
from cds.dtr import page as dtr_page
from cds.pas import http as pas_http
from cds.pas import review
from cds.runtime import Runtime

bp = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"
DOCUMENT_PATH = "/openapi.json"
JSON = "application/json"
FHIR_JSON = "application/fhir+json"
HTML = "text/html"
FORM = "application/x-www-form-urlencoded"
FHIR_BODY = (FHIR_JSON, JSON)  # what fhir_body() accepts (it also takes any +json type)
OUTCOME = "OperationOutcome"
MAX_SUMMARY = 120
NOT_DOCUMENTED = frozenset({"HEAD", "OPTIONS"})  # answered by Flask for every route
CACHE = "public, max-age=300"  # no patient data; changes only with a deployment
ALWAYS = (414, 500)  # any request: a request target over cds.app.MAX_REQUEST_TARGET; an unforeseen error
WITH_BODY = (400, 413, 415)  # a request with a body: not JSON (or not the type asked), over max_request_bytes

# --- security -------------------------------------------------------------------------------------------------------
PUBLIC = "public"
HOOKS = "hooks"  # the CDS Hooks JWT when auth_required
DISCOVERY = "discovery"  # the CDS Hooks JWT when discovery_auth_required
CDS_CLIENT = "cds-client"  # the CDS Hooks JWT when the service verifies any (auth_required or discovery_auth_required)
SMART = "smart"  # a SMART Backend Services access token with the operation's scopes, when auth_required
FORM_LINK = "form-link"  # the card's form link token, as ?t= or X-Form-Link
FORM_LINK_QUERY = "form-link-query"  # the same, in the page's URL only
REVIEWER = "reviewer"  # a reviewer's session cookie
REVIEWER_CSRF = "reviewer-csrf"  # the session cookie and its CSRF token in X-CSRF-Token
METRICS = "metrics"  # Authorization: Bearer <metrics_token>, when that is set

SUBSCRIPTION_SCOPES = {m: f"system/Subscription.{m}" for m in "crud"}  # cds.pas.subscriptions_http, one per method


@dataclass(frozen=True)
class Answer:
    """One documented response: its schema (a name in :func:`schemas`; None for no body) and media types."""

    description: str
    schema: str | None = None
    media: tuple[str, ...] = (JSON,)
    headers: tuple[str, ...] = ()  # names in HEADERS


@dataclass(frozen=True)
class Body:
    schema: str
    media: tuple[str, ...]
    description: str = ""
    required: bool = True


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # query | header
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Op:
    """What the route registry cannot say about one operation."""

    tag: str
    ok: Mapping[int, Answer]
    errors: tuple[int, ...] = ()
    body: Body | None = None
    security: str = PUBLIC
    scopes: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    path: Mapping[str, Callable[[Flask], Mapping[str, Any]]] = field(default_factory=dict)  # path parameter schemas
    error_schema: str = OUTCOME  # the body of this operation's errors ...
    error_overrides: Mapping[int, str] = field(default_factory=dict)  # ... unless named here for a status
    error_headers: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # names in HEADERS
    summary: str = ""  # when the view's docstring gives none (no docstring, or a first sentence too long)


def _service_ids(app: Flask) -> Mapping[str, Any]:
    return {"type": "string", "enum": list(app.extensions["cds.services"]), "description": "A CDS service id"}


def _policy_ids(app: Flask) -> Mapping[str, Any]:
    rt: Runtime = app.extensions["cds"]
    return {"type": "string", "enum": sorted(rt.policies.policies), "description": "A policy id"}


def _names(names: Mapping[str, str]) -> Callable[[Flask], Mapping[str, Any]]:
    return lambda app: {"type": "string", "enum": list(names)}


def _fhir(schema: str, description: str, *headers: str) -> Answer:
    return Answer(description, schema, (FHIR_JSON,), headers)


def _json(schema: str, description: str) -> Answer:
    return Answer(description, schema)


def _page(description: str) -> Answer:
    return Answer(description, "Html", (HTML,))


def _files(types: Mapping[str, str] | None, description: str) -> Answer:
    return Answer(description, "File", tuple(dict.fromkeys(types.values())) if types else ("*/*",), ("ETag",))


SEE_OTHER = Answer(
    "See other: the reviewer has no session (to the sign-in page), or the action is done", None, (), ("Location",)
)
PAGE_ERRORS = (400, 401, 403, 404, 409, 422, 429)

OPERATIONS: Mapping[str, Op | Mapping[str, Op]] = {
    "static": Op(
        "Assets",
        {200: _files(None, "A file of the service's own static assets")},
        (404,),
        summary="A static file of the service (style sheets, scripts)",
    ),
    "openapi.spec": Op("Service", {200: _json("OpenApiDocument", "This document")}),
    # --- CDS Hooks
    "cds_hooks.discovery": Op(
        "CDS Hooks",
        {200: _json("Discovery", "The CDS services of this deployment")},
        (401,),
        security=DISCOVERY,
        summary="CDS Hooks discovery: the services offered, built from the same registry as the routes",
    ),
    "cds_hooks.invoke": Op(
        "CDS Hooks",
        {200: _json("CdsHooksResponse", "Cards and system actions (CRD coverage information on each order)")},
        (*WITH_BODY, 401, 404, 412, 422),
        Body("CdsHooksRequest", (JSON,), "A CDS Hooks 2.0 request for this service's hook"),
        security=HOOKS,
        path={"service_id": _service_ids},
        summary="Call a CDS service (order-sign, order-select): the coverage decision for each draft order",
    ),
    "cds_hooks.feedback": Op(
        "CDS Hooks",
        {200: _json("FeedbackReceived", "How many feedback items were stored")},
        (*WITH_BODY, 401, 404),
        Body("Feedback", (JSON,), "CDS Hooks card feedback"),
        security=HOOKS,
        path={"service_id": _service_ids},
        summary="CDS Hooks card feedback (stored)",
    ),
    "cds_hooks.echo": Op(
        "Benchmark",
        {200: _json("AnyJson", "The request body, as sent")},
        (400, 404, 413),
        Body("AnyJson", (JSON,), "Any JSON"),
    ),
    # --- FHIR
    "fhir.metadata": Op(
        "FHIR",
        {200: _fhir("CapabilityStatement", "The FHIR CapabilityStatement")},
        summary="The CapabilityStatement of the FHIR endpoints",
    ),
    "fhir.questionnaire": Op(
        "FHIR",
        {200: _fhir("Questionnaire", "A Questionnaire a coverage information names")},
        (404,),
        summary="A Questionnaire the coverage information names (no patient data in it)",
    ),
    "fhir.draft_response": Op(
        "FHIR",
        {200: _fhir("QuestionnaireResponse", "The QuestionnaireResponse")},
        (401, 404),
        security=CDS_CLIENT,
        summary="An assertion's QuestionnaireResponse: the prepopulated draft, or the answered one",
    ),
    "fhir.criteria": Op(
        "FHIR",
        {200: _fhir("CodeSystem", "The criterion codes of the payer policies")},
        summary="The code system of the policies' criterion ids",
    ),
    # --- policies (HTML)
    "pages.index": Op(
        "Policies", {200: _page("The list of policies")}, summary="The policies as encoded (an HTML page)"
    ),
    "pages.policy": Op(
        "Policies",
        {200: _page("The policy, criterion by criterion, with its own numbering")},
        (404,),
        path={"policy_id": _policy_ids},
        summary="One policy as encoded (an HTML page; what the policy card links to)",
    ),
    # --- SMART Backend Services
    "smart.token": Op(
        "SMART",
        {200: Answer("An access token for the FHIR endpoints", "TokenResponse", (JSON,), ("Cache-Control",))},
        (400, 401, 413, 429),
        Body("TokenRequest", (FORM,), "client_credentials with a signed client assertion (private_key_jwt)"),
        error_overrides={400: "OAuthError", 401: "OAuthError", 429: "OAuthError"},
        error_headers={429: ("Retry-After",)},
        summary="SMART Backend Services token endpoint: an access token for a signed client assertion",  # fallback
    ),
    "smart.smart_configuration": Op(
        "SMART",
        {200: _json("SmartConfiguration", "The SMART configuration")},
        summary="SMART configuration (token endpoint, scopes, signing algorithms)",
    ),
    # --- DTR
    "dtr_fhir.questionnaire_package": Op(
        "DTR",
        {200: _fhir("Parameters", "The package: a packagebundle per form, and an outcome when one is needed")},
        (*WITH_BODY, 401, 403, 404, 422),
        Body("Parameters", FHIR_BODY, "coverage, and context (a coverage assertion id), order or questionnaire"),
        security=SMART,
        scopes=dtr_http.READ_FORMS,
        summary="DTR $questionnaire-package: the forms, prefilled, with their CQL and value sets",
    ),
    "dtr_fhir.questionnaire_response": Op(
        "DTR",
        {201: _fhir("QuestionnaireResponse", "The stored response with the coverage-information", "Location")},
        (*WITH_BODY, 401, 403, 404, 409, 422),
        Body("AnsweredForm", FHIR_BODY, "A completed QuestionnaireResponse, or a DTR QuestionnaireResponse Bundle"),
        security=SMART,
        scopes=dtr_http.WRITE_RESPONSES,
    ),
    "dtr_fhir.log_questionnaire_errors": Op(
        "DTR",
        {200: _fhir(OUTCOME, "An informational OperationOutcome: the outcomes were recorded")},
        (*WITH_BODY, 401, 403),
        Body("Parameters", FHIR_BODY, "questionnaire (canonical) and operationOutcome parameters"),
        security=SMART,
        scopes=dtr_http.READ_FORMS,
    ),
    "dtr_fhir.expand": {
        "GET": Op(
            "DTR",
            {200: _fhir("ValueSet", "The value set with its expansion")},
            (400, 401, 403, 404),
            security=SMART,
            scopes=("system/ValueSet.rs",),
            params=(
                Param("url", "query", "The value set's canonical (optionally |version)", required=True),
                Param("valueSetVersion", "query", "The value set's version"),
            ),
        ),
        "POST": Op(
            "DTR",
            {200: _fhir("ValueSet", "The value set with its expansion")},
            (*WITH_BODY, 401, 403, 404),
            Body("Parameters", FHIR_BODY, "url (valueUri) and valueSetVersion"),
            security=SMART,
            scopes=("system/ValueSet.rs",),
        ),
    },
    "dtr_fhir.next_question": Op(
        "DTR",
        {200: _fhir("QuestionnaireResponse", "The response with the next items, or completed with the decision")},
        (*WITH_BODY, 401, 403, 404, 409, 422),
        Body("NextQuestionInput", FHIR_BODY, "The QuestionnaireResponse, bare or as the questionnaire-response part"),
        security=SMART,
        scopes=dtr_http.READ_FORMS,
        summary="SDC $next-question: the next items of an adaptive form, or the completed response",
    ),
    # --- the clinician's form page
    "dtr_page.page": Op(
        "DTR form page",
        {200: _page("The form page (no patient data in it; it fetches the package)")},
        (401, 403),
        security=FORM_LINK_QUERY,
        error_overrides={401: "Html", 403: "Html"},
        summary="The clinician's form page, linked from the documentation card (HTML)",
    ),
    "dtr_page.package": Op(
        "DTR form page",
        {200: _json("FormPackage", "The page's Questionnaire, prefilled response and header")},
        (401, 403, 404, 409),
        security=FORM_LINK,
    ),
    "dtr_page.submit": Op(
        "DTR form page",
        {200: _json("FormDecision", "The decision, criterion by criterion, and the stored response")},
        (*WITH_BODY, 401, 403, 404, 409, 422),
        Body("QuestionnaireResponse", (JSON, FHIR_JSON), "The completed QuestionnaireResponse"),
        security=FORM_LINK,
    ),
    "dtr_page.lforms": Op("Assets", {200: _files(dtr_page.LFORMS_TYPES, "A file of LHC-Forms' build")}, (404,)),
    "dtr_page.asset": Op(
        "Assets",
        {200: _files(dtr_page.OWN_ASSETS, "The form page's script or style sheet")},
        (404,),
        path={"name": _names(dtr_page.OWN_ASSETS)},
    ),
    # --- PAS
    "pas_fhir.submit": Op(
        "PAS",
        {200: _fhir("Bundle", "The PAS response Bundle (ClaimResponse first)")},
        (*WITH_BODY, 401, 403, 404, 409, 422),
        Body("PasInput", FHIR_BODY, "The PAS request Bundle, or Parameters carrying it as the resource parameter"),
        security=SMART,
        scopes=pas_http.SUBMIT_SCOPES,
        summary="PAS Claim/$submit: the prior-authorization request (certified or pended)",
    ),
    "pas_fhir.inquire": Op(
        "PAS",
        {200: _fhir("Parameters", "Parameters with a return inquiry response Bundle per matching request")},
        (*WITH_BODY, 401, 403, 404, 409, 422),
        Body("PasInput", FHIR_BODY, "The PAS inquiry Bundle, or Parameters carrying it as the resource parameter"),
        security=SMART,
        scopes=pas_http.INQUIRE_SCOPES,
        summary="PAS Claim/$inquire: the current state of earlier requests",
    ),
    "pas_subscriptions.create": Op(
        "PAS Subscriptions",
        {201: _fhir("Subscription", "The subscription, requested (its handshake is on its way)", "Location")},
        (*WITH_BODY, 401, 403),
        Body("Subscription", FHIR_BODY, "A PAS Subscription (R4 backport, rest-hook, full-resource)"),
        security=SMART,
        scopes=(SUBSCRIPTION_SCOPES["c"],),
        summary="Create a PAS notification subscription",
    ),
    "pas_subscriptions.read": Op(
        "PAS Subscriptions",
        {200: _fhir("Subscription", "The subscription")},
        (401, 403, 404),
        security=SMART,
        scopes=(SUBSCRIPTION_SCOPES["r"],),
        summary="Read one of the client's subscriptions",
    ),
    "pas_subscriptions.replace": Op(
        "PAS Subscriptions",
        {200: _fhir("Subscription", "The subscription as changed")},
        (*WITH_BODY, 401, 403, 404),
        Body("Subscription", FHIR_BODY, "The subscription, changed (status off turns it off)"),
        security=SMART,
        scopes=(SUBSCRIPTION_SCOPES["u"],),
        summary="Update a subscription (status off turns it off)",
    ),
    "pas_subscriptions.remove": Op(
        "PAS Subscriptions",
        {204: Answer("Deleted", None, ())},
        (401, 403, 404),
        security=SMART,
        scopes=(SUBSCRIPTION_SCOPES["d"],),
    ),
    "pas_subscriptions.status": Op(
        "PAS Subscriptions",
        {200: _fhir("Bundle", "A searchset Bundle holding the SubscriptionStatus")},
        (401, 403, 404),
        security=SMART,
        scopes=(SUBSCRIPTION_SCOPES["r"],),
    ),
    # --- the reviewer (HTML pages; their errors are pages, and without a session they send to the sign-in)
    "review.signin_form": Op(
        "Reviewer pages",
        {200: _page("The sign-in form"), 303: SEE_OTHER},
        error_schema="Html",
        summary="The reviewer's sign-in form",
    ),
    "review.signin": Op(
        "Reviewer pages",
        {303: SEE_OTHER},
        PAGE_ERRORS,
        Body("SignIn", (FORM,), "The sign-in form", required=False),
        error_schema="Html",
        error_headers={429: ("Retry-After",)},
        summary="Sign in: a session cookie and to the queue, or the form again with the problem",
    ),
    "review.signout": Op(
        "Reviewer pages",
        {303: SEE_OTHER},
        (403,),
        Body("FormCsrf", (FORM,), "The session's CSRF token", required=False),
        security=REVIEWER,
        error_schema="Html",
        summary="Sign out",
    ),
    "review.queue": Op(
        "Reviewer pages",
        {200: _page("The pended requests by due time"), 303: SEE_OTHER},
        params=(Param("decided", "query", "The request just decided (shown as a note)"),),
        security=REVIEWER,
        error_schema="Html",
        summary="The reviewer queue: pended PAS requests by due time (HTML)",
    ),
    "review.request_page": Op(
        "Reviewer pages",
        {200: _page("The request criterion by criterion, and its decision form"), 303: SEE_OTHER},
        (404,),
        security=REVIEWER,
        error_schema="Html",
        summary="One pended request, with its evidence and decision form (HTML)",
    ),
    "review.decide_form": Op(
        "Reviewer pages",
        {303: SEE_OTHER},
        PAGE_ERRORS,
        Body("DecisionForm", (FORM,), "The decision form", required=False),
        security=REVIEWER,
        error_schema="Html",
        summary="The decision form's submit: to the queue, or the page again with the problem",
    ),
    "review.api_session": Op(
        "Reviewer API",
        {200: _json("ReviewSession", "Who is signed in, the CSRF token and the session's end")},
        (401,),
        security=REVIEWER,
        summary="The reviewer's session",
    ),
    "review.api_requests": Op(
        "Reviewer API",
        {200: _json("ReviewQueue", "The pended requests, soonest due first")},
        (400, 401),
        security=REVIEWER,
        params=(Param("status", "query", "Only pended is listed", {"type": "string", "enum": ["pended"]}),),
        summary="The pended requests",
    ),
    "review.api_request": Op(
        "Reviewer API",
        {200: _json("ReviewRequest", "The request as the reviewer reads it")},
        (401, 404),
        security=REVIEWER,
        summary="One request, criterion by criterion",
    ),
    "review.api_decide": Op(
        "Reviewer API",
        {200: _json("ReviewOutcome", "The decision as recorded")},
        (*WITH_BODY, 401, 403, 404, 409, 422),
        Body("ReviewDecision", (JSON,), "approve, modify or deny"),
        security=REVIEWER_CSRF,
        summary="Decide a pended request (approve, modify, deny)",
    ),
    "review.asset": Op(
        "Assets",
        {200: _files(review.OWN_ASSETS, "The reviewer pages' script or style sheet"), 303: SEE_OTHER},
        (404,),
        path={"name": _names(review.OWN_ASSETS)},
        error_schema="Html",
        summary="The reviewer pages' script or style sheet",
    ),
    # --- operations
    "metrics.scrape": Op(
        "Operations",
        {200: Answer("The metrics, in Prometheus' text exposition format", "Text", ("text/plain",))},
        (401, 404),
        security=METRICS,
    ),
    # --- health
    "health.healthz": Op("Health", {200: _json("Health", "The process serves")}, summary="Liveness (no I/O, no auth)"),
    "health.readyz": Op(
        "Health",
        {200: _json("Readiness", "Ready: the store answers, policies loaded, migrations at head")},
        (503,),
        error_overrides={503: "Readiness"},
        summary="Readiness: the store, the policies and the migrations",
    ),
}

HEADERS: Mapping[str, Mapping[str, Any]] = {
    "Location": {"description": "Where the result is", "required": True, "schema": {"type": "string"}},
    "ETag": {
        "description": "The file's entity tag (If-None-Match is honoured)",
        "required": True,
        "schema": {"type": "string"},
    },
    "Cache-Control": {"description": "no-store", "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "Bearer challenge (RFC 6750 §3)", "schema": {"type": "string"}},
    "Allow": {"description": "The methods the route answers", "schema": {"type": "string"}},
    "Retry-After": {
        "description": "Seconds to wait before asking again",
        "required": True,
        "schema": {"type": "string"},
    },
}


# --- the document ---------------------------------------------------------------------------------------------------
DESCRIPTION = """A payer's prior-authorization service for drug orders, on FHIR R4: CDS Hooks 2.0 services with Da Vinci
CRD coverage information, the DTR payer operations and form page, the PAS request and inquiry operations with their
notification Subscriptions, a clinical reviewer's queue, and SMART Backend Services for the FHIR endpoints.

Generated from the routes this deployment serves; each operation's security is what this deployment checks.

Errors are one shape everywhere: a FHIR OperationOutcome (application/fhir+json under /fhir, application/json
elsewhere, CDS Hooks included) whose issues carry a severity, a code and the reason as details.text (a 401 gives no
reason). The exceptions are fixed by their protocols: the token endpoint answers RFC 6749 errors, the HTML pages
answer HTML pages, and /readyz answers 503 naming its failing checks."""
UNDOCUMENTED = Op("Undocumented", {}, summary="A route cds.openapi.OPERATIONS does not describe yet")


def operations(app: Flask) -> dict[tuple[str, str], Op]:
    """The table's entry for every (endpoint, method) of ``app``'s routes; :data:`UNDOCUMENTED` for one it lacks
    (the document stays servable; ``tests/test_openapi.py`` fails on it)."""
    out: dict[tuple[str, str], Op] = {}
    for rule in app.url_map.iter_rules():
        entry = OPERATIONS.get(rule.endpoint)
        for method in sorted((rule.methods or set()) - NOT_DOCUMENTED):
            if entry is None:
                op = UNDOCUMENTED
            elif isinstance(entry, Op):
                op = entry
            else:
                op = entry.get(method, UNDOCUMENTED)
            out[(rule.endpoint, method)] = op
    return out


_PARAM = re.compile(
    r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\((?P<args>.*?)\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>"
)
CONVERTERS: Mapping[str, Mapping[str, Any]] = {
    "default": {"type": "string"},
    "string": {"type": "string"},
    "path": {"type": "string"},
    "any": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "uuid": {"type": "string", "format": "uuid"},
}


def openapi_path(rule: str) -> tuple[str, list[tuple[str, str]]]:
    """A Flask rule as an OpenAPI path, and its parameters with their converters: ``/a/<path:b>`` is
    ``("/a/{b}", [("b", "path")])``."""
    found: list[tuple[str, str]] = []

    def named(match: re.Match[str]) -> str:
        found.append((match.group("name"), match.group("converter") or "default"))
        return "{" + match.group("name") + "}"

    return _PARAM.sub(named, rule), found


def _docstring(view: Callable[..., Any]) -> tuple[str, str]:
    """A view's summary (its docstring's first sentence, when at most MAX_SUMMARY characters) and description (the
    whole docstring)."""
    doc = inspect.getdoc(view) or ""
    first = " ".join(doc.split("\n\n", 1)[0].split()).split(". ", 1)[0].rstrip(".")
    return (first if len(first) <= MAX_SUMMARY else ""), doc


def _security(rt: Runtime, op: Op) -> list[dict[str, list[str]]]:
    cfg = rt.config
    if op.security == HOOKS:
        return [{"cdsHooksJwt": []}] if cfg["auth_required"] else []
    if op.security == DISCOVERY:
        return [{"cdsHooksJwt": []}] if cfg["discovery_auth_required"] else []
    if op.security == CDS_CLIENT:
        return [{"cdsHooksJwt": []}] if rt.verifier is not None else []
    if op.security == SMART:
        return [{"smartBackendServices": list(op.scopes)}] if cfg["auth_required"] else []
    if op.security == FORM_LINK:
        return [{"formLinkQuery": []}, {"formLinkHeader": []}]
    if op.security == FORM_LINK_QUERY:
        return [{"formLinkQuery": []}]
    if op.security == METRICS:
        return [{"metricsToken": []}] if cfg.get("metrics_token") else []
    if op.security == REVIEWER:
        return [{"reviewerSession": []}]
    if op.security == REVIEWER_CSRF:
        return [{"reviewerSession": [], "reviewerCsrf": []}]
    return []


def _content(schema: str | None, media: tuple[str, ...]) -> dict[str, Any]:
    if schema is None:
        return {}
    return {"content": {m: {"schema": {"$ref": f"#/components/schemas/{schema}"}} for m in media}}


def _answer(answer: Answer) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description, **_content(answer.schema, answer.media)}
    if answer.headers:
        out["headers"] = {h: dict(HEADERS[h]) for h in answer.headers}
    return out


ERROR_TEXT = {
    303: "See other",
    400: "The request is not valid (the OperationOutcome says what and where)",
    401: "Not authenticated (no detail is given)",
    403: "Authenticated, not allowed (a scope missing, an expired link, a CSRF token wrong)",
    404: "Not found",
    409: "Conflict: the resource has moved on (settled, superseded, decided meanwhile)",
    412: "Data unavailable: prefetch missing and the FHIR server cannot be queried",
    413: "The request body is over max_request_bytes (or a list over its documented limit)",
    414: "The request target is over 4,000 characters",
    415: "The request body is not of a media type this operation takes",
    422: "Well formed, but breaks a rule of the operation",
    429: "Too many requests (failed sign-ins, refused token requests, tokens issued); wait and ask again",
    500: "An unforeseen error (an incident id, no detail); nothing was changed",
    503: "Not ready: the failing checks are named",
}


def _error(path: str, op: Op, status: int) -> dict[str, Any]:
    schema = op.error_overrides.get(status, op.error_schema)
    if schema == "Html":
        media: tuple[str, ...] = (HTML,)
    elif schema == OUTCOME:
        media = (FHIR_JSON,) if path.startswith("/fhir") else (JSON,)  # as cds.app._error renders it
    else:
        media = (JSON,)
    out: dict[str, Any] = {"description": ERROR_TEXT[status], **_content(schema, media)}
    headers = list(op.error_headers.get(status, ()))
    if (status in (401, 403) and op.security == SMART) or (status == 401 and op.security == METRICS):
        headers.append("WWW-Authenticate")
    if headers:
        out["headers"] = {
            h: {**HEADERS[h], "required": status == 401} if h == "WWW-Authenticate" else dict(HEADERS[h])
            for h in headers
        }
    return out


def _operation(app: Flask, rt: Runtime, endpoint: str, method: str, path: str, op: Op, op_id: str) -> dict[str, Any]:
    summary, description = _docstring(app.view_functions[endpoint])
    out: dict[str, Any] = {
        "tags": [op.tag],
        "summary": summary or op.summary,
        "operationId": op_id,
        "x-endpoint": endpoint,
    }
    if description:
        out["description"] = description
    params = [
        {"name": p.name, "in": p.where, "description": p.description, "required": p.required, "schema": dict(p.schema)}
        for p in op.params
    ]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "description": op.body.description,
            "required": op.body.required,
            **_content(op.body.schema, op.body.media),
        }
    responses: dict[str, Any] = {str(status): _answer(a) for status, a in sorted(op.ok.items())}
    if op is UNDOCUMENTED:
        responses["default"] = {"description": "Not described"}
    statuses = set(op.errors) | set(ALWAYS) | ({413} if op.body is not None else set())
    for status in sorted(statuses):
        responses[str(status)] = _error(path, op, status)
    out["responses"] = responses
    out["security"] = _security(rt, op)
    return out


def document(app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``: every route of its url_map (HEAD and OPTIONS aside)."""
    rt: Runtime = app.extensions["cds"]
    table = operations(app)
    paths: dict[str, dict[str, Any]] = {}
    count: dict[str, int] = {}
    for endpoint, _ in table:
        count[endpoint] = count.get(endpoint, 0) + 1
    seen: set[str] = set()
    for rule in app.url_map.iter_rules():
        path, converters = openapi_path(rule.rule)
        item = paths.setdefault(path, {})
        for method in sorted((rule.methods or set()) - NOT_DOCUMENTED):
            op = table[(rule.endpoint, method)]
            op_id = rule.endpoint if count[rule.endpoint] == 1 else f"{rule.endpoint}.{method.lower()}"
            if op_id in seen:  # one view on several rules, with the same method: numbered from the second
                op_id = next(f"{op_id}.{n}" for n in range(2, 100) if f"{op_id}.{n}" not in seen)
            seen.add(op_id)
            operation = _operation(app, rt, rule.endpoint, method, path, op, op_id)
            parameters = [_path_parameter(app, op, name, conv) for name, conv in converters]
            parameters += operation.pop("parameters", [])
            if parameters:
                operation["parameters"] = parameters
            item[method.lower()] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "cds-payer: drug prior authorization (CDS Hooks 2.0, Da Vinci CRD, DTR and PAS)",
            "version": _version(),
            "description": DESCRIPTION,
        },
        "servers": [{"url": rt.base_url}],
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in table.values())],
        "paths": paths,
        "components": {"schemas": schemas(), "securitySchemes": security_schemes(rt)},
    }


def _path_parameter(app: Flask, op: Op, name: str, converter: str) -> dict[str, Any]:
    schema = dict(op.path[name](app)) if name in op.path else dict(CONVERTERS.get(converter, {"type": "string"}))
    param: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": schema}
    if converter == "path":
        param["description"] = "A path: may hold '/'"
        param["x-flask-converter"] = "path"
    return param


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cds-payer")
    except PackageNotFoundError:
        return "0"


@bp.get(DOCUMENT_PATH)
def spec() -> Response:
    """The OpenAPI 3.1 description of this service, generated from its route registry."""
    # built once per set of routes (about 7 ms): the registry is fixed once the app serves, but a test may add a route
    rules = len(current_app.url_map._rules)
    cached = current_app.extensions.get("cds.openapi")
    if cached is None or cached[0] != rules:
        cached = (rules, json.dumps(document(current_app), separators=(",", ":")))
        current_app.extensions["cds.openapi"] = cached
    return Response(cached[1], mimetype=JSON, headers={"Cache-Control": CACHE})


# --- security schemes -----------------------------------------------------------------------------------------------
SCOPE_TEXT = {
    "system/Questionnaire.rs": "Read Questionnaires (DTR forms)",
    "system/Library.rs": "Read CQL Libraries (DTR)",
    "system/ValueSet.rs": "Read and expand ValueSets (DTR)",
    "system/QuestionnaireResponse.cu": "Submit answered forms (DTR)",
    "system/Subscription.cruds": "Manage PAS notification subscriptions",
    "system/Subscription.c": "Create a subscription",
    "system/Subscription.r": "Read a subscription and its $status",
    "system/Subscription.u": "Update a subscription",
    "system/Subscription.d": "Delete a subscription",
    "system/Claim.cr": "Submit and inquire PAS requests",
    "system/Claim.c": "Submit a PAS request (Claim/$submit)",
    "system/Claim.r": "Inquire PAS requests (Claim/$inquire)",
}


def security_schemes(rt: Runtime) -> dict[str, Any]:
    needed = [s for entry in OPERATIONS.values() for op in _ops(entry) for s in op.scopes]
    scopes = {s: SCOPE_TEXT.get(s, s) for s in dict.fromkeys([*smart.SCOPES, *needed])}
    return {
        "cdsHooksJwt": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "CDS Hooks 2.0 client JWT: signed ES384 or RS384 by a key of a trusted client's JWK Set, "
            "iss = the client, aud = the URL called, exp a few minutes ahead, a jti used once",
        },
        "smartBackendServices": {
            "type": "oauth2",
            "description": "SMART Backend Services: client_credentials with a signed client assertion "
            "(private_key_jwt, ES384 or RS384) at the token endpoint; the access token is a Bearer token",
            "flows": {"clientCredentials": {"tokenUrl": f"{rt.base_url}{smart.TOKEN_PATH}", "scopes": scopes}},
        },
        "formLinkQuery": {
            "type": "apiKey",
            "in": "query",
            "name": "t",
            "description": "The form link token of the documentation card's link (bound to one assertion, expires)",
        },
        "formLinkHeader": {
            "type": "apiKey",
            "in": "header",
            "name": dtr_page.LINK_HEADER,
            "description": "The form link token, as a header (the page's own requests)",
        },
        "metricsToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "The deployment's metrics_token",
        },
        "reviewerSession": {
            "type": "apiKey",
            "in": "cookie",
            "name": review.SESSION_COOKIE,
            "description": "A clinical reviewer's session (POST /review/signin)",
        },
        "reviewerCsrf": {
            "type": "apiKey",
            "in": "header",
            "name": review.CSRF_HEADER,
            "description": "The session's CSRF token (GET /review/api/session)",
        },
    }


def _ops(entry: Op | Mapping[str, Op]) -> list[Op]:
    return [entry] if isinstance(entry, Op) else list(entry.values())


# --- schemas --------------------------------------------------------------------------------------------------------
def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


STRING = {"type": "string"}
OBJECT = {"type": "object"}
STRINGS = {"type": "array", "items": STRING}


def _object(required: tuple[str, ...] = (), description: str = "", /, **props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


def _resource(rtype: str, description: str, required: tuple[str, ...] = (), /, **props: Any) -> dict[str, Any]:
    """A FHIR R4 resource: resourceType fixed, the key elements described, any other element allowed."""
    return _object(
        ("resourceType", *required),
        description,
        resourceType={"const": rtype},
        id=STRING,
        meta=OBJECT,
        **props,
    )


def schemas() -> dict[str, Any]:
    coding = _object(system=STRING, code=STRING, display=STRING)
    return {
        "OperationOutcome": _resource(
            "OperationOutcome",
            "The error shape of every route (and the informational answer of some FHIR operations)",
            ("issue",),
            issue={
                "type": "array",
                "minItems": 1,
                "items": _object(
                    ("severity", "code"),
                    severity={"enum": ["fatal", "error", "warning", "information"]},
                    code=STRING,
                    details=_object(text=STRING),
                    diagnostics=STRING,
                    expression=STRINGS,
                ),
            },
        ),
        "OAuthError": _object(
            ("error",),
            "RFC 6749 §5.2: the token endpoint's error",
            error={
                "enum": [
                    "invalid_request",
                    "invalid_client",
                    "invalid_grant",
                    "unauthorized_client",
                    "unsupported_grant_type",
                    "invalid_scope",
                ]
            },
            error_description=STRING,
            error_uri=STRING,
        ),
        "Html": {"type": "string", "description": "An HTML page"},
        "File": {"type": "string", "description": "A file's content"},
        "Text": {"type": "string", "description": "Plain text"},
        "AnyJson": {"description": "Any JSON value"},
        "OpenApiDocument": _object(("openapi", "info", "paths"), openapi=STRING, info=OBJECT, paths=OBJECT),
        # --- CDS Hooks 2.0
        "CdsHooksRequest": _object(
            ("hook", "hookInstance", "context"),
            "A CDS Hooks 2.0 request (unknown fields are ignored, CRD §hook-23)",
            hook={"type": "string", "description": "The hook of the service called (order-sign, order-select)"},
            hookInstance={"type": "string", "format": "uuid"},
            fhirServer={"type": "string", "format": "uri"},
            fhirAuthorization=_object(
                ("access_token", "token_type", "expires_in", "scope", "subject"),
                access_token=STRING,
                token_type={"const": "Bearer"},
                expires_in={"type": "integer"},
                scope=STRING,
                subject=STRING,
                patient=STRING,
            ),
            context=_object(
                (),
                "The hook's context: userId, patientId, encounterId, draftOrders (a Bundle) ...",
                userId=STRING,
                patientId=STRING,
                encounterId=STRING,
                draftOrders=_ref("Bundle"),
                selections=STRINGS,
            ),
            prefetch={"type": "object", "additionalProperties": {"type": ["object", "null"]}},
            extension=OBJECT,
        ),
        "Card": _object(
            ("summary", "indicator", "source"),
            uuid=STRING,
            summary={"type": "string", "maxLength": 140},
            detail=STRING,
            indicator={"enum": ["info", "warning", "critical"]},
            source=_object(("label",), label=STRING, url=STRING, topic=coding),
            suggestions={"type": "array", "items": OBJECT},
            selectionBehavior=STRING,
            overrideReasons={"type": "array", "items": coding},
            links={"type": "array", "items": _object(("label", "url", "type"), label=STRING, url=STRING, type=STRING)},
        ),
        "SystemAction": _object(
            ("type", "description"),
            type={"enum": ["create", "update", "delete"]},
            description=STRING,
            resource=OBJECT,
            resourceId=STRINGS,
        ),
        "CdsHooksResponse": _object(
            ("cards",),
            cards={"type": "array", "items": _ref("Card")},
            systemActions={"type": "array", "items": _ref("SystemAction")},
        ),
        "Discovery": _object(
            ("services",),
            services={
                "type": "array",
                "items": _object(
                    ("hook", "description", "id"),
                    hook=STRING,
                    title=STRING,
                    description=STRING,
                    id=STRING,
                    prefetch={"type": "object", "additionalProperties": STRING},
                    usageRequirements=STRING,
                    extension=OBJECT,
                ),
            },
        ),
        "Feedback": _object(
            ("feedback",),
            feedback={
                "type": "array",
                "minItems": 1,
                "maxItems": 100,
                "items": _object(
                    ("card", "outcome", "outcomeTimestamp"),
                    card={"type": "string", "maxLength": 64, "description": "The uuid of a card this service gave"},
                    outcome={"enum": ["accepted", "overridden"]},
                    acceptedSuggestions={"type": "array", "items": _object(("id",), id=STRING)},
                    overrideReason=_object(reason=coding, userComment={"type": "string", "maxLength": 1000}),
                    outcomeTimestamp={"type": "string", "format": "date-time"},
                ),
            },
        ),
        "FeedbackReceived": _object(("received",), received={"type": "integer", "minimum": 1}),
        # --- FHIR R4 resources (the key elements; others are allowed)
        "Parameters": _resource(
            "Parameters",
            "FHIR Parameters",
            parameter={
                "type": "array",
                "items": _object(("name",), name=STRING, resource=OBJECT, part={"type": "array", "items": OBJECT}),
            },
        ),
        "Bundle": _resource(
            "Bundle",
            "FHIR Bundle",
            ("type",),
            type={
                "enum": [
                    "document",
                    "message",
                    "transaction",
                    "transaction-response",
                    "batch",
                    "batch-response",
                    "history",
                    "searchset",
                    "collection",
                ]
            },
            identifier=OBJECT,
            timestamp=STRING,
            entry={"type": "array", "items": _object(fullUrl=STRING, resource=OBJECT)},
        ),
        "Questionnaire": _resource(
            "Questionnaire",
            "FHIR Questionnaire",
            ("status",),
            url=STRING,
            version=STRING,
            status=STRING,
            item={"type": "array", "items": OBJECT},
        ),
        "QuestionnaireResponse": _resource(
            "QuestionnaireResponse",
            "FHIR QuestionnaireResponse",
            ("status",),
            questionnaire=STRING,
            status={"enum": ["in-progress", "completed", "amended", "entered-in-error", "stopped"]},
            item={"type": "array", "items": OBJECT},
        ),
        "AnsweredForm": {"oneOf": [_ref("QuestionnaireResponse"), _ref("Bundle")]},
        "NextQuestionInput": {"oneOf": [_ref("QuestionnaireResponse"), _ref("Parameters")]},
        "PasInput": {"oneOf": [_ref("Bundle"), _ref("Parameters")]},
        "Subscription": _resource(
            "Subscription",
            "An R4 Subscription (Subscriptions backport, PAS profile); other elements are kept as given",
            ("criteria", "channel"),
            status={"enum": ["requested", "active", "error", "off"]},
            criteria={"type": "string", "description": "The PAS topic canonical"},
            end={"type": "string", "format": "date-time", "description": "When the subscription is turned off"},
            channel=_object(
                ("type", "endpoint", "payload"),
                type={"const": "rest-hook"},
                endpoint={"type": "string", "format": "uri"},
                payload=STRING,
                header=STRINGS,
                extension={
                    "type": "array",
                    "items": OBJECT,
                    "description": "backport-heartbeat-period (valueUnsignedInt, at least 10 seconds)",
                },
            ),
        ),
        "ValueSet": _resource(
            "ValueSet",
            "FHIR ValueSet with its expansion",
            ("url", "expansion"),
            url=STRING,
            version=STRING,
            expansion=_object(
                ("timestamp", "contains"),
                timestamp=STRING,
                total={"type": "integer"},
                contains={"type": "array", "items": coding},
            ),
        ),
        "CapabilityStatement": _resource(
            "CapabilityStatement",
            "FHIR CapabilityStatement",
            ("status", "kind", "fhirVersion", "format"),
            status=STRING,
            kind=STRING,
            fhirVersion=STRING,
            format=STRINGS,
            rest={"type": "array", "items": OBJECT},
        ),
        "CodeSystem": _resource(
            "CodeSystem",
            "FHIR CodeSystem",
            ("url", "status", "content"),
            url=STRING,
            status=STRING,
            content=STRING,
            concept={"type": "array", "items": _object(("code",), code=STRING, display=STRING)},
        ),
        "ClaimResponse": _resource(
            "ClaimResponse", "FHIR ClaimResponse (PAS)", ("status", "outcome"), status=STRING, outcome=STRING
        ),
        # --- SMART Backend Services
        "TokenRequest": _object(
            ("grant_type", "client_assertion_type", "client_assertion", "scope"),
            grant_type={"const": "client_credentials"},
            client_assertion_type={"const": smart.ASSERTION_TYPE},
            client_assertion={"type": "string", "description": "A JWT signed by the client (iss = sub = client id)"},
            scope={"type": "string", "description": "Space-separated SMART system scopes"},
            client_id=STRING,
        ),
        "TokenResponse": _object(
            ("access_token", "token_type", "expires_in", "scope"),
            access_token=STRING,
            token_type={"const": "bearer"},
            expires_in={"type": "integer"},
            scope=STRING,
        ),
        "SmartConfiguration": _object(
            ("token_endpoint", "grant_types_supported"),
            token_endpoint=STRING,
            token_endpoint_auth_methods_supported=STRINGS,
            token_endpoint_auth_signing_alg_values_supported=STRINGS,
            grant_types_supported=STRINGS,
            scopes_supported=STRINGS,
            capabilities=STRINGS,
        ),
        # --- the form page's JSON
        "FormPackage": _object(
            ("assertionId", "header", "questionnaire"),
            assertionId=STRING,
            header=OBJECT,
            questionnaire=_ref("Questionnaire"),
            response={"oneOf": [_ref("QuestionnaireResponse"), {"type": "null"}]},
        ),
        "FormDecision": _object(
            ("decision", "criteria", "response"),
            decision=STRING,
            paId={"type": ["string", "null"]},
            summary=STRING,
            criteria={"type": "array", "items": OBJECT},
            policy=OBJECT,
            response=_ref("QuestionnaireResponse"),
        ),
        # --- the reviewer
        "SignIn": _object(username=STRING, password=STRING, csrf=STRING),
        "FormCsrf": _object(csrf=STRING),
        "DecisionForm": _object(
            csrf=STRING,
            action={"enum": ["approve", "modify", "deny"]},
            reason=STRING,
            period_end={"type": "string", "format": "date"},
            quantity=STRING,
        ),
        "ReviewDecision": _object(
            ("action",),
            action={"enum": list(review.ACTIONS)},
            reason={"type": "string", "maxLength": review.MAX_REASON},
            period_end={"type": "string", "format": "date"},
            quantity={"type": "number", "exclusiveMinimum": 0},
        ),
        "ReviewSession": _object(
            ("username", "csrf", "expiresAt"), username=STRING, name=STRING, csrf=STRING, expiresAt=STRING
        ),
        "ReviewQueue": _object(
            ("status", "requests"),
            status={"const": "pended"},
            requests={
                "type": "array",
                "items": _object(("id", "status", "due_at"), id=STRING, status=STRING, due_at=STRING),
            },
        ),
        "ReviewRequest": _object(("id", "status", "items"), id=STRING, status=STRING, items={"type": "array"}),
        "ReviewOutcome": OBJECT,
        # --- health
        "Health": _object(("status",), status={"const": "ok"}),
        "Readiness": _object(
            ("status", "checks"),
            status={"enum": ["ready", "unavailable"]},
            checks={"type": "object", "additionalProperties": STRING},
            failing=STRINGS,
        ),
    }
