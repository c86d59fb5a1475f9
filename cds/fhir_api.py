"""The FHIR endpoints under ``/fhir``: the Questionnaires our coverage information names, the prepopulated
responses, the criteria code system, and a CapabilityStatement. Errors are OperationOutcomes."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, request

from cds import constants, jsonsafe, smart
from cds.errors import NotFound, UnsupportedMedia
from cds.runtime import current

bp = Blueprint("fhir", __name__, url_prefix="/fhir")
FHIR_JSON = "application/fhir+json"


def fhir_body() -> Any:
    """The request's JSON body, for the FHIR endpoints: FHIR JSON (or plain JSON) only, bounded and parsed strictly
    (:func:`cds.jsonsafe.loads`); anything else is a 415 or 400 OperationOutcome."""
    ctype = request.mimetype
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMedia(f"Send FHIR JSON (application/fhir+json), not {ctype}")
    return jsonsafe.loads(request.get_data(), source="The request body")


def fhir_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, mimetype=FHIR_JSON)


DTR_IG = "http://hl7.org/fhir/us/davinci-dtr/ImplementationGuide/hl7.fhir.us.davinci-dtr"
DTR_PAYER_CAPABILITY = "http://hl7.org/fhir/us/davinci-dtr/CapabilityStatement/dtr-payer-service"
DTR_OPERATIONS = "http://hl7.org/fhir/us/davinci-dtr/OperationDefinition/"
SDC_NEXT_QUESTION = "http://hl7.org/fhir/uv/sdc/OperationDefinition/Questionnaire-next-question"
PAS_TOPIC = "http://hl7.org/fhir/us/davinci-pas/SubscriptionTopic/PASSubscriptionTopic"
SUBSCRIPTIONS_BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/"
SUBSCRIPTION_TOPIC_EXT = SUBSCRIPTIONS_BACKPORT + "StructureDefinition/capabilitystatement-subscriptiontopic-canonical"
SUBSCRIPTION_STATUS_OP = SUBSCRIPTIONS_BACKPORT + "OperationDefinition/backport-subscription-status"


def _operation(name: str, definition: str) -> dict[str, str]:
    return {"name": name, "definition": definition}


@bp.get("/metadata")
def metadata() -> Response:
    rt = current()
    return fhir_response(
        {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": rt.clock().date().isoformat(),
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "implementation": {
                "description": "Payer prior-authorization service (Da Vinci CRD, DTR payer service)",
                "url": f"{rt.base_url}/fhir",
            },
            "implementationGuide": [DTR_IG],
            "instantiates": [DTR_PAYER_CAPABILITY],
            "rest": [
                {
                    "mode": "server",
                    "security": {
                        "service": [
                            {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                        "code": "SMART-on-FHIR",
                                    }
                                ]
                            }
                        ],
                        "description": "SMART Backend Services: client_credentials with a signed JWT assertion at "
                        f"{rt.base_url}/auth/token (see {rt.base_url}/.well-known/smart-configuration)",
                    },
                    "resource": [
                        {
                            "type": "Questionnaire",
                            "interaction": [{"code": "read"}],
                            "operation": [
                                _operation("questionnaire-package", DTR_OPERATIONS + "questionnaire-package"),
                                _operation("next-question", SDC_NEXT_QUESTION),
                                _operation("log-questionnaire-errors", DTR_OPERATIONS + "log-questionnaire-errors"),
                            ],
                        },
                        {"type": "QuestionnaireResponse", "interaction": [{"code": "read"}, {"code": "create"}]},
                        {
                            "type": "ValueSet",
                            "operation": [
                                _operation("expand", "http://hl7.org/fhir/OperationDefinition/ValueSet-expand")
                            ],
                        },
                        {"type": "CodeSystem", "interaction": [{"code": "read"}]},
                        {
                            "type": "Subscription",
                            "extension": [{"url": SUBSCRIPTION_TOPIC_EXT, "valueCanonical": PAS_TOPIC}],
                            "interaction": [{"code": c} for c in ("create", "read", "update", "delete")],
                            "operation": [_operation("status", SUBSCRIPTION_STATUS_OP)],
                        },
                    ],
                }
            ],
        }
    )


@bp.get("/Questionnaire/<qid>")
def questionnaire(qid: str) -> Response:
    found = current().store.questionnaire(qid)
    if found is None:
        raise NotFound(f"Questionnaire/{qid} is not known here")
    return fhir_response(found)


@bp.get("/QuestionnaireResponse/<assertion_id>")
def draft_response(assertion_id: str) -> Response:
    """The response of an assertion: the prepopulated draft, or once the form was answered, the answered response
    with the coverage-information it settled. It carries patient data, so the caller must present a CDS client JWT
    for this URL, like a hook call."""
    rt = current()
    if rt.verifier is not None:
        smart.verify_client_jwt(rt, f"{rt.base_url}/fhir/QuestionnaireResponse/{assertion_id}")
    record = rt.store.assertion(assertion_id)
    if record is None or record.draft_response is None:
        raise NotFound(f"QuestionnaireResponse/{assertion_id} is not known here")
    answered = rt.store.responses_for(assertion_id)
    latest = answered[-1]["resource"] if answered else record.draft_response  # once answered, the answers
    return fhir_response({**latest, "id": assertion_id})


@bp.get("/CodeSystem/policy-criteria")
def criteria() -> Response:
    rt = current()
    concepts = []
    seen: set[str] = set()
    for policy in rt.policies.policies.values():
        for product in policy.products:
            for node in product.all_nodes():
                if node.id and node.id not in seen:
                    seen.add(node.id)
                    concepts.append({"code": node.id, "display": node.text[:250]})
            for ind in product.indications:
                if ind.id not in seen:
                    seen.add(ind.id)
                    concepts.append({"code": ind.id, "display": ind.title})
            if product.other_use.id not in seen:
                seen.add(product.other_use.id)
                concepts.append({"code": product.other_use.id, "display": product.other_use.text})
    return fhir_response(
        {
            "resourceType": "CodeSystem",
            "id": "policy-criteria",
            "url": rt.base_url + constants.CRITERIA_SYSTEM_PATH,
            "status": "active",
            "content": "complete",
            "caseSensitive": True,
            "description": "Criterion ids of the payer policies, following each document's own numbering.",
            "concept": concepts,
        }
    )
