"""Adaptive DTR forms (SDC ``$next-question``, DTR ``dtr-questionnaire-adapt``): the standard form, asked in steps.

The package carries an empty ``dtr-questionnaire-adapt-search`` Questionnaire whose ``questionnaireAdaptive`` URL
is this service's ``/fhir``, and a QuestionnaireResponse answering a contained Questionnaire ``derivedFrom`` the
standard form. Each ``$next-question`` call reads the answers so far against the standard form (the server's own
items, never the client's copy) and appends the items they now require: first the indication choice and every item
that depends on nothing (prefilled from the assertion's draft, ``auto-server``), then the chosen indication's
criteria, all at once (DTR §spec-36). Adaptive items carry no ``enableWhen`` (the profile forbids it): the server
decides what to show. When every question shown is answered, the policy is evaluated once: when the answers meet
it the form closes with the attestation and the question whether to issue the prior authorization now (§spec-41),
otherwise with the attestation; a display item says the clinical questions are done (§spec-39). The last answer
settles the assertion as a standard response would, and the response comes back ``completed`` with the CRD
coverage-information at its root. Nothing is evaluated before the clinical questions are done and nothing is stored
before the last answer, so each step costs two store reads.
"""

from __future__ import annotations

import copy
import html
from collections.abc import Iterator, Mapping
from typing import Any

from cds import constants
from cds.crd.coverage_info import CoverageInfo, Reason, billing_codes
from cds.dtr import answers, forms, service
from cds.errors import BusinessRule, InvalidResource
from cds.runtime import Runtime
from cds.store import AssertionRecord
from policies.engine import Decision

SUFFIX = "-adaptive"  # the adaptive form's url (and id): the standard form's, with this suffix
CONTAINED_ID = "adaptive-form"
ISSUE_PA_LINK = "issue-pa"
DONE_LINK = "clinical-done"
ISSUE_PA_TEXT = "Issue the prior authorization now?"
DONE_TEXT = "The clinical questions are complete. Sign the attestation below to send the documentation."
DONE_TEXT_MET = (
    "The clinical questions are complete, and the answers meet the policy. Sign the attestation, then say whether "
    "the prior authorization is to be issued now."
)
DECLINED_TEXT = "the criteria are met with the answers given; the prior authorization was not issued on request"
VIA = "fhir-adaptive"


def is_adaptive(canonical: str) -> bool:
    return canonical.partition("|")[0].endswith(SUFFIX)


def standard_canonical(canonical: str) -> str:
    """The standard form an adaptive canonical (or a standard one) is made from."""
    url, bar, version = canonical.partition("|")
    return url.removesuffix(SUFFIX) + bar + version


# --- the package ---------------------------------------------------------------------------------------------------


def _narrative(text: str) -> dict[str, str]:
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{html.escape(text)}</p></div>'}


def search_form(standard: Mapping[str, Any], base_url: str) -> dict[str, Any]:
    """The package's adaptive Questionnaire (dtr-questionnaire-adapt-search): no items, the URL to ask them from,
    the standard form's libraries and launch context, ``derivedFrom`` the standard form."""
    rest = {k: copy.deepcopy(v) for k, v in standard.items() if k not in _OWN}
    return {
        "resourceType": "Questionnaire",
        "id": f"{standard['id']}{SUFFIX}",
        "meta": {"profile": [constants.DTR_ADAPT_SEARCH_PROFILE]},
        "extension": [
            {"url": constants.SDC_ADAPTIVE, "valueUrl": f"{base_url}/fhir"},
            *copy.deepcopy(list(standard.get("extension") or ())),
        ],
        "url": f"{standard['url']}{SUFFIX}",
        **rest,
        "name": f"{standard.get('name') or 'Documentation'}Adaptive",
        "derivedFrom": [forms.canonical(standard)],
    }


_OWN = frozenset({"resourceType", "id", "meta", "extension", "url", "name", "item", "derivedFrom"})


def _contained(standard: Mapping[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The Questionnaire a response carries (dtr-questionnaire-adapt): the items asked so far."""
    out: dict[str, Any] = {
        "resourceType": "Questionnaire",
        "id": CONTAINED_ID,
        "meta": {"profile": [constants.DTR_ADAPT_PROFILE]},
        "text": _narrative(str(standard.get("title") or "Documentation for prior authorization")),
        "extension": copy.deepcopy(list(standard.get("extension") or ())),
        "status": "active",
        "subjectType": ["Patient"],
        "derivedFrom": [forms.canonical(standard)],
    }
    for key in ("title", "publisher", "effectivePeriod"):
        if key in standard:
            out[key] = copy.deepcopy(standard[key])
    if items:
        out["item"] = items
    return out


def start_response(standard: Mapping[str, Any], draft: Mapping[str, Any]) -> dict[str, Any]:
    """The package's adaptive response: the draft's identifier, subject and extensions, no answers yet, and the
    contained Questionnaire with no items."""
    out = {k: copy.deepcopy(v) for k, v in draft.items() if k not in ("item", "meta", "questionnaire", "contained")}
    out["meta"] = {"profile": [constants.DTR_QR_ADAPT_PROFILE]}
    out["contained"] = [_contained(standard, [])]
    out["questionnaire"] = f"#{CONTAINED_ID}"
    out["status"] = "in-progress"
    return {"resourceType": "QuestionnaireResponse", **{k: v for k, v in out.items() if k != "resourceType"}}


def adapt(bundle: Mapping[str, Any], base_url: str) -> dict[str, Any]:
    """A standard package Bundle (:func:`service.bundle`) made adaptive: the search form and the adaptive response
    in place of the form and its draft; libraries and value sets as they were."""
    entries = list(bundle["entry"])
    standard, draft = entries[0]["resource"], entries[1]["resource"]
    form = search_form(standard, base_url)
    entries[0] = {"fullUrl": form["url"], "resource": form}
    entries[1] = {**entries[1], "resource": start_response(standard, draft)}
    return {**bundle, "entry": entries}


# --- $next-question ------------------------------------------------------------------------------------------------


def the_response(body: Any) -> dict[str, Any]:
    """The QuestionnaireResponse of a call: bare, or the ``questionnaire-response`` part of a Parameters."""
    if isinstance(body, Mapping) and body.get("resourceType") == "Parameters":
        given = body.get("parameter")
        parts = [
            p
            for p in (given if isinstance(given, list) else ())
            if isinstance(p, Mapping) and p.get("name") == "questionnaire-response"
        ]
        if len(parts) != 1 or not isinstance(parts[0].get("resource"), Mapping):
            raise InvalidResource(
                "$next-question takes one questionnaire-response (a QuestionnaireResponse resource)",
                expression="Parameters.parameter",
            )
        body = parts[0]["resource"]
    if not isinstance(body, Mapping) or body.get("resourceType") != "QuestionnaireResponse":
        got = body.get("resourceType") if isinstance(body, Mapping) else type(body).__name__
        raise InvalidResource(
            f"$next-question takes a QuestionnaireResponse, not {str(got)[:40]}", expression="resourceType"
        )
    return dict(body)


def _contained_form(response: Mapping[str, Any]) -> Mapping[str, Any]:
    contained = [
        c
        for c in response.get("contained") or ()
        if isinstance(c, Mapping) and c.get("resourceType") == "Questionnaire"
    ]
    ref = response.get("questionnaire")
    named = [c for c in contained if isinstance(ref, str) and ref == f"#{c.get('id')}"]
    if len(named) == 1:
        return named[0]
    if len(contained) == 1 and not ref:
        return contained[0]
    raise InvalidResource(
        "An adaptive response answers the Questionnaire it contains (questionnaire = '#' + the contained "
        "Questionnaire's id, as in the package's response)",
        expression="QuestionnaireResponse.questionnaire",
    )


def _derived_from(form: Mapping[str, Any]) -> str:
    derived = form.get("derivedFrom")
    if isinstance(derived, list) and derived and isinstance(derived[0], str):
        return standard_canonical(derived[0])
    raise InvalidResource(
        "The contained Questionnaire names the form it is derived from (derivedFrom, as in the package)",
        expression="QuestionnaireResponse.contained.derivedFrom",
    )


def _links(items: Any, where: str) -> Iterator[str]:
    for item in items or ():
        if not isinstance(item, Mapping) or not isinstance(item.get("linkId"), str):
            raise InvalidResource(f"every item of {where} has a linkId", expression=where)
        yield item["linkId"]
        for answer in item.get("answer") or ():
            if isinstance(answer, Mapping):
                yield from _links(answer.get("item"), where)
        yield from _links(item.get("item"), where)


def _closing(link_id: str, met: bool) -> dict[str, Any]:
    if link_id == DONE_LINK:
        return {"linkId": DONE_LINK, "type": "display", "text": DONE_TEXT_MET if met else DONE_TEXT}
    if link_id == ISSUE_PA_LINK:
        return {"linkId": ISSUE_PA_LINK, "type": "boolean", "required": True, "text": ISSUE_PA_TEXT}
    return {"linkId": constants.ATTESTATION_LINK, "type": "boolean", "required": True, "text": forms.ATTESTATION_TEXT}


def _shown(item: Mapping[str, Any]) -> dict[str, Any]:
    """An item of the standard form as an adaptive form asks it: without enableWhen (dtr-questionnaire-adapt)."""
    return {k: copy.deepcopy(v) for k, v in item.items() if k not in ("enableWhen", "enableBehavior")}


def _enabled(item: Mapping[str, Any], values: Mapping[str, Any]) -> bool:
    return all(
        w.get("question") in values and values[w.get("question")] == (w.get("answerCoding") or {}).get("code")
        for w in item.get("enableWhen") or ()
    )


def next_question(rt: Runtime, body: Any) -> dict[str, Any]:
    """The response with the next items appended, or completed with the coverage-information (see the module)."""
    response = the_response(body)
    if response.get("status") not in (None, "in-progress"):
        raise InvalidResource(
            "$next-question continues an in-progress response (status in-progress)",
            expression="QuestionnaireResponse.status",
        )
    contained = _contained_form(response)
    canonical = _derived_from(contained)
    record = service.assertion(rt, service.assertion_id_of(rt, response))
    if not record.questionnaire:
        raise service.no_longer_needed(record)
    if canonical != record.questionnaire:
        raise BusinessRule(
            f"The response answers {canonical[:200]}; this assertion asks {record.questionnaire}",
            expression="QuestionnaireResponse.contained.derivedFrom",
        )
    draft = dict(record.draft_response or {})
    expected = (draft.get("subject") or {}).get("reference") if isinstance(draft.get("subject"), Mapping) else None
    if not service._same_patient(response.get("subject"), str(expected or "")):
        raise BusinessRule(
            "The response is about another patient than the order it documents",
            expression="QuestionnaireResponse.subject",
        )
    standard = service.shaped_form(service.questionnaire_of(rt, canonical), str(rt.config["dtr_version"]))
    std_items = [i for i in standard.get("item") or () if i.get("linkId") != constants.ATTESTATION_LINK]
    by_link = {str(i["linkId"]): i for i in std_items}

    asked = list(dict.fromkeys(_links(contained.get("item"), "the contained Questionnaire")))
    closing = [link for link in asked if link in (DONE_LINK, ISSUE_PA_LINK, constants.ATTESTATION_LINK)]
    met = ISSUE_PA_LINK in closing
    # the server's own items for what the client says was asked: its copy is not trusted for types or options
    known = {**{link: _shown(i) for link, i in by_link.items()}, **{link: _closing(link, met) for link in closing}}
    for item in std_items:
        for child in _links(item.get("item"), "the form"):
            known.setdefault(child, {})
    unknown = [link for link in asked if link not in known]
    if unknown:
        raise InvalidResource(
            f"The contained Questionnaire has items this form does not ask: {', '.join(u[:40] for u in unknown[:5])}",
            expression="QuestionnaireResponse.contained.item",
        )
    top = [link for link in asked if link in by_link or link in closing]
    stray = [link for link in _links(response.get("item"), "QuestionnaireResponse.item") if link not in asked]
    if stray:
        raise InvalidResource(
            f"Answers to items the contained Questionnaire does not ask: {', '.join(s[:40] for s in stray[:5])}",
            expression="QuestionnaireResponse.item",
        )

    # the answers so far, read by the standard form's rules (enableWhen, types, units); none is required yet
    view = {"item": [{**by_link[link], "required": False} for link in top if link in by_link]}
    view["item"] += [{**_closing(link, met), "required": False} for link in closing]
    author = response.get("author", {}).get("reference") if isinstance(response.get("author"), Mapping) else None
    read = answers.read(view, response, draft, author=author)
    values = read.values
    out = dict(read.response)
    out["item"] = [i for i in out.get("item") or () if i.get("answer") or i.get("item")]

    new = [i for i in std_items if str(i["linkId"]) not in asked and _enabled(i, values)]
    unanswered = [
        link
        for link in top
        if link in by_link
        and by_link[link].get("type") not in ("display", "group")
        and by_link[link].get("required")
        and _enabled(by_link[link], values)
        and link not in values
    ]
    items = [known[link] for link in top]
    if new:
        items += [_shown(i) for i in new]
        _prefill(out, [str(i["linkId"]) for i in new], draft)
    elif unanswered:
        raise InvalidResource(
            f"required answers are missing: {', '.join(unanswered[:8])}", expression="QuestionnaireResponse.item"
        )
    elif not closing:
        day = rt.clock().date()
        kept = service.record_of(rt, record, day)
        det = service.determine(rt, record, kept, values, source="answers", today=day)
        met = det.decision is Decision.APPROVED
        links = [DONE_LINK, constants.ATTESTATION_LINK] + ([ISSUE_PA_LINK] if met else [])
        items += [_closing(link, met) for link in links]
    else:
        return _complete(rt, record, standard, out, items, values, met=met)
    out["contained"] = [_contained(standard, items)]
    out["questionnaire"] = f"#{CONTAINED_ID}"
    out["status"] = "in-progress"
    return out


def _prefill(response: dict[str, Any], links: list[str], draft: Mapping[str, Any]) -> None:
    """Append the draft's answers (auto-server) to the newly asked items the response does not answer yet."""
    answered = {str(i.get("linkId")) for i in response.get("item") or ()}
    drafted = {str(i.get("linkId")): i for i in draft.get("item") or ()}
    for link in links:
        if link in drafted and link not in answered:
            response.setdefault("item", []).append(copy.deepcopy(dict(drafted[link])))


def _complete(
    rt: Runtime,
    record: AssertionRecord,
    standard: Mapping[str, Any],
    response: dict[str, Any],
    items: list[dict[str, Any]],
    values: dict[str, Any],
    *,
    met: bool,
) -> dict[str, Any]:
    """The last answer: settle the assertion (or, when the prior authorization is declined, say so unstored)."""
    wanted = [constants.ATTESTATION_LINK, ISSUE_PA_LINK] if met else [constants.ATTESTATION_LINK]
    missing = [link for link in wanted if link not in values]
    if missing:
        raise InvalidResource(
            f"required answers are missing: {', '.join(missing)}", expression="QuestionnaireResponse.item"
        )
    if values.pop(constants.ATTESTATION_LINK) is not True:
        raise InvalidResource(
            "The form is not signed: answer the attestation with yes", expression="QuestionnaireResponse.item"
        )
    issue = values.pop(ISSUE_PA_LINK, True)
    response["contained"] = [_contained(standard, items)]
    response["questionnaire"] = f"#{CONTAINED_ID}"
    response["status"] = "completed"
    if issue is not True:
        return _declined(rt, record, response)
    day = rt.clock().date()
    kept = service.record_of(rt, record, day)
    settled = service.settle(
        rt, record, kept, values, response, questionnaire=str(record.questionnaire), via=VIA, today=day
    )
    return settled.response


def _declined(rt: Runtime, record: AssertionRecord, response: dict[str, Any]) -> dict[str, Any]:
    """The clinician chose not to have the prior authorization issued (DTR §spec-41): nothing is stored, the
    assertion stays open (a later response or PA request settles it) and the coverage-information says so."""
    policy, product = service.policy_of(rt, record)
    coverage = next(
        (
            str(e.get("valueReference", {}).get("reference"))
            for e in response.get("extension") or ()
            if e.get("url") in (constants.DTR_QR_COVERAGE, constants.DTR_QR_CONTEXT)
            and str(e.get("valueReference", {}).get("reference", "")).startswith("Coverage/")
        ),
        "",
    )
    info = CoverageInfo(
        coverage=coverage,
        covered="covered",
        today=rt.clock().date(),
        assertion_id=record.assertion_id,
        pa_needed="auth-needed",
        billing_codes=billing_codes(rt.mappings, product),
        reasons=(Reason(f"{policy.ref}: {DECLINED_TEXT}"),),
    )
    kept = [e for e in response.get("extension") or () if e.get("url") != constants.COVERAGE_INFO_URL]
    response["extension"] = [*kept, info.as_json()]
    return response
