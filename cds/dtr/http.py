"""DTR's HTTP edge under ``/fhir``: ``$questionnaire-package``, answered QuestionnaireResponses,
``$log-questionnaire-errors`` and ``ValueSet/$expand``. Thin: check the token's scopes, parse, call
:mod:`cds.dtr.service`, answer FHIR JSON. Every error is an OperationOutcome (4xx for the client's mistakes)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, request

from cds import constants
from cds.crd import coverage_info
from cds.dtr import adaptive, service, valuesets
from cds.errors import BusinessRule, InvalidRequest, InvalidResource, NotFound
from cds.fhir_api import fhir_body, fhir_response
from cds.logsafe import clean
from cds.runtime import Runtime, current
from cds.smart import require_scopes

log = logging.getLogger("cds.dtr")
bp = Blueprint("dtr_fhir", __name__, url_prefix="/fhir")

READ_FORMS = ("system/Questionnaire.rs", "system/Library.rs", "system/ValueSet.rs")
WRITE_RESPONSES = ("system/QuestionnaireResponse.cu",)


def parameters(body: Any, operation: str) -> dict[str, list[Mapping[str, Any]]]:
    """A Parameters body by parameter name (each name may repeat)."""
    if not isinstance(body, Mapping) or body.get("resourceType") != "Parameters":
        raise InvalidResource(f"{operation} takes a Parameters resource", expression="resourceType")
    found = body.get("parameter")
    if found is not None and not isinstance(found, list):
        raise InvalidResource("parameter is a list of parameters", expression="Parameters.parameter")
    out: dict[str, list[Mapping[str, Any]]] = {}
    for i, part in enumerate(found or ()):
        if not isinstance(part, Mapping) or not isinstance(part.get("name"), str):
            raise InvalidResource("each parameter has a name", expression=f"Parameters.parameter[{i}]")
        out.setdefault(part["name"], []).append(part)
    return out


def _outcome(severity: str, code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "details": {"text": text}}],
    }


def _instant(parts: list[Mapping[str, Any]]) -> datetime | None:
    if not parts:
        return None
    raw = parts[0].get("valueInstant") or parts[0].get("valueDateTime")
    try:
        return datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("changedsince is a FHIR instant", expression="Parameters.changedsince") from None


@bp.post("/Questionnaire/$questionnaire-package")
@bp.post("/$questionnaire-package")
def questionnaire_package() -> Response:
    rt = current()
    client = require_scopes(rt, *READ_FORMS)
    started, received = time.perf_counter(), rt.clock()
    params = parameters(fhir_body(), "$questionnaire-package")
    coverages = [p.get("resource") for p in params.get("coverage", ())]
    coverage = coverages[0] if coverages else None
    if not isinstance(coverage, Mapping) or coverage.get("resourceType") != "Coverage":
        raise InvalidRequest("coverage (a Coverage resource) is required", expression="Parameters.coverage")
    orders = [p["resource"] for p in params.get("order", ()) if isinstance(p.get("resource"), Mapping)]
    wanted = [str(p.get("valueCanonical")) for p in params.get("questionnaire", ()) if p.get("valueCanonical")]
    context = next((str(p.get("valueString")) for p in params.get("context", ()) if p.get("valueString")), None)
    if not (orders or wanted or context):
        raise InvalidRequest("send an order, a questionnaire or a context (DTR dtr-1)", expression="Parameters")
    since = _instant(list(params.get("changedsince", ())))
    notes: list[dict[str, Any]] = []
    bundles: list[dict[str, Any]] = []
    made: list[Any] = []
    if context is not None:
        bundles, notes = _for_context(rt, context, coverage, orders)
    else:
        made = service.standalone(rt, coverage, orders, client)
        bundles = [service.bundle(rt, policy, q, dict(r.draft_response or {})) for r, policy, q in made]
        if not bundles:
            notes.append(
                _outcome("information", "informational", "None of the orders needs documentation for this payer")
            )
    adaptive_wanted = bool(rt.config["dtr_adaptive"]) or any(adaptive.is_adaptive(w) for w in wanted)
    wanted = [adaptive.standard_canonical(w) for w in wanted]
    if wanted:  # only the forms asked for, by canonical with or without version; a warning for the others (§oper-9)
        bundles = [b for b in bundles if {_canonical(b), _canonical(b).partition("|")[0]} & set(wanted)]
        found = {c for b in bundles for c in (_canonical(b), _canonical(b).partition("|")[0])}
        notes.extend(
            _outcome("warning", "not-found", f"The Questionnaire {missing[:200]} is not one for these orders")
            for missing in sorted(set(wanted) - found)
        )
    if since is not None:
        bundles = [b for b in bundles if _changed(rt, b, since)]
    if adaptive_wanted:
        bundles = [adaptive.adapt(b, rt.base_url) for b in bundles]
    shape = str(rt.config["dtr_version"])
    name = "PackageBundle" if shape == "2.0.1" else "packagebundle"
    out: dict[str, Any] = {
        "resourceType": "Parameters",
        "meta": {"profile": [constants.DTR_PACKAGE_OUTPUT_PROFILE]},
        "parameter": [{"name": name, "resource": b} for b in bundles],
    }
    if notes:
        issues = [i for n in notes for i in n["issue"]]
        out["parameter"].append(
            {
                "name": "operationOutcome" if shape == "2.0.1" else "outcome",
                "resource": {"resourceType": "OperationOutcome", "issue": issues},
            }
        )
    resp = fhir_response(out)
    ms = int((time.perf_counter() - started) * 1000)
    if context is None and made:  # the assertions a stand-alone package made, kept with the call that made them
        rt.store.record_exchange(
            hook_instance=f"dtr-package:{made[0][0].assertion_id}",
            service_id="dtr-questionnaire-package",
            client_iss=client,
            received_at=received,
            status=200,
            duration_ms=ms,
            request=request.get_data(as_text=True),
            response=resp.get_data(as_text=True),
            queried=[],
            records=[m[0] for m in made],
        )
    log.info("dtr package bundles=%s ms=%s", len(bundles), ms)
    return resp


def _canonical(bundle: Mapping[str, Any]) -> str:
    questionnaire = bundle["entry"][0]["resource"]
    return f"{questionnaire['url']}|{questionnaire['version']}"


def _changed(rt: Runtime, bundle: Mapping[str, Any], since: datetime) -> bool:
    made = rt.store.questionnaire_created(bundle["entry"][0]["resource"]["id"])
    return made is None or made > since


def _for_context(
    rt: Runtime, context: str, coverage: Mapping[str, Any], orders: list[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    record = rt.store.assertion(context)
    if record is None:
        raise NotFound(
            f"The context '{clean(context)}' is no coverage assertion (or PAS request) known here",
            expression="Parameters.context",
        )
    named = coverage_info.values(record.extension, "coverage")
    expected = str(named[0].get("reference") or "") if named and isinstance(named[0], Mapping) else ""
    given = f"Coverage/{coverage.get('id')}"
    if expected and coverage.get("id") and given != expected:
        raise BusinessRule(
            f"The coverage {clean(given)} is not the one the assertion was made for", expression="Parameters.coverage"
        )
    ids = {o.get("id") for o in orders if o.get("resourceType") == "MedicationRequest"}
    if ids and record.order_ref.rsplit("/", 1)[-1] not in ids:
        raise BusinessRule(
            "None of the orders is the one the coverage assertion is about", expression="Parameters.order"
        )
    try:
        return [service.package_for(rt, context)], []
    except service.NoLongerNeeded as exc:  # DTR §oper-8: say why instead of a form
        return [], [_outcome("information", "informational", exc.message)]


@bp.post("/QuestionnaireResponse")
def questionnaire_response() -> Response:
    """A completed response (or DTR QuestionnaireResponse Bundle): it settles the assertion it documents."""
    rt = current()
    require_scopes(rt, *WRITE_RESPONSES)
    settled = service.submit(rt, fhir_body(), via="fhir")
    log.info("dtr response decision=%s", settled.decision)
    resp = fhir_response(settled.response, 201)
    resp.headers["Location"] = f"{rt.base_url}/fhir/QuestionnaireResponse/{settled.assertion_id}"
    return resp


@bp.post("/Questionnaire/$log-questionnaire-errors")
def log_questionnaire_errors() -> Response:
    """What a DTR client could not do with a form (DTR §oper-1): kept in the store, acknowledged. The outcomes must
    carry no patient data (§oper-2); they are stored, never logged."""
    rt = current()
    client = require_scopes(rt, *READ_FORMS)
    params = parameters(fhir_body(), "$log-questionnaire-errors")
    forms = [p.get("valueCanonical") for p in params.get("questionnaire", ())]
    outcomes = [p.get("resource") for p in params.get("operationOutcome", ())]
    if not forms or not all(isinstance(f, str) and f for f in forms):
        raise InvalidRequest("questionnaire (a canonical) is required", expression="Parameters.questionnaire")
    if not outcomes or not all(
        isinstance(o, Mapping) and o.get("resourceType") == "OperationOutcome" for o in outcomes
    ):
        raise InvalidRequest(
            "operationOutcome (OperationOutcome resources) is required", expression="Parameters.operationOutcome"
        )
    rt.store.record_form_errors(client, [str(f) for f in forms], json.dumps(outcomes), rt.clock())
    log.info("dtr form errors questionnaires=%s outcomes=%s", len(forms), len(outcomes))
    return fhir_response(_outcome("information", "informational", f"{len(outcomes)} outcome(s) recorded"))


@bp.route("/ValueSet/$expand", methods=["GET", "POST"])
def expand() -> Response:
    """Expand one of our value sets by canonical (``url``, optional ``valueSetVersion``), dated now (DTR §oper-4)."""
    rt = current()
    require_scopes(rt, "system/ValueSet.rs")
    if request.method == "POST":
        params = parameters(fhir_body(), "$expand")
        url = next((str(p.get("valueUri") or p.get("valueString") or "") for p in params.get("url", ())), "")
        version = next((str(p.get("valueString")) for p in params.get("valueSetVersion", ())), None)
    else:
        url, version = request.args.get("url", ""), request.args.get("valueSetVersion")
    if not url:
        raise InvalidRequest("url (the value set's canonical) is required", expression="url")
    if "|" in url and version is None:
        url, version = url.split("|", 1)
    found = valuesets.find(rt.mappings, url, version)
    if found is None:
        raise NotFound(f"No value set {clean(url)} here", expression="url")
    return fhir_response(_expanded(found, rt.clock()))


def _expanded(value_set: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The value set with an expansion dated now: every code its compose includes (our value sets list codes
    explicitly, all active)."""
    contains = [
        {"system": inc.get("system"), "code": c.get("code"), **({"display": c["display"]} if c.get("display") else {})}
        for inc in (value_set.get("compose") or {}).get("include") or ()
        for c in inc.get("concept") or ()
    ]
    return {
        **value_set,
        "expansion": {"timestamp": now.isoformat(timespec="seconds"), "total": len(contains), "contains": contains},
    }


@bp.post("/Questionnaire/$next-question")
def next_question() -> Response:
    """The next items of an adaptive form (SDC ``$next-question``), or the completed response with the
    coverage-information; the body is the QuestionnaireResponse, bare or as the ``questionnaire-response`` part."""
    rt = current()
    require_scopes(rt, *READ_FORMS)
    started = time.perf_counter()
    out = adaptive.next_question(rt, fhir_body())
    log.info("dtr next-question status=%s ms=%.1f", out.get("status"), (time.perf_counter() - started) * 1000)
    return fhir_response(out)
