"""Reading a QuestionnaireResponse against the form it answers: each answer as the engine takes it, checked.

An answer is read by its item's type (boolean, date, coded choice, quantity, attachment); a quantity in another
unit than the one asked for is converted by UCUM, and one that cannot be converted is refused with the units named.
Only enabled items count (``enableWhen`` on the answers given), and every enabled required item must be answered.
Each answer keeps its ``information-origin``: what the service prefilled and the clinician left is ``auto-server``;
an answer the clinician gave or changed is ``manual`` or ``override`` with its author. A client's own origin is kept
(``auto-client`` for its CQL, ``manual``, ``override``), but not ``auto-server`` on a value the service did not
prefill.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from cds import constants
from cds.dtr.forms import origin
from cds.errors import InvalidResource
from fhir_mappings import units
from policies.engine import Quantity


@dataclass(frozen=True)
class Read:
    values: dict[str, Any]  # linkId -> the engine's answer (bool, ISO date, code, Quantity, True for an attachment)
    response: dict[str, Any]  # the response with every answer's information-origin set


def _questions(items: Any) -> Iterator[Mapping[str, Any]]:
    for item in items or ():
        if isinstance(item, Mapping):
            if item.get("type") not in ("display", "group"):
                yield item
            yield from _questions(item.get("item"))


def _answers(items: Any) -> Iterator[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    for item in items or ():
        if not isinstance(item, Mapping):
            raise InvalidResource("QuestionnaireResponse.item must be objects", expression="QuestionnaireResponse.item")
        for answer in item.get("answer") or ():
            if not isinstance(answer, Mapping):
                raise InvalidResource(
                    f"the answer to {item.get('linkId')} must be an object", expression="QuestionnaireResponse.item"
                )
            yield str(item.get("linkId")), item, answer
            yield from _answers(answer.get("item"))
        yield from _answers(item.get("item"))


def _value(question: Mapping[str, Any], answer: Mapping[str, Any], where: str) -> Any:
    kind = question.get("type")
    if kind == "boolean":
        if not isinstance(answer.get("valueBoolean"), bool):
            raise InvalidResource(f"{where} is answered yes or no (valueBoolean)", expression=where)
        return answer["valueBoolean"]
    if kind == "date":
        value = answer.get("valueDate")
        if not isinstance(value, str):
            raise InvalidResource(f"{where} is answered with a date (valueDate)", expression=where)
        try:
            if len(value) == 10:
                date.fromisoformat(value)
            elif len(value) not in (4, 7) or not value[:4].isdigit():
                raise ValueError(value)
        except ValueError:
            raise InvalidResource(f"{where}: '{value[:20]}' is not a date (YYYY, YYYY-MM or YYYY-MM-DD)") from None
        return value
    if kind == "choice":
        coding = answer.get("valueCoding")
        options = {o["valueCoding"].get("code") for o in question.get("answerOption") or () if "valueCoding" in o}
        if not isinstance(coding, Mapping) or coding.get("code") not in options:
            raise InvalidResource(
                f"{where} is answered with one of its options ({', '.join(sorted(str(o) for o in options))})",
                expression=where,
            )
        return coding["code"]
    if kind == "quantity":
        return _quantity(question, answer.get("valueQuantity"), where)
    if kind == "attachment":
        attachment = answer.get("valueAttachment")
        if not isinstance(attachment, Mapping) or not (attachment.get("data") or attachment.get("url")):
            raise InvalidResource(f"{where} is answered with a document (valueAttachment with data or url)")
        return True
    raise InvalidResource(f"{where}: items of type {kind} are not answered on this form", expression=where)


def asked_unit(question: Mapping[str, Any]) -> str | None:
    for ext in question.get("extension") or ():
        if ext.get("url") == constants.SDC_UNIT_OPTION:
            return str(ext["valueCoding"]["code"])
    return None


def _quantity(question: Mapping[str, Any], raw: Any, where: str) -> Quantity:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("value"), int | float) or isinstance(raw["value"], bool):
        raise InvalidResource(f"{where} is answered with a quantity (valueQuantity with a value)", expression=where)
    wanted = asked_unit(question)
    given = raw.get("code") or raw.get("unit")
    if wanted is None:
        return Quantity(float(raw["value"]), str(given or ""))
    if not given:
        raise InvalidResource(f"{where}: give the unit of {raw['value']} (the form asks in {wanted})", expression=where)
    if raw.get("system") not in (None, constants.UCUM):
        raise InvalidResource(f"{where}: the unit must be a UCUM code (system {constants.UCUM})", expression=where)
    try:
        value = units.convert(float(raw["value"]), str(given), wanted)
    except ValueError:
        raise InvalidResource(
            f"{where}: {given} cannot be converted to {wanted}, the unit this criterion is measured in",
            expression=where,
        ) from None
    return Quantity(value, wanted)


def _enabled(question: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    conditions = question.get("enableWhen") or ()
    return all(values.get(c.get("question")) == (c.get("answerCoding") or {}).get("code") for c in conditions)


def _origin_of(answer: Mapping[str, Any]) -> str | None:
    for ext in answer.get("extension") or ():
        if isinstance(ext, Mapping) and ext.get("url") == constants.DTR_INFORMATION_ORIGIN:
            for part in ext.get("extension") or ():
                if isinstance(part, Mapping) and part.get("url") == "source":
                    return str(part.get("valueCode"))
    return None


def read(
    questionnaire: Mapping[str, Any],
    response: Mapping[str, Any],
    prefilled: Mapping[str, Any],
    *,
    author: str | None,
) -> Read:
    """The answers of a completed response to ``questionnaire``. ``prefilled`` is the draft the service made (its
    answers by linkId); ``author`` the reference of who completed the form (QuestionnaireResponse.author)."""
    questions = {str(q["linkId"]): q for q in _questions(questionnaire.get("item"))}
    drafted = {str(i.get("linkId")): i.get("answer") for i in prefilled.get("item") or ()}
    values: dict[str, Any] = {}
    for link_id, _item, answer in _answers(response.get("item")):
        question = questions.get(link_id)
        where = f"QuestionnaireResponse.item[linkId={link_id}]"
        if question is None:
            continue  # display-only or unknown items carry nothing the policy reads
        if link_id in values:
            raise InvalidResource(f"{where} is answered more than once; each criterion takes one answer")
        values[link_id] = _value(question, answer, where)
    for link_id in list(values):
        if not _enabled(questions[link_id], values):
            del values[link_id]  # an answer to a question the form does not show (another indication's) counts not
    missing = [
        link for link, q in questions.items() if q.get("required") and _enabled(q, values) and link not in values
    ]
    if missing:
        raise InvalidResource(
            f"required answers are missing: {', '.join(missing[:8])}", expression="QuestionnaireResponse.item"
        )
    return Read(values, _with_origins(response, drafted, author))


def _with_origins(response: Mapping[str, Any], drafted: Mapping[str, Any], author: str | None) -> dict[str, Any]:
    """The response with an information-origin on every answer: kept when the client gave a valid one, else
    auto-server for a prefilled answer left as it was, override for a changed one, manual for a new one."""

    def item_with(item: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(item)
        link = str(item.get("linkId"))
        if item.get("answer"):
            answers = []
            for answer in item["answer"]:
                answer = dict(answer)
                if answer.get("item"):
                    answer["item"] = [item_with(i) for i in answer["item"]]
                was = drafted.get(link) or []
                plain = {k: v for k, v in answer.items() if k.startswith("value")}
                as_drafted = plain in [{k: v for k, v in a.items() if k.startswith("value")} for a in was]
                source = _origin_of(answer)
                if source in ("auto", "auto-server") and not as_drafted:
                    source = None  # the service did not prefill this value: the claim is not kept
                if source not in ("auto-client", "auto-server", "override", "manual", "auto"):
                    source = "auto-server" if as_drafted else "override" if was else "manual"
                    kept = [
                        e for e in answer.get("extension") or () if e.get("url") != constants.DTR_INFORMATION_ORIGIN
                    ]
                    answer["extension"] = [*kept, origin(source, author if source != "auto-server" else None)]
                answers.append(answer)
            out["answer"] = answers
        if item.get("item"):
            out["item"] = [item_with(i) for i in item["item"]]
        return out

    result = dict(response)
    result["item"] = [item_with(i) for i in response.get("item") or ()]
    return result
