"""PAS's HTTP edge under ``/fhir``: ``Claim/$submit`` and ``Claim/$inquire``. Thin: check the token's scopes, parse,
call :mod:`cds.pas.service`, answer FHIR JSON. The body is the Bundle itself, or Parameters with it as ``resource``.
An unprocessable Bundle is a 4xx OperationOutcome (PAS §spec-35); a processable one is a 200 with the PAS response
Bundle (``$submit``) or Parameters with 0..* ``return`` inquiry response Bundles (``$inquire``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response

from cds.errors import InvalidResource
from cds.fhir_api import fhir_body, fhir_response
from cds.pas import bundle, service
from cds.runtime import current
from cds.smart import require_scopes

log = logging.getLogger("cds.pas")
bp = Blueprint("pas_fhir", __name__, url_prefix="/fhir")

SUBMIT_SCOPES = ("system/Claim.c",)  # SMART v2: $submit creates a prior-authorization request
INQUIRE_SCOPES = ("system/Claim.r",)  # $inquire reads the state of earlier requests


def _bundle() -> Any:
    body = fhir_body()
    if isinstance(body, Mapping) and body.get("resourceType") == "Parameters":
        given = body.get("parameter")
        given = given if isinstance(given, list) else ()  # anything else is no resource parameter: refused below
        parts = [p for p in given if isinstance(p, Mapping) and p.get("name") == "resource"]
        if len(parts) != 1 or not isinstance(parts[0].get("resource"), Mapping):
            raise InvalidResource("Parameters carry the Bundle as one resource parameter", expression="Parameters")
        return parts[0]["resource"]
    return body


@bp.post("/Claim/$submit")
def submit() -> Response:
    rt = current()
    client = require_scopes(rt, *SUBMIT_SCOPES)
    body = _bundle()
    with bundle.read_as_r4(body):
        out, created = service.submit(rt, body, submitter=client)
    log.info("PAS submit: response %s (%s)", out["entry"][0]["resource"]["id"], "new" if created else "stored")
    return fhir_response(out)


@bp.post("/Claim/$inquire")
def inquire() -> Response:
    rt = current()
    client = require_scopes(rt, *INQUIRE_SCOPES)
    body = _bundle()
    with bundle.read_as_r4(body):
        out = service.inquire(rt, body, submitter=client)
    log.info("PAS inquire: %d match(es)", len(out["parameter"]))
    return fhir_response(out)
