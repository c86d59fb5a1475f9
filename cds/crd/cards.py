"""CDS Hooks cards for assessed orders: what is missing and why, the explanation, the policy, and alternatives.

Every card has a uuid, an insurer ``source.label``, a ``source.topic`` from the CRD card types, a summary under 140
characters, and names the order it is about (``davinci-crd.associated-resource`` and the drug's name in the text).
Configuration options switch card types off; ``max-cards`` keeps the most important ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cds import constants
from cds.crd.assess import Assessed, Assessment
from cds.crd.hookrequest import HookRequest
from cds.links import form_link
from cds.runtime import Runtime
from policies import explain
from policies.dose import without_coverage_info
from policies.engine import Decision
from policies.questions import shown

SDC_TEMP = "http://hl7.org/fhir/uv/sdc/CodeSystem/temp"
TOPICS = {
    constants.OPTION_COVERAGE_INFO: "Coverage Information",
    constants.OPTION_GUIDELINE: "Guideline",
    constants.OPTION_ALTERNATIVES: "Optional Therapy Alternatives",
}


@dataclass(frozen=True)
class Card:
    option: str  # the configuration option that switches it off
    priority: int  # lower is more important (max-cards keeps the first)
    body: dict[str, Any]


def summary(text: str) -> str:
    """CDS Hooks: a summary under 140 characters (Inferno errors at 140)."""
    return text if len(text) < 140 else text[:137].rstrip() + "…"


def _cell(text: str) -> str:
    return " ".join(str(text).replace("|", "\\|").split())


def explanation(a: Assessed) -> str:
    """The criteria table: id (the document's numbering), requirement, result, evidence."""
    det = a.determination
    if det is None:
        return ""
    lines = [
        f"**{det.policy.publisher} {det.policy.number} ({det.policy.ref}), {det.product.title}: "
        f"{explain.headline(det)}**",
        "",
        "| Criterion | Requirement | Result | Evidence |",
        "|---|---|---|---|",
    ]
    for row in explain.rows(det):
        evidence = ", ".join(row.evidence) or "—"
        note = f" ({row.note})" if row.note else ""
        indent = "↳ " * row.depth
        lines.append(
            f"| {row.id} | {_cell(indent + row.text)} | {explain.STATE_WORDS[row.state]} {_cell(note)} | "
            f"{_cell(evidence)} |"
        )
    return "\n".join(lines)


class _Builder:
    def __init__(self, rt: Runtime, request: HookRequest, assessment: Assessment, primary: bool) -> None:
        self.rt = rt
        self.request = request
        self.assessment = assessment
        self.primary = primary
        self.label = assessment.coverage.payer.name
        self.cards: list[Card] = []

    def card(
        self,
        option: str,
        priority: int,
        a: Assessed | None,
        text: str,
        detail: str,
        indicator: str = "info",
        **extra: Any,
    ) -> dict[str, Any]:
        topic_code = option if option in TOPICS else constants.OPTION_COVERAGE_INFO
        body: dict[str, Any] = {
            "uuid": self.rt.new_id(),
            "summary": summary(text),
            "indicator": indicator,
            "detail": detail,
            "source": {
                "label": self.label,
                "topic": {"system": constants.CARD_TYPE_SYSTEM, "code": topic_code, "display": TOPICS[topic_code]},
            },
        }
        if a is not None:
            body["extension"] = {"davinci-crd.associated-resource": [{"reference": a.reference}]}
        body.update(extra)
        self.cards.append(Card(option, priority, body))
        return body

    def for_order(self, a: Assessed) -> None:
        det = a.determination
        if det is None:
            # no policy applies, or the drug could not be identified: the system action says all there is (covered /
            # no-auth, or indeterminate with its technical reason), and a card saying it again is what CRD §resp-12
            # asks not to send
            return
        policy = det.policy
        decision = det.decision
        if decision is Decision.NOT_COVERED:
            self.not_covered(a)
        elif decision is Decision.REVIEW:
            review = det.product.off_label_review
            self.card(
                constants.OPTION_COVERAGE_INFO,
                1,
                a,
                f"{a.drug}: not a use {policy.number} lists; the plan's off-label review decides",
                f"The use of **{a.drug}** is not one of the indications of {policy.number}. "
                f"{review.text if review else ''} Submit the prior authorization request with clinical "
                f"documentation.\n\n{explanation(a)}",
                "warning",
            )
        elif decision is Decision.DOSE_REVIEW:
            self.dose(a)
        elif decision is Decision.APPROVED:
            if a.info.pa_needed == "satisfied":
                until = (
                    f" through {a.prior_auth.valid_to.isoformat()}" if a.prior_auth and a.prior_auth.valid_to else ""
                )
                self.card(
                    constants.OPTION_COVERAGE_INFO,
                    2,
                    a,
                    f"{a.drug}: prior authorization {a.info.satisfied_pa_id} approved{until} ({policy.number})",
                    f"Every criterion of {policy.number} is met for **{a.drug}**. Prior authorization "
                    f"**{a.info.satisfied_pa_id}** is on file{until}; quote it on the claim.\n\n{explanation(a)}",
                )
            else:
                self.card(
                    constants.OPTION_COVERAGE_INFO,
                    2,
                    a,
                    f"{a.drug}: criteria of {policy.number} appear met; authorization issued at signing",
                    f"The record meets the criteria of {policy.number} for **{a.drug}**. The prior authorization"
                    f" is issued when the order is signed.\n\n{explanation(a)}",
                )
        else:
            self.missing(a)
            if any(d.proposal for d in det.doses if d.state.value == "not-met"):
                self.dose(a)  # say now what will also need changing
        self.reference(a)

    def missing(self, a: Assessed) -> None:
        det = a.determination
        assert det is not None
        policy = det.policy
        visible = shown(a.questions)
        asked = [q for q in visible if q.type != "attachment"]
        lines = []
        for q in visible:
            why = next((r.note for r in explain.rows(det) if r.id == q.link_id and r.note), "")
            lines.append(f"- **{q.link_id}** {q.text}" + (f" — {why}" if why else ""))
        if self.primary:
            form = a.info.questionnaires[0] if a.info.questionnaires else ""
            if det.decision is Decision.DOCUMENTATION:
                head = (
                    f"{a.drug}: {policy.number} criteria met; clinical documentation required for prior authorization"
                )
                intro = (
                    f"The record meets the criteria of {policy.number} for **{a.drug}**, and the policy requires "
                    f"clinical documentation on every request. Complete the form `{form}` and submit the prior "
                    "authorization request with it."
                )
            else:
                head = (
                    f"{a.drug}: prior authorization needs {len(asked)} answer{'s' if len(asked) != 1 else ''} "
                    f"({policy.number})"
                )
                intro = (
                    f"The record does not settle these criteria of {policy.number} for **{a.drug}**. Answer "
                    f"them in the documentation form (`{form}`, through DTR or the link below); the answers settle "
                    "the prior authorization:"
                )
        else:
            head = f"{a.drug}: prior authorization required ({policy.number}); documentation at signing"
            intro = f"When **{a.drug}** is signed, {policy.number} will need answers to:"
        extra: dict[str, Any] = {}
        if self.primary and a.questionnaire is not None:
            # the clinician's form page, bound to this assertion (cds.links): the same form DTR clients fetch
            extra["links"] = [
                {
                    "label": f"Answer the {policy.number} documentation form",
                    "type": "absolute",
                    "url": form_link(self.rt, a.info.assertion_id),
                }
            ]
        self.card(
            constants.OPTION_COVERAGE_INFO, 1, a, head, "\n".join([intro, "", *lines, "", explanation(a)]), **extra
        )
        if self.primary and a.questionnaire is not None and det.decision is Decision.NEEDS_INFO:
            self.form_completion(a)

    def not_covered(self, a: Assessed) -> None:
        det = a.determination
        assert det is not None
        policy, product = det.policy, det.product
        why = explain.failed_text(det)
        alternative = (
            next(
                (
                    nc.alternative
                    for nc in product.not_covered
                    for f in det.not_covered
                    if f.id == nc.id and nc.alternative
                ),
                None,
            )
            or product.alternative
        )
        detail = f"**{a.drug}** is not covered under {policy.number} for this use: {why}\n\n{explanation(a)}"
        if alternative is not None and self._option(constants.OPTION_ALTERNATIVES):
            coding = self._drug_codings(alternative.drug)
            if coding:
                # the EHR's own extensions stay; the coverage-information spoke of the drug no longer ordered
                proposal = without_coverage_info(a.order)
                proposal["medicationCodeableConcept"] = {
                    "coding": coding,
                    "text": self.rt.mappings.inputs[alternative.drug].display,
                }
                proposal.pop("medicationReference", None)
                name = self.rt.mappings.inputs[alternative.drug].display
                self.card(
                    constants.OPTION_ALTERNATIVES,
                    1,
                    a,
                    f"{a.drug} is not covered for this use; consider {name}",
                    f"{detail}\n\n**Covered alternative:** {alternative.text} Review the dose before signing.",
                    "warning",
                    selectionBehavior="at-most-one",
                    suggestions=[
                        {
                            "label": f"Order {name} instead (review the dose)",
                            "uuid": self.rt.new_id(),
                            "actions": [
                                {
                                    "type": "update",
                                    "description": f"Change the medication to {name}",
                                    "resource": proposal,
                                }
                            ],
                        }
                    ],
                )
                return
        self.card(
            constants.OPTION_COVERAGE_INFO, 1, a, f"{a.drug}: not covered under {policy.number}", detail, "warning"
        )

    def dose(self, a: Assessed) -> None:
        det = a.determination
        assert det is not None
        over = [d for d in det.doses if d.state.value == "not-met"]
        text = "; ".join(f"**{d.id}** {d.rule.text}: {explain.shown(d.note)}" for d in over)
        detail = (
            f"The order for **{a.drug}** is outside {det.policy.number}: {text}. Requests outside the limit are "
            f"reviewed case by case by a clinician.\n\n{explanation(a)}"
        )
        with_proposal = next((d for d in over if d.proposal), None)
        if with_proposal is not None and self._option(constants.OPTION_ALTERNATIVES):
            self.card(
                constants.OPTION_ALTERNATIVES,
                1,
                a,
                f"{a.drug}: outside the {det.policy.number} limit; change the order or request review",
                detail,
                "warning",
                selectionBehavior="at-most-one",
                suggestions=[
                    {
                        "label": with_proposal.proposal_label,
                        "uuid": self.rt.new_id(),
                        "actions": [
                            {
                                "type": "update",
                                "description": with_proposal.proposal_label,
                                "resource": with_proposal.proposal,
                            }
                        ],
                    }
                ],
            )
        else:
            self.card(
                constants.OPTION_COVERAGE_INFO,
                1,
                a,
                f"{a.drug}: outside the {det.policy.number} limit",
                detail,
                "warning",
            )

    def reference(self, a: Assessed) -> None:
        det = a.determination
        assert det is not None
        policy = det.policy
        if any(c.option == constants.OPTION_GUIDELINE and c.body.get("_policy") == policy.id for c in self.cards):
            return
        links = [
            {
                "label": f"{policy.number}: criteria as applied ({policy.ref})",
                "type": "absolute",
                "url": f"{self.rt.base_url}/policies/{policy.id}",
            }
        ]
        if policy.document_url:
            links.insert(
                0,
                {"label": f"{policy.publisher} policy {policy.number}", "type": "absolute", "url": policy.document_url},
            )
        body = self.card(
            constants.OPTION_GUIDELINE,
            5,
            a,
            f"{policy.publisher} {policy.number}: {policy.title}",
            f"{policy.source}. The linked page lists every criterion with the numbering the decision "
            f"cites (version {policy.version}).",
            links=links,
        )
        body["_policy"] = policy.id

    def form_completion(self, a: Assessed) -> None:
        questionnaire = a.questionnaire
        assert questionnaire is not None and a.determination is not None
        payer = self.assessment.coverage.payer
        canonical = f"{questionnaire['url']}|{questionnaire['version']}"
        if_none_exist = f"url={questionnaire['url']}&version={questionnaire['version']}"
        task = {
            "resourceType": "Task",
            "id": f"form-{a.info.assertion_id}",
            "meta": {"profile": [constants.CRD_TASK_PROFILE]},
            "basedOn": [{"reference": a.reference}],
            "status": "ready",
            "intent": "order",
            "code": {"coding": [{"system": SDC_TEMP, "code": "complete-questionnaire"}]},
            "description": f"Complete the {a.determination.policy.number} documentation for {a.drug}",
            "for": {"reference": f"Patient/{self.request.context.get('patientId')}"},
            "authoredOn": self.rt.clock().date().isoformat(),
            "requester": {
                "identifier": {"system": constants.PAYER_ID_SYSTEM, "value": payer.id},
                "display": payer.name,
            },
            "reasonCode": {
                "coding": [{"system": constants.CRD_TEMP_SYSTEM, "code": "reason-prior-auth"}],
                "text": "Documentation for prior authorization",
            },
            "input": [
                {
                    "type": {"coding": [{"system": SDC_TEMP, "code": "questionnaire"}], "text": "questionnaire"},
                    "valueCanonical": canonical,
                },
                {
                    "type": {
                        "coding": [{"system": constants.CRD_TEMP_SYSTEM, "code": "after-completion-action"}],
                        "text": "after-completion-action",
                    },
                    "valueCodeableConcept": {
                        "coding": [{"system": constants.CRD_TEMP_SYSTEM, "code": "prior-auth-include"}]
                    },
                },
            ],
        }
        self.card(
            constants.OPTION_FORM_COMPLETION,
            3,
            a,
            f"{a.drug}: complete the {a.determination.policy.number} documentation form",
            f"Add the form for the open criteria of **{a.drug}** to your worklist.",
            selectionBehavior="at-most-one",
            suggestions=[
                {
                    "label": "Add the documentation form",
                    "uuid": self.rt.new_id(),
                    "actions": [
                        *(
                            []
                            if a.client_has_questionnaire  # the EHR said it holds it (CRD §dev-20)
                            else [
                                {
                                    "type": "create",
                                    "description": "Add the Questionnaire (if not already present)",
                                    "resource": dict(questionnaire),
                                    "extension": {"davinci-crd.if-none-exist": if_none_exist},
                                }
                            ]
                        ),
                        {"type": "create", "description": "Add a task to complete the form", "resource": task},
                    ],
                }
            ],
        )

    def _option(self, code: str) -> bool:
        defaults = {constants.OPTION_FORM_COMPLETION: False}
        value = self.request.configuration.get(code, defaults.get(code, True))
        return value is not False

    def _drug_codings(self, drug: str) -> list[dict[str, str]]:
        rows = self.rt.mappings.rows_for(drug)
        return [{"system": r.system, "code": r.code, "display": r.display} for r in rows[:2]]

    def result(self) -> list[dict[str, Any]]:
        # a card is kept when its own option and the option of its topic are on (the form-completion card is
        # about coverage: coverage-info false switches it off too)
        kept = [c for c in self.cards if self._option(c.option) and self._option(c.body["source"]["topic"]["code"])]
        kept.sort(key=lambda c: c.priority)
        limit = self.request.configuration.get(constants.OPTION_MAX_CARDS, 10)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            kept = kept[:limit]
        out = []
        for c in kept:
            body = {k: v for k, v in c.body.items() if not k.startswith("_")}
            out.append(body)
        return out


def build(
    rt: Runtime,
    request: HookRequest,
    assessment: Assessment,
    *,
    primary: bool,
    include: Callable[[Assessed], bool] = lambda a: True,
) -> list[dict[str, Any]]:
    builder = _Builder(rt, request, assessment, primary)
    for a in assessment.orders:
        if include(a):
            builder.for_order(a)
    return builder.result()


def system_actions(assessment: Assessment, configuration: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``update`` per assessed order carrying its coverage-information, and nothing else changed."""
    from cds.crd.coverage_info import with_coverage_info

    if configuration.get(constants.OPTION_COVERAGE_INFO) is False:
        return []
    out = []
    for a in assessment.orders:
        if a.unchanged:
            continue
        out.append(
            {
                "type": "update",
                "description": f"Coverage information for {a.drug}: {a.info.covered}"
                + (f", prior authorization {a.info.pa_needed}" if a.info.pa_needed else ""),
                "resource": with_coverage_info(a.order, a.extension, a.info.coverage),
            }
        )
    return out
