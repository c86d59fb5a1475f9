"""Evaluate a product's criteria against facts and answers: three-valued, explained, pure.

Every criterion ends ``met``, ``not-met`` or ``unknown`` with the evidence (resource references) it rests on. An
answer to a Questionnaire item (linkId = criterion id) settles the criterion it names. Nothing here touches HTTP,
storage or Flask; the same inputs always give the same :class:`Determination`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from typing import Any, Protocol

from fhir_mappings import units
from fhir_mappings.extract import NO_REASONS, Fact, Range, Reasons, age_range
from fhir_mappings.loader import InputDef, Mappings
from policies import amounts
from policies import dose as dose_rules
from policies.model import DoseRule, Indication, Node, Policy, Product, State
from policies.needs import diagnosis_inputs


class Decision(StrEnum):
    APPROVED = "approved"  # every criterion met, dose within limits: PA satisfied now
    DOCUMENTATION = "documentation-required"  # met, but the policy wants documentation on every request
    NEEDS_INFO = "needs-information"  # nothing failed; some criteria cannot be decided from the data
    DOSE_REVIEW = "dose-review"  # criteria met; the dose exceeds the policy's limit
    NOT_COVERED = "not-covered"  # a criterion failed definitively, or the use is not covered
    REVIEW = "off-label-review"  # a use the policy does not list, which it sends to the off-label review


class Facts(Protocol):
    def get(self, name: str) -> Fact: ...

    def reason(self, name: str) -> Fact:
        """A diagnosis input read from the order's reason only (other inputs: as :meth:`get`)."""
        ...

    def reasons(self) -> Reasons: ...


class _ReasonView:
    """Facts as the order's reason states them: diagnoses from the reason alone, everything else from the record."""

    def __init__(self, facts: Facts) -> None:
        self.facts = facts

    def get(self, name: str) -> Fact:
        return self.facts.reason(name)

    def reason(self, name: str) -> Fact:
        return self.facts.reason(name)

    def reasons(self) -> Reasons:
        return self.facts.reasons()


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
    reasons: Reasons = NO_REASONS  # what the order's own reason names
    outside_reason: bool = False  # the order's reason is a disorder none of the product's indications covers

    @property
    def authorization_months(self) -> int | None:
        auth = self.product.authorization
        return auth.renewal_months if self.continuation else auth.initial_months

    @property
    def authorization_days(self) -> int | None:
        return self.product.authorization.days

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
        """Criteria with an id that are definitively not met, most specific first. A not-met alternative inside a
        group that is still open (one of several, the others unknown) is not a reason, and neither is the
        continuation test of a request that is not a continuation."""
        out: list[Finding] = []

        def visit(f: Finding) -> None:
            if f.state is not State.NOT_MET:
                return  # below an open or met group nothing has failed the request
            if f.id and not any(c.id and c.state is State.NOT_MET for c in f.walk()[1:]):
                out.append(f)
            for child in f.children:
                visit(child)

        for finding in self.findings():
            if finding is self.renewal and not self.continuation:
                continue
            visit(finding)
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
        # an open group keeps what weaker evidence below it suggests (a non-specific code prefills the question): one of
        # "any" suggested is enough; "all" is suggested only when every open part of it is
        open_ = [c for c in children if c.state is State.UNKNOWN]
        hints = [c.partial for c in open_ if c.partial]
        partial = hints[0] if hints and (node.op == "any" or len(hints) == len(open_)) else None
        return Finding(node, state, evidence, partial=partial if state is State.UNKNOWN else None, children=children)

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
        if node.op == "below_range":
            below = fact.below_range
            state = State.UNKNOWN if below is None else State.MET if below else State.NOT_MET
            return Finding(node, state, fact.evidence, fact.note or "no reference range on the result")
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
        if node.op in ("present", "absent", "below_range"):
            if not isinstance(answer, bool):
                return Finding(node, State.UNKNOWN, evidence, "the answer is not yes or no")
            met = answer if node.op != "absent" else not answer
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
    companions: Sequence[Mapping[str, Any]] = (),
) -> Determination:
    """Decide one order against one product of one policy. ``companions`` are the other orders for the same product
    signed with it: a dose limit per window holds for them together (:func:`_together`)."""
    ev = _Evaluator(mappings, facts, answers, today)
    reauth = product.reauthorization
    renewal = None
    if reauth is not None:
        renewal = _labelled(reauth.id, reauth.text, ev.node(reauth.when))
    continuation = renewal is not None and renewal.state is State.MET
    notes: list[str] = []

    chosen_id = ev.selection(product)
    stated = facts.reasons()
    diagnoses = [(ind, ev.node(ind.diagnosis)) for ind in product.indications]
    named = _named_by_reason(product, stated, mappings)
    outside = chosen_id is None and stated.coded and not named and _names_a_disorder(stated, mappings)
    if chosen_id is not None:
        candidates = [
            (ind, Finding(ind.diagnosis, State.MET, answers.evidence(product.selection_id), "answered"))
            for ind, _ in diagnoses
            if ind.id == chosen_id
        ]
    elif outside:
        # the order is for a disorder none of the indications covers: "any other use" (no indication is assessed)
        candidates = []
        codes = ", ".join(_reason_codes(stated, mappings))
        notes.append(f"the order's reason ({codes}) is not one of the {policy.number} indications")
    else:
        pool = [(ind, f) for ind, f in diagnoses if not named or ind.id in named]
        established = [(ind, f) for ind, f in pool if f.state is State.MET]
        candidates = established or [(ind, f) for ind, f in pool if f.state is not State.NOT_MET]
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
    # a not-covered use is not applied while a non-specific code on record suggests a covered indication: the
    # prescriber is asked (the indication question, prefilled) rather than denied (review C26)
    suggested_any = any(f.partial for _, f in candidates) and not outside
    if not established_any and not suggested_any and (chosen_id is None or not candidates):
        # uses the document names as not covered; for an order whose reason is another disorder, as the reason says
        judge = _Evaluator(mappings, _ReasonView(facts), answers, today) if outside else ev
        not_covered = [
            f
            for f in (_labelled(nc.id, nc.title, judge.node(nc.when)) for nc in product.not_covered)
            if f.state is State.MET
        ]

    met = [r for r in results if r.state is State.MET]
    unknown = [r for r in results if r.state is State.UNKNOWN]

    def dose_results(result: IndicationResult) -> list[dose_rules.DoseResult]:
        out = []
        for rule in product.dosing + result.indication.dosing:
            own = dose_rules.check(rule, order, facts, answers, today)
            others = [dose_rules.check(rule, c, facts, NO_ANSWERS, today) for c in companions]
            out.append(_together(own, others, product) if others else own)
        return out

    # the dose is checked for the indication that is met, or for the one still open (so everything that will be
    # needed is said at once); with several open indications the limit is not known yet. When several are met, the
    # one whose dose rules the order meets is chosen (each indication has its own limit), else the first in order.
    chosen, doses = None, []
    for result in met:
        checked = dose_results(result)
        if chosen is None or (
            all(d.state is State.MET for d in checked) and not all(d.state is State.MET for d in doses)
        ):
            chosen, doses = result, checked
    if chosen is None and len(unknown) == 1 and not not_covered:
        doses = dose_results(unknown[0])
    if not doses:
        doses = _order_check(policy, order)  # no dose rule applies: an order no one can give is still not approved

    if not_covered:
        decision = Decision.NOT_COVERED
    elif not candidates:
        # any other use: not covered, or (when the document says so) reviewed under the payer's off-label policy
        decision = Decision.REVIEW if product.off_label_review is not None else Decision.NOT_COVERED
    elif chosen is not None:
        auth = product.authorization
        if continuation and auth.renewal_months is None and auth.days is None and auth.doses:
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
        reasons=stated,
        outside_reason=outside,
    )


def _labelled(ident: str, text: str, finding: Finding) -> Finding:
    """A finding for an unnumbered test (a not-covered use, the continuation test) under the id that names it."""
    node = Node(op="all", id=ident, text=text, children=(finding.node,))
    return Finding(node, finding.state, finding.evidence, finding.note, children=(finding,))


def _selection_node(product: Product) -> Node:
    return Node(op="attested", id=product.selection_id, text=f"Which indication is {product.title} requested for?")


def _named_by_reason(product: Product, stated: Reasons, mappings: Mappings) -> frozenset[str]:
    """The indications the order's reason names (a code that proves or suggests their diagnosis)."""
    if not stated.coded:
        return frozenset()
    return frozenset(
        ind.id for ind in product.indications if diagnosis_inputs(ind.diagnosis, mappings) & stated.matched.keys()
    )


def _names_a_disorder(stated: Reasons, mappings: Mappings) -> bool:
    """Whether the reason names a disorder that is an indication of some policy (inputs.yaml ``disorder: true``:
    hemophilia A, factor VII deficiency, heart block ...). A reason that names only an event such as a bleed does
    not: bleeds are what covered orders treat, so the record then decides as if no reason were given. Mapping data,
    so the answer does not depend on which policies a deployment loads."""
    return any(mappings.inputs[name].disorder for name in stated.matched if name in mappings.inputs)


def _reason_codes(stated: Reasons, mappings: Mappings) -> list[str]:
    return [mappings.inputs[name].display for name in sorted(stated.matched) if name in mappings.inputs][:3]


def _order_check(policy: Policy, order: Mapping[str, Any]) -> list[dose_rules.DoseResult]:
    """For a product without dose rules: an order stating an amount no order can mean (a dose of 0) stays open."""
    problems = amounts.impossible(order)
    if not problems:
        return []
    rule = DoseRule(
        id=f"{policy.criterion_prefix}order",
        kind="order",
        text="The order states a dose, quantity and timing that can be given (this service's own check)",
    )
    return [dose_rules.DoseResult(rule, State.UNKNOWN, "; ".join(problems), impossible=True)]


def _together(
    own: dose_rules.DoseResult, others: list[dose_rules.DoseResult], product: Product
) -> dose_rules.DoseResult:
    """A per-kg limit over a window, for an order signed with others of the same product: the figures add up (two
    orders each within 10,800 mcg/kg per 28 days are not within it together). The other kinds of rule count their
    own order (a kit per approval, a rate, tablets per 72 hours are read per order)."""
    rule = own.rule
    if rule.kind != "per_kg" or own.state is not State.MET or own.computed is None:
        return own
    if any(o.computed is None for o in others):
        return replace(
            own,
            state=State.UNKNOWN,
            note=f"{own.note}; the other {product.title} order of this call could not be counted with it",
            ask="attest",
        )
    total = own.computed + sum(o.computed or 0.0 for o in others)
    limit = float(rule.params["amount"])
    if total <= limit:
        return own
    unit, days = rule.params.get("unit", ""), rule.params.get("per_days", "")
    note = (
        f"{total:,.0f} {unit} per {days} days for the {len(others) + 1} {product.title} orders of this call together"
        f" (this one {own.computed:,.0f}); limit {limit:,.0f} {unit}"
    )
    return replace(own, state=State.NOT_MET, computed=total, note=note, proposal=None)
