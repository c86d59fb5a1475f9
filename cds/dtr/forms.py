"""The DTR form for what a determination leaves open, and the draft response the record suggests.

One Questionnaire per determination, conforming to the DTR standard questionnaire profile: every question's
``item.code`` is the policy criterion it answers (``/fhir/CodeSystem/policy-criteria``), the indication question's
options are coded with the indications' criterion ids, and each indication's criteria sit behind its choice
(``enableWhen``). Items the record can prepopulate carry a CQL ``initialExpression`` into the policy's library
(``"Library".Define``, :mod:`cds.dtr.cql`), a laboratory question a ``contextExpression`` listing the results on
record, the indication question a ``candidateExpression`` (the indications the record points to, also the form's
``variable`` ``suggestedIndications``); the form's ``itemPopulationContext`` is the order it documents (the
library's ``"Order"``). The form closes with a signed attestation.

A Questionnaire holds no patient data: its content depends only on the policy version and the open criteria, and
its id is a hash of that content, so the same open criteria always give the same canonical. What the record
suggests for an answer goes into the draft QuestionnaireResponse (``information-origin`` auto-server).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from typing import Any

from cds import constants
from cds.dtr import cql
from policies.model import Policy, Product
from policies.questions import Question

SDC_CANDIDATE_EXPRESSION = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-candidateExpression"
SDC_CONTEXT_EXPRESSION = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-contextExpression"
SDC_POPULATION_CONTEXT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-itemPopulationContext"
VARIABLE = "http://hl7.org/fhir/StructureDefinition/variable"
ORDER_VARIABLE = "order"
SUGGESTED_VARIABLE = "suggestedIndications"

ATTESTATION_TEXT = (
    "I attest that the answers above are accurate and are supported by the patient's medical record, "
    "which is available to the plan on request."
)


def _help(link_id: str, text: str) -> dict[str, Any]:
    return {
        "linkId": f"{link_id}.help",
        "type": "display",
        "text": text,
        "extension": [
            {
                "url": constants.SDC_ITEM_CONTROL,
                "valueCodeableConcept": {
                    "coding": [{"system": constants.ITEM_CONTROL_SYSTEM, "code": "help", "display": "Help-Button"}]
                },
            }
        ],
    }


def criterion_code(link_id: str) -> str:
    """The criterion a linkId answers: the linkId itself, but for the date of birth an age-banded dose rule asks
    (``C1701-Isuprel-1.birthdate``), which answers the indication's dosing (``C1701-Isuprel-1.dosing``)."""
    return link_id.removesuffix(".birthdate") + ".dosing" if link_id.endswith(".birthdate") else link_id


def _cql(url: str, expression: str, name: str | None = None) -> dict[str, Any]:
    value: dict[str, Any] = {"language": "text/cql", "expression": expression}
    if name:
        value = {"name": name, **value}
    return {"url": url, "valueExpression": value}


def _item(
    q: Question,
    criteria_system: str,
    expression: Callable[[str], str | None],
    policy: Policy,
    candidates: str | None,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "linkId": q.link_id,
        "code": [
            {"system": criteria_system, "code": criterion_code(q.link_id), "display": (q.criterion or q.text)[:250]}
        ],
        "prefix": q.link_id,
        "text": q.text,
        "type": q.type,
        "required": True,
    }
    extensions: list[dict[str, Any]] = []
    if q.type == "quantity" and q.unit:
        extensions.append(
            {
                "url": constants.SDC_UNIT_OPTION,
                "valueCoding": {"system": constants.UCUM, "code": q.unit, "display": q.unit},
            }
        )
    initial = expression(q.input) if q.input else None
    if initial:
        extensions.append(_cql(constants.SDC_INITIAL_EXPRESSION, initial))
        if q.input and _reads_results(q, initial):
            # a laboratory question: the results on record, for the clinician to see beside it
            extensions.append(
                _cql(SDC_CONTEXT_EXPRESSION, cql.qualified(policy, cql.observations_define(q.input)), "results")
            )
    if candidates and q.type == "choice" and not q.input:
        # the indication question: the indications the record points to, for the client to offer first
        extensions.append(_cql(SDC_CANDIDATE_EXPRESSION, candidates))
    if extensions:
        item["extension"] = extensions
    if q.type == "choice":
        system = option_system(q, criteria_system)
        item["answerOption"] = [
            {"valueCoding": {"system": system, "code": code, "display": display}} for code, display in q.options
        ]
    if q.enable_when:
        question, code = q.enable_when
        item["enableWhen"] = [
            {"question": question, "operator": "=", "answerCoding": {"system": criteria_system, "code": code}}
        ]
    help_text = " ".join(
        t
        for t in (
            f"Policy criterion {q.link_id}: {q.criterion}" if q.criterion and q.criterion != q.text else "",
            q.hint,
        )
        if t
    )
    if help_text:
        item["item"] = [_help(q.link_id, help_text)]
    return item


def _reads_results(q: Question, initial: str) -> bool:
    """Whether the question's input is a laboratory result (its library defines ``"<input> observations"``): a
    value (quantity), a coded result (a choice with an input) or a value tested against its range."""
    return q.type in ("quantity", "choice") or initial.endswith(' below range"')


def _candidates(policy: Policy, product: Product, expression: Callable[[str], str | None]) -> str | None:
    """The CQL listing the product's indications the record points to (None when no indication names a diagnosis
    the library defines)."""
    defined = {n.input for ind in product.indications for n in ind.diagnosis.walk() if n.input and expression(n.input)}
    if not any(cql.evidence_inputs(ind, defined) for ind in product.indications):
        return None
    return cql.qualified(policy, cql.suggested_define(product))


def option_system(q: Question, criteria_system: str) -> str:
    """The code system of a choice's options: the criteria (the indication question's options are indications), or
    for a record input's coded result (positive / negative) the system the CQL prepopulates it with."""
    return constants.RESULT_SYSTEM if q.input else criteria_system


def _attestation() -> dict[str, Any]:
    return {"linkId": constants.ATTESTATION_LINK, "type": "boolean", "required": True, "text": ATTESTATION_TEXT}


def build(
    policy: Policy,
    product: Product,
    questions: Sequence[Question],
    base_url: str,
    *,
    library: str | None = None,
    expression: Callable[[str], str | None] = lambda _input: None,
) -> dict[str, Any]:
    """The Questionnaire for these open questions (deterministic: same input, same resource and id). ``library`` is
    the canonical (url|version) of the policy's CQL library, ``expression`` gives the CQL expression that
    prepopulates an input (None when the library has no define for it)."""
    criteria_system = base_url + constants.CRITERIA_SYSTEM_PATH
    items: list[dict[str, Any]] = [
        {
            "linkId": "intro",
            "type": "display",
            "text": (
                f"{policy.publisher} policy {policy.number} ({policy.title}), effective {policy.effective}: "
                f"documentation for {product.title}. Each question names the policy criterion it answers."
            ),
        }
    ]
    items.extend({"linkId": s.id, "prefix": s.id, "type": "display", "text": s.text} for s in product.statements)
    candidates = _candidates(policy, product, expression) if library else None
    items.extend(_item(q, criteria_system, expression, policy, candidates) for q in questions)
    items.append(_attestation())
    extensions: list[dict[str, Any]] = [
        {
            "url": constants.SDC_LAUNCH_CONTEXT,
            "extension": [
                {"url": "name", "valueCoding": {"system": constants.SDC_LAUNCH_CONTEXT_SYSTEM, "code": "patient"}},
                {"url": "type", "valueCode": "Patient"},
                {"url": "description", "valueString": "The patient the order is for"},
            ],
        },
        *(
            [
                # the order the form documents: every answer is about it (DTR clients pass it in context)
                _cql(SDC_POPULATION_CONTEXT, cql.qualified(policy, cql.ORDER_DEFINE), ORDER_VARIABLE),
            ]
            if library
            else []
        ),
        *([_cql(VARIABLE, candidates, SUGGESTED_VARIABLE)] if candidates else []),
        {
            "url": constants.SIGNATURE_REQUIRED,
            "valueCodeableConcept": {
                "coding": [
                    {
                        "system": constants.SIGNATURE_TYPE_SYSTEM,
                        "code": "1.2.840.10065.1.12.1.1",
                        "display": "Author's Signature",
                    }
                ]
            },
        },
    ]
    if library:
        extensions.insert(0, {"url": constants.CQF_LIBRARY, "valueCanonical": library})
    content = {"policy": policy.ref, "product": product.id, "items": items, "extensions": extensions}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
    qid = f"{policy.id}-{digest}"
    return {
        "resourceType": "Questionnaire",
        "id": qid,
        "meta": {"profile": [constants.DTR_QUESTIONNAIRE_PROFILE]},
        "extension": extensions,
        "url": f"{base_url}/fhir/Questionnaire/{qid}",
        "version": policy.version,
        "name": f"{policy.number.replace('-', '')}Documentation",
        "title": f"{policy.number} {product.title}: documentation for prior authorization",
        "status": "active",
        "subjectType": ["Patient"],
        "publisher": policy.publisher,
        "description": f"Questions for the criteria of {policy.number} ({policy.ref}) that the record did not settle.",
        "effectivePeriod": {"start": str(policy.effective)},
        "item": items,
    }


def canonical(questionnaire: Mapping[str, Any]) -> str:
    return f"{questionnaire['url']}|{questionnaire['version']}"


def answer_json(q: Question, value: Any, criteria_system: str) -> dict[str, Any] | None:
    """A QuestionnaireResponse answer for a value the record suggests (None when it does not fit the item)."""
    options = dict(q.options)
    if q.type == "boolean" and isinstance(value, bool):
        return {"valueBoolean": value}
    if q.type == "date" and isinstance(value, str):
        return {"valueDate": value}
    if q.type == "choice" and isinstance(value, str) and value in options:
        return {"valueCoding": {"system": option_system(q, criteria_system), "code": value, "display": options[value]}}
    return None


def origin(source: str, author: str | None = None) -> dict[str, Any]:
    """The DTR information-origin extension of an answer (author: who answered, for manual and override)."""
    parts: list[dict[str, Any]] = [{"url": "source", "valueCode": source}]
    if author:
        parts.append({"url": "author", "valueReference": {"reference": author}})
    return {"url": constants.DTR_INFORMATION_ORIGIN, "extension": parts}


def draft_response(
    questionnaire: Mapping[str, Any],
    questions: Sequence[Question],
    *,
    patient: str,
    coverage: str,
    order: str,
    today: date,
    base_url: str,
    assertion_id: str,
    author: str | None = None,
) -> dict[str, Any]:
    """The QuestionnaireResponse a DTR package carries: the answers the record suggests (``information-origin``
    auto-server), linked to the Coverage, the order and (identifier) the coverage assertion it documents. ``author``
    is the clinician the hook named (``userId``), who answers the form (and is named on answers they give)."""
    criteria_system = base_url + constants.CRITERIA_SYSTEM_PATH
    items = []
    for q in questions:
        if q.prefill is None:
            continue
        answer = answer_json(q, q.prefill, criteria_system)
        if answer is None:
            continue
        answer["extension"] = [origin("auto-server")]
        items.append({"linkId": q.link_id, "text": q.text, "answer": [answer]})
    response: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "meta": {"profile": [constants.DTR_QR_PROFILE]},
        "extension": [
            {"url": constants.DTR_QR_COVERAGE, "valueReference": {"reference": coverage}},
            {"url": constants.DTR_QR_CONTEXT, "valueReference": {"reference": order}},
            {
                "url": constants.DTR_INTENDED_USE,
                "valueCodeableConcept": {"coding": [{"system": constants.CRD_TEMP_SYSTEM, "code": "withpa"}]},
            },
        ],
        "identifier": {"system": base_url + constants.ASSERTION_ID_PATH, "value": assertion_id},
        "questionnaire": canonical(questionnaire),
        "status": "in-progress",
        "subject": {"reference": patient},
        "authored": today.isoformat(),
    }
    if author:
        response["author"] = {"reference": author}
    if items:
        response["item"] = items
    return response
