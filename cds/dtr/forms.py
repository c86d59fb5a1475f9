"""Questionnaires for exactly the criteria a determination left open, and the draft response the record suggests.

A Questionnaire holds no patient data: its content depends only on the policy version and the open criteria, and
its id is a hash of that content, so the same open criteria always give the same canonical. What the record
suggests for an answer goes into a draft QuestionnaireResponse stored with the assertion (DTR's prepopulation).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from cds import constants
from policies.model import Policy, Product
from policies.questions import Question


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


def _item(q: Question, criteria_system: str) -> dict[str, Any]:
    item: dict[str, Any] = {"linkId": q.link_id, "prefix": q.link_id, "text": q.text, "type": q.type, "required": True}
    if q.type == "quantity" and q.unit:
        item["extension"] = [
            {
                "url": constants.SDC_UNIT_OPTION,
                "valueCoding": {"system": "http://unitsofmeasure.org", "code": q.unit, "display": q.unit},
            }
        ]
    if q.type == "choice":
        item["answerOption"] = [
            {"valueCoding": {"system": criteria_system, "code": code, "display": display}}
            for code, display in q.options
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


def build(policy: Policy, product: Product, questions: Sequence[Question], base_url: str) -> dict[str, Any]:
    """The Questionnaire for these open questions (deterministic: same input, same resource and id)."""
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
    items.extend(_item(q, criteria_system) for q in questions)
    content = {"policy": policy.ref, "product": product.id, "items": items}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
    qid = f"{policy.id}-{digest}"
    return {
        "resourceType": "Questionnaire",
        "id": qid,
        "meta": {"profile": [constants.DTR_QUESTIONNAIRE_PROFILE]},
        "url": f"{base_url}/fhir/Questionnaire/{qid}",
        "version": policy.version,
        "name": f"{policy.number.replace('-', '')}Documentation",
        "title": f"{policy.number} {product.title}: documentation for prior authorization",
        "status": "active",
        "subjectType": ["Patient"],
        "publisher": policy.publisher,
        "description": f"Questions for the criteria of {policy.number} ({policy.ref}) that the record did not settle.",
        "item": items,
    }


def canonical(questionnaire: Mapping[str, Any]) -> str:
    return f"{questionnaire['url']}|{questionnaire['version']}"


def _answer(q: Question, value: Any, criteria_system: str, options: Mapping[str, str]) -> dict[str, Any] | None:
    if q.type == "boolean" and isinstance(value, bool):
        return {"valueBoolean": value}
    if q.type == "date" and isinstance(value, str):
        return {"valueDate": value}
    if q.type == "choice" and isinstance(value, str) and value in options:
        return {"valueCoding": {"system": criteria_system, "code": value, "display": options[value]}}
    return None


def draft_response(
    questionnaire: Mapping[str, Any],
    questions: Sequence[Question],
    *,
    patient: str,
    coverage: str,
    order: str,
    today: date,
    base_url: str,
) -> dict[str, Any] | None:
    """A QuestionnaireResponse prepopulated with what the record suggests, or None when it suggests nothing."""
    criteria_system = base_url + constants.CRITERIA_SYSTEM_PATH
    items = []
    for q in questions:
        if q.prefill is None:
            continue
        answer = _answer(q, q.prefill, criteria_system, dict(q.options))
        if answer is None:
            continue
        answer["extension"] = [
            {"url": constants.DTR_INFORMATION_ORIGIN, "extension": [{"url": "source", "valueCode": "auto-server"}]}
        ]
        items.append({"linkId": q.link_id, "text": q.text, "answer": [answer]})
    if not items:
        return None
    return {
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
        "questionnaire": canonical(questionnaire),
        "status": "in-progress",
        "subject": {"reference": patient},
        "authored": today.isoformat(),
        "item": items,
    }
