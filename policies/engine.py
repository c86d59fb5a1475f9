"""Evaluate a product's criteria against facts and answers: three-valued, explained, pure.

Every criterion ends ``met``, ``not-met`` or ``unknown`` with the evidence (resource references) it rests on. An
answer to a Questionnaire item (linkId = criterion id) settles the criterion it names. Nothing here touches HTTP,
storage or Flask; the same inputs always give the same :class:`Determination`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from typing import Any, Protocol

from fhir_mappings import units
from fhir_mappings.extract import Fact, Range, age_range
from fhir_mappings.loader import InputDef, Mappings
from policies import dose as dose_rules
from policies.model import Indication, Node, Policy, Product, State


class Decision(StrEnum):
    APPROVED = "approved"  # every criterion met, dose within limits: PA satisfied now
    DOCUMENTATION = "documentation-required"  # met, but the policy wants documentation on every request
    NEEDS_INFO = "needs-information"  # nothing failed; some criteria cannot be decided from the data
    DOSE_REVIEW = "dose-review"  # criteria met; the dose exceeds the policy's limit
    NOT_COVERED = "not-covered"  # a criterion failed definitively, or the use is not covered
    REVIEW = "off-label-review"  # a use the policy does not list, which it sends to the off-label review


class Facts(Protocol):
    def get(self, name: str) -> Fact: ...


@dataclass(frozen=True)
class Quantity:
    value: float
    unit: str


@dataclass(frozen=True)
class Answers:
    """Questionnaire answers by linkId. ``source`` names where they came from (a QuestionnaireResponse)."""

    values: Mapping[str, Any] = field(default_factory=dict)
    source: str = "answer"

    def get(self, link_id: str | None) -> Any:
        return None if link_id is None else self.values.get(link_id)

    def evidence(self, link_id: str) -> tuple[str, ...]:
        return (f"{self.source}#{link_id}",)


NO_ANSWERS = Answers()


@dataclass(frozen=True)
class Finding:
    """The result of one criterion, with its children's results when it is a group."""

    node: Node
    state: State
    evidence: tuple[str, ...] = ()
    note: str = ""
    partial: Any = None  # a suggestion for prepopulating the question (never used to decide)
    children: tuple[Finding, ...] = ()

    @property
    def id(self) -> str | None:
        return self.node.id

    def walk(self) -> tuple[Finding, ...]:
        out: list[Finding] = [self]
        for child in self.children:
            out.extend(child.walk())
        return tuple(out)


@dataclass(frozen=True)
class IndicationResult:
    indication: Indication
    state: State
    findings: tuple[Finding, ...]  # the diagnosis first, then each criterion in document order
    established: bool  # the diagnosis itself is met (from data or an answer)


@dataclass(frozen=True)
class Determination:
    policy: Policy
    product: Product
    decision: Decision
    today: date
    continuation: bool
    indications: tuple[IndicationResult, ...]  # the candidate indications, in document order
    selection: Finding | None  # "which indication" when the data cannot tell
    chosen: IndicationResult | None  # the indication the decision rests on, when one is met
    others: tuple[Finding, ...] = ()  # diagnoses of the indications that do not apply
    renewal: Finding | None = None  # is this a continuation of earlier therapy (reauthorization)?
    not_covered: tuple[Finding, ...] = ()  # not-covered uses that apply (their `when` is met)
    doses: tuple[dose_rules.DoseResult, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def authorization_months(self) -> int | None:
        auth = self.product.authorization
        return auth.renewal_months if self.continuation else auth.initial_months

    def findings(self) -> tuple[Finding, ...]:
        out: list[Finding] = []
        if self.selection is not None:
            out.append(self.selection)
        for result in self.indications:
            out.extend(result.findings)
        out.extend(self.not_covered)
        out.extend(self.others)
        if self.renewal is not None:
            out.append(self.renewal)
        return tuple(out)

    def failed(self) -> tuple[Finding, ...]:
        """Criteria with an id that are definitively not met, most specific first."""
        out = []
        for finding in self.findings():
            for f in finding.walk():
                if (
                    f.id
                    and f.state is State.NOT_MET
                    and not any(c.id and c.state is State.NOT_MET for c in f.walk()[1:])
                ):
                    out.append(f)
        return tuple(dict.fromkeys(out))


class _Evaluator:
    def __init__(self, mappings: Mappings, facts: Facts, answers: Answers, today: date) -> None:
        self.inputs = mappings.inputs
        self.facts = facts
        self.answers = answers
        self.today = today

    def node(self, node: Node) -> Finding:
        """The node's finding from the record, reconciled with an answer to it (when there is one)."""
        answer = self.answers.get(node.id)
        found = self._leaf(node) if node.is_leaf else self._group(node)
        if answer is None or node.op == "attested":
            return found
        answered = self._answered(node, answer, found.children)
        if found.state is State.UNKNOWN or found.state is answered.state:
            return (
                answered
                if found.state is State.UNKNOWN
                else replace(found, evidence=tuple(dict.fromkeys(found.evidence + answered.evidence)))
            )
        # the record settles it one way and the answer the other: neither wins, a reviewer decides
        return Finding(
            node,
            State.UNKNOWN,
            found.evidence + answered.evidence,
            f"the answer contradicts the record ({found.note or found.state.value})",
            children=found.children,
        )

    def _group(self, node: Node) -> Finding:
        children = tuple(self.node(c) for c in node.children)
        states = [c.state for c in children]
        if node.op == "all":
            state = (
                State.NOT_MET
                if State.NOT_MET in states
                else State.MET
                if all(s is State.MET for s in states)
                else State.UNKNOWN
            )
        elif node.op == "any":
            state = (
                State.MET
                if State.MET in states
                else State.NOT_MET
                if all(s is State.NOT_MET for s in states)
                else State.UNKNOWN
            )
        elif node.op == "tests":
            # results of tests for one fact: a failed test decides, else a passed one; tests not done do not count
            state = State.NOT_MET if State.NOT_MET in states else State.MET if State.MET in states else State.UNKNOWN
        else:  # not
            state = {State.MET: State.NOT_MET, State.NOT_MET: State.MET}.get(states[0], State.UNKNOWN)
        evidence = tuple(dict.fromkeys(e for c in children if c.state is state for e in c.evidence))
        return Finding(node, state, evidence, children=children)

    def _leaf(self, node: Node) -> Finding:
        if node.op == "attested":
            answer = self.answers.get(node.id)
            if isinstance(answer, bool):
                return Finding(
                    node,
                    State.MET if answer else State.NOT_MET,
                    self.answers.evidence(node.id or ""),
                    "attested" if answer else "not attested",
                )
            return Finding(node, State.UNKNOWN, note="needs the prescriber's attestation")
        assert node.input is not None  # checked at load
        spec = self.inputs[node.input]
        fact = self.facts.get(node.input)
        if node.op in ("present", "absent"):
            return self._presence(node, fact)
        stale = self._stale(node, fact)
        if stale:
            return Finding(node, State.UNKNOWN, fact.evidence, stale, partial=fact.partial)
        if node.op == "is":
            if fact.value is None:
                return Finding(node, State.UNKNOWN, fact.evidence, fact.note, partial=fact.partial)
            state = State.MET if fact.value == node.value else State.NOT_MET
            return Finding(node, state, fact.evidence, fact.note)
        return self._compare(node, spec, fact)

    def _stale(self, node: Node, fact: Fact) -> str:
        window = node.within_days or fact.window_days
        if window and fact.observed is not None and (self.today - fact.observed).days > window:
            return f"the latest result ({fact.observed.isoformat()}) is older than {window} days"
        return ""

    @staticmethod
    def _presence(node: Node, fact: Fact) -> Finding:
        if fact.value is True:
            state = State.MET if node.op == "present" else State.NOT_MET
        elif fact.value is False:
            state = State.NOT_MET if node.op == "present" else State.MET
        elif node.op == "absent" and fact.searched and fact.partial is None:
            state = State.MET  # searched and nothing on record: absence is as good as records get
        else:
            state = State.UNKNOWN
        return Finding(node, state, fact.evidence, fact.note, partial=fact.partial)

    def _compare(self, node: Node, spec: InputDef, fact: Fact) -> Finding:
        value = fact.value
        if not isinstance(value, Range):
            return Finding(node, State.UNKNOWN, fact.evidence, fact.note, partial=fact.partial)
        state = compare(value, node.op, float(node.value or 0))
        note = fact.note or (f"age {value.describe()}" if spec.type == "age" else value.describe(spec.unit))
        if state is State.UNKNOWN:
            note = f"{value.describe(spec.unit)} does not settle {node.shown}"
        return Finding(node, state, fact.evidence, note, partial=fact.partial)

    def _answered(self, node: Node, answer: Any, children: tuple[Finding, ...]) -> Finding:
        """The finding an answer alone gives (groups and yes/no criteria take a boolean: true means met)."""
        evidence = self.answers.evidence(node.id or "")
        if not node.is_leaf:
            if not isinstance(answer, bool):
                return Finding(node, State.UNKNOWN, evidence, "the answer is not yes or no", children=children)
            return Finding(node, State.MET if answer else State.NOT_MET, evidence, "answered", children=children)
        spec = self.inputs[node.input or ""]
        if node.op in ("present", "absent"):
            if not isinstance(answer, bool):
                return Finding(node, State.UNKNOWN, evidence, "the answer is not yes or no")
            met = answer if node.op == "present" else not answer
            return Finding(node, State.MET if met else State.NOT_MET, evidence, "answered")
        if node.op == "is":
            state = State.MET if answer == node.value else State.NOT_MET
            return Finding(node, state, evidence, f"answered {answer}")
        try:
            value = answer_value(spec, answer, self.today)
        except ValueError as exc:
            return Finding(node, State.UNKNOWN, evidence, str(exc))
        state = compare(Range.exact(value), node.op, float(node.value or 0))
        return Finding(node, state, evidence, f"answered {value:g}{' ' + spec.unit if spec.unit else ''}")

    def selection(self, product: Product) -> str | None:
        answer = self.answers.get(product.selection_id)
        return answer if isinstance(answer, str) else None


def compare(value: Range, op: str, threshold: float) -> State:
    """Does ``value op threshold`` hold for every number the range allows (met), for none (not met), or for some?"""
    lo, hi, t = value.lo, value.hi, threshold
    above_all = lo is not None and (lo > t or (value.lo_open and lo >= t))  # every number > t
    at_least_all = lo is not None and lo >= t  # every number >= t
    below_all = hi is not None and (hi < t or (value.hi_open and hi <= t))  # every number < t
    at_most_all = hi is not None and hi <= t  # every number <= t
    if op == ">=":
        met, not_met = at_least_all, below_all
    elif op == ">":
        met, not_met = above_all, at_most_all
    elif op == "<=":
        met, not_met = at_most_all, above_all
    elif op == "<":
        met, not_met = below_all, at_least_all
    else:
        raise ValueError(f"not a comparison: {op}")
    return State.MET if met else State.NOT_MET if not_met else State.UNKNOWN


def answer_value(spec: InputDef, answer: Any, today: date) -> float:
    """A quantity answer in the input's unit (ages are answered as a date of birth). Raises ValueError."""
    if spec.type == "age":
        if isinstance(answer, date):
            answer = answer.isoformat()
        if not isinstance(answer, str):
            raise ValueError("the date of birth answer is not a date")
        age = age_range(answer, today)
        if age.lo != age.hi or age.lo is None:
            raise ValueError(f"the date of birth {answer} is not precise enough")
        return age.lo
    if isinstance(answer, Quantity):
        try:
            return units.convert(answer.value, answer.unit, spec.unit or "")
        except units.UnitError as exc:
            raise ValueError(str(exc)) from None
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        return float(answer)
    raise ValueError("the answer is not a quantity")


def _all(findings: tuple[Finding, ...]) -> State:
    states = [f.state for f in findings]
    if State.NOT_MET in states:
        return State.NOT_MET
    return State.MET if all(s is State.MET for s in states) else State.UNKNOWN


def evaluate(
    policy: Policy,
    product: Product,
    mappings: Mappings,
    facts: Facts,
    order: Mapping[str, Any],
    today: date,
    answers: Answers = NO_ANSWERS,
) -> Determination:
    """Decide one order against one product of one policy."""
    ev = _Evaluator(mappings, facts, answers, today)
    reauth = product.reauthorization
    renewal = None
    if reauth is not None:
        renewal = _labelled(reauth.id, reauth.text, ev.node(reauth.when))
    continuation = renewal is not None and renewal.state is State.MET
    notes: list[str] = []

    chosen_id = ev.selection(product)
    diagnoses = [(ind, ev.node(ind.diagnosis)) for ind in product.indications]
    if chosen_id is not None:
        candidates = [
            (ind, Finding(ind.diagnosis, State.MET, answers.evidence(product.selection_id), "answered"))
            for ind, _ in diagnoses
            if ind.id == chosen_id
        ]
    else:
        established = [(ind, f) for ind, f in diagnoses if f.state is State.MET]
        candidates = established or [(ind, f) for ind, f in diagnoses if f.state is not State.NOT_MET]
    candidate_ids = {ind.id for ind, _ in candidates}
    others = tuple(f for ind, f in diagnoses if ind.id not in candidate_ids)
    established_any = any(f.state is State.MET for _, f in candidates)
    ask_selection = chosen_id is None and not established_any and len(candidates) > 1
    selection = None
    if ask_selection:
        suggested = [ind.id for ind, f in candidates if f.partial]
        selection = Finding(
            _selection_node(product),
            State.UNKNOWN,
            tuple(e for _, f in candidates for e in f.evidence),
            "the diagnosis for this order is not on record",
            partial=suggested[0] if len(suggested) == 1 else None,
        )

    results: list[IndicationResult] = []
    for ind, diag in candidates:
        findings = [diag] + [ev.node(c) for c in ind.criteria]
        if continuation and reauth is not None:
            findings.extend(ev.node(c) for c in reauth.criteria)
        state = _all(tuple(findings))
        results.append(IndicationResult(ind, state, tuple(findings), diag.state is State.MET))

    not_covered: list[Finding] = []
    if not established_any and (chosen_id is None or not candidates):
        not_covered = [
            f
            for f in (_labelled(nc.id, nc.title, ev.node(nc.when)) for nc in product.not_covered)
            if f.state is State.MET
        ]

    met = [r for r in results if r.state is State.MET]
    chosen = met[0] if met else None
    doses: list[dose_rules.DoseResult] = []
    unknown = [r for r in results if r.state is State.UNKNOWN]
    # the dose is checked for the indication that is met, or for the one still open (so everything that will be
    # needed is said at once); with several open indications the limit is not known yet
    dosed = chosen if chosen is not None else unknown[0] if len(unknown) == 1 and not not_covered else None
    if dosed is not None:
        for rule in product.dosing + dosed.indication.dosing:
            doses.append(dose_rules.check(rule, order, facts, answers, today))

    if not_covered:
        decision = Decision.NOT_COVERED
    elif not candidates:
        # any other use: not covered, or (when the document says so) reviewed under the payer's off-label policy
        decision = Decision.REVIEW if product.off_label_review is not None else Decision.NOT_COVERED
    elif chosen is not None:
        if continuation and product.authorization.renewal_months is None and product.authorization.doses:
            decision = Decision.NOT_COVERED
            notes.append(f"{product.authorization.id}: {product.authorization.text}")
        elif any(d.state is State.NOT_MET for d in doses):
            decision = Decision.DOSE_REVIEW
        elif any(d.state is State.UNKNOWN for d in doses):
            decision = Decision.NEEDS_INFO
        elif product.documentation is not None:
            decision = Decision.DOCUMENTATION
        else:
            decision = Decision.APPROVED
    elif any(r.state is State.UNKNOWN for r in results):
        decision = Decision.NEEDS_INFO
    else:
        decision = Decision.NOT_COVERED
    return Determination(
        policy=policy,
        product=product,
        decision=decision,
        today=today,
        continuation=continuation,
        indications=tuple(results),
        selection=selection,
        chosen=chosen,
        others=others,
        renewal=renewal,
        not_covered=tuple(not_covered),
        doses=tuple(doses),
        notes=tuple(notes),
    )


def _labelled(ident: str, text: str, finding: Finding) -> Finding:
    """A finding for an unnumbered test (a not-covered use, the continuation test) under the id that names it."""
    node = Node(op="all", id=ident, text=text, children=(finding.node,))
    return Finding(node, finding.state, finding.evidence, finding.note, children=(finding,))


def _selection_node(product: Product) -> Node:
    return Node(op="attested", id=product.selection_id, text=f"Which indication is {product.title} requested for?")
