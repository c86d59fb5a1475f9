"""The questions a determination leaves open: one per undecided criterion, linkId = the criterion id.

Pure: derived from the determination and the input definitions, so the same open criteria always give the same
questions (a Questionnaire built from them carries no patient data). What the data suggests for an answer
(``prefill``) travels separately, to the prepopulated QuestionnaireResponse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_mappings.loader import Mappings
from policies.dose import DOSE_KINDS, WEIGHT, birthdate_link
from policies.engine import Decision, Determination, Finding
from policies.model import COMPARISONS, Node, State


@dataclass(frozen=True)
class Question:
    link_id: str
    type: str  # boolean | quantity | date | choice | attachment
    text: str
    criterion: str = ""  # the policy's own words for the criterion this answers
    unit: str | None = None  # quantity questions: the UCUM unit asked for
    options: tuple[tuple[str, str], ...] = ()  # choice questions: (code, display)
    enable_when: tuple[str, str] | None = None  # (linkId, answer code): asked only for that indication
    hint: str = ""  # e.g. the recency window
    prefill: Any = None  # what the record suggests (patient data: never put in a Questionnaire)
    input: str | None = None  # the policy input the answer stands for (its CQL define prepopulates it), if any


def open_questions(det: Determination, mappings: Mappings) -> tuple[Question, ...]:
    """Questions for every criterion the determination could not decide, in document order."""
    out: list[Question] = []
    product = det.product
    candidates = [r for r in det.indications if r.state is State.UNKNOWN]
    if det.decision is Decision.NOT_COVERED:
        return ()
    if det.selection is not None:
        options = tuple((r.indication.id, r.indication.title) for r in candidates)
        options += ((product.other_use.id, f"Other use ({product.other_use.text})"),)
        out.append(
            Question(
                product.selection_id,
                "choice",
                det.selection.node.text,
                criterion="Medical necessity criteria: the indication this request is for",
                options=options,
                prefill=det.selection.partial,
            )
        )
    if det.chosen is None:
        # every open indication's documentation, each behind its choice in the indication question (enableWhen):
        # when the record suggests one (a non-specific code) the question is prefilled and only that branch shows
        # (:func:`shown`), but the clinician may still choose another in the same form
        for result in candidates:
            when = (product.selection_id, result.indication.id) if det.selection is not None else None
            findings = result.findings[1:] if det.selection is not None else result.findings
            for finding in findings:
                out.extend(_ask(finding, mappings, when))
    for dose in det.doses:
        if dose.state is State.UNKNOWN and dose.ask:
            out.append(
                _dose_question(
                    dose.rule.id,
                    dose.ask,
                    dose.rule.text or DOSE_KINDS[dose.rule.kind].ask_text(dose.rule),
                    DOSE_KINDS[dose.rule.kind].ask_text(dose.rule),
                )
            )
    if det.decision is Decision.REVIEW and product.off_label_review is not None:
        out.append(
            Question(
                product.off_label_review.id,
                "attachment",
                "Attach the clinical documentation supporting this use (diagnosis, prior treatment, literature)",
                criterion=product.off_label_review.text,
            )
        )
    elif product.documentation is not None and det.decision in (Decision.DOCUMENTATION, Decision.NEEDS_INFO):
        out.append(
            Question(
                product.documentation.id,
                "attachment",
                "Attach the clinical documentation (progress notes, laboratory results, diagnostics)",
                criterion=product.documentation.text,
            )
        )
    seen: set[str] = set()
    unique = []
    for q in out:
        if q.link_id not in seen:
            seen.add(q.link_id)
            unique.append(q)
    return tuple(unique)


def shown(questions: tuple[Question, ...]) -> tuple[Question, ...]:
    """The questions a clinician sees when the form opens: all but the branches behind another choice than the one a
    choice question is prefilled with (the indication the record suggests). What a card counts and lists."""
    prefilled = {q.link_id: q.prefill for q in questions if q.type == "choice" and isinstance(q.prefill, str)}
    return tuple(
        q
        for q in questions
        if q.enable_when is None or prefilled.get(q.enable_when[0], q.enable_when[1]) == q.enable_when[1]
    )


def _dose_question(link_id: str, ask: str, criterion: str, attest_text: str) -> Question:
    if ask == "weight":
        return Question(
            link_id, "quantity", "Patient's current body weight", criterion=criterion, unit="kg", input=WEIGHT
        )
    if ask == "birthdate":
        # an age-banded dose rule that cannot place the patient (review C11): the date of birth, asked once for the
        # rules of one indication (birthdate_link), before any body weight
        return Question(
            birthdate_link(link_id),
            "date",
            "Patient's date of birth",
            criterion=criterion,
            hint="The usual dose differs by age; a body weight is asked only if the dose for this age needs one.",
            input="age_years",
        )
    return Question(link_id, "boolean", attest_text, criterion=criterion)


def _has_id_below(node: Node) -> bool:
    return any(n.id for n in node.walk()[1:])


def _parts(finding: Finding, asked: set[str]) -> list[Finding] | None:
    """The undecided parts of a group that have questions of their own (ids), or None when some undecided part has
    none: then the group is asked as one item. A part without an id is no obstacle when the same test is asked
    under an id elsewhere in the group (a result that counts twice, e.g. hepatitis C RNA), or when it is a group
    whose own undecided parts are all asked."""
    out: list[Finding] = []
    for child in finding.children:
        if child.state is not State.UNKNOWN:
            continue
        if child.node.id:
            out.append(child)
        elif child.node.is_leaf:
            if child.node.input not in asked:
                return None
        else:
            inner = _parts(child, asked)
            if inner is None:
                return None
            out.extend(inner)
    return out


def _ask(finding: Finding, mappings: Mappings, when: tuple[str, str] | None) -> list[Question]:
    if finding.state is not State.UNKNOWN:
        return []
    node = finding.node
    if not node.is_leaf:
        parts = _parts(finding, {n.input for n in node.walk() if n.id and n.is_leaf and n.input})
        if node.id and not parts:
            # a group the record suggests (a diagnosis only a non-specific code points to) is prefilled yes, for the
            # prescriber to confirm: the one indication the record or the order's reason points to is pre-answered
            suggested = True if finding.partial not in (None, False) else None
            return [Question(node.id, "boolean", node.text, criterion=node.text, enable_when=when, prefill=suggested)]
        return [q for c in parts or () for q in _ask(c, mappings, when)]
    assert node.id is not None  # leaves are reached only through criteria with ids
    if node.op == "attested":
        return [Question(node.id, "boolean", node.text, criterion=node.text, enable_when=when)]
    spec = mappings.inputs[node.input or ""]
    hint = f"A result from the past {node.within_days} days." if node.within_days else ""
    prefill = finding.partial if finding.partial not in (None, False) else None
    if node.op in ("present", "absent"):
        return [
            Question(
                node.id,
                "boolean",
                spec.question,
                criterion=node.text,
                enable_when=when,
                prefill=True if prefill else None,
                input=node.input,
            )
        ]
    if node.op == "below_range":
        return [
            Question(
                node.id,
                "boolean",
                f"Is the {spec.display.lower()} below the laboratory's reference range?",
                criterion=node.text,
                enable_when=when,
                hint=hint,
                input=node.input,
            )
        ]
    if node.op == "is":
        return [
            Question(
                node.id,
                "choice",
                spec.question,
                criterion=node.text,
                options=spec.options,
                enable_when=when,
                hint=hint,
                input=node.input,
            )
        ]
    assert node.op in COMPARISONS
    if spec.type == "age":
        return [
            Question(
                node.id,
                "date",
                spec.question,
                criterion=node.text,
                enable_when=when,
                prefill=prefill if isinstance(prefill, str) else None,
                input=node.input,
            )
        ]
    return [
        Question(
            node.id,
            "quantity",
            spec.question,
            criterion=node.text,
            unit=spec.unit,
            enable_when=when,
            hint=hint,
            input=node.input,
        )
    ]
