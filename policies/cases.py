"""Run a policy's table of cases (``cases.yaml`` beside ``policy.yaml``): facts in, determination out, compared.

A case gives facts by input name (the engine's view of the record, no FHIR needed), optional answers, an optional
order, and what it wants. Shorthand for facts: ``true``/``false`` for yes/no inputs, ``partial`` for a non-specific
code, ``unsearched`` for a source that was not available, a number for a quantity in the input's unit (measured
today) or ``{value, unit, days_ago, comparator}``, a number of years or a partial birth date for ``age_years``.
A lab given as a mapping may add ``below_range: true/false`` (the lab's own flag). ``reason`` is what the order's own
reason names: diagnosis inputs as ``true`` (a code that proves it) or ``partial`` (one that suggests it), ``{}`` for a
coded reason that maps to nothing. Inputs a case does not name were searched and nothing was found. ``defaults`` may
give facts, answers and the order for every case; ``null`` in a case takes a default back.

Used by the test suite and by ``cds policy check``; a mismatch is reported as ``file: note: what differs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from fhir_mappings import units
from fhir_mappings.extract import NO_REASONS, Fact, Range, Reasons, age_range
from fhir_mappings.loader import Mappings
from policies.engine import Answers, Decision, Determination, Quantity, evaluate
from policies.loader import read_cases
from policies.model import Policy, Product, State
from policies.questions import open_questions, shown

_CASE_KEYS = {"note", "product", "today", "facts", "reason", "answers", "order", "want"}
_WANT_KEYS = {
    "decision",
    "indication",
    "criteria",
    "questions",
    "doses",
    "authorization_months",
    "authorization_days",
    "not_covered",
    "continuation",
    "prefill",
}


class CaseError(ValueError):
    pass


class StaticFacts:
    """Facts given by name, as a case states them. ``reason`` is what the order's own reason names: diagnosis inputs
    as ``true`` (a code that proves it) or ``partial`` (one that suggests it), or ``{}`` for a coded reason that maps
    to no input; without it the order states no reason."""

    def __init__(
        self, mappings: Mappings, given: Mapping[str, Any], today: date, reason: Mapping[str, Any] | None = None
    ) -> None:
        self.mappings = mappings
        self.given = dict(given)
        self.today = today
        self.stated = None if reason is None else dict(reason)

    def reasons(self) -> Reasons:
        if self.stated is None:
            return NO_REASONS
        matched = {str(k): v is True for k, v in self.stated.items()}
        return Reasons(matched, ("case:reason",) if matched else (), coded=True)

    def reason(self, name: str) -> Fact:
        if self.mappings.inputs[name].kind != "condition":
            return self.get(name)
        raw = (self.stated or {}).get(name)
        if raw is True:
            return Fact(True, ("case:reason",), searched=True)
        if raw == "partial":
            return Fact(None, ("case:reason",), partial=True, searched=True, note="non-specific code")
        return Fact(None, searched=True)

    def get(self, name: str) -> Fact:
        spec = self.mappings.inputs[name]
        if name not in self.given:
            if spec.kind == "medication_history":
                return Fact(False, searched=True)
            return Fact(None, searched=spec.kind != "answer")
        raw = self.given[name]
        evidence = (f"case:{name}",)
        if raw is None:  # null: taken back from the defaults, searched and nothing found
            return Fact(False if spec.kind == "medication_history" else None, searched=True)
        if raw == "unsearched":
            return Fact(None, searched=False, note="not available")
        if raw == "partial":
            return Fact(None, evidence, partial=True, searched=True, note="non-specific code")
        if spec.type == "boolean":
            if not isinstance(raw, bool) and raw is not None:
                raise CaseError(f"{name}: expected true, false, partial or unsearched")
            return Fact(raw, evidence if raw is not None else (), searched=True)
        if spec.type == "age":
            if isinstance(raw, str):
                age = age_range(raw, self.today)
                return Fact(age, evidence, partial=raw if age.lo != age.hi else None, searched=True)
            return Fact(Range.exact(float(raw)), evidence, searched=True)
        if spec.type == "code":
            value, days_ago = (raw.get("value"), raw.get("days_ago", 0)) if isinstance(raw, dict) else (raw, 0)
            return Fact(
                value,
                evidence,
                searched=True,
                observed=self.today - timedelta(days=int(days_ago)),
                window_days=spec.recency_days,
            )
        if isinstance(raw, dict):
            value = float(raw["value"])
            if raw.get("unit"):
                value = units.convert(value, str(raw["unit"]), spec.unit or "")
            measured = Range.measured(value, raw.get("comparator"))
            observed = self.today - timedelta(days=int(raw.get("days_ago", 0)))
        else:
            measured, observed = Range.exact(float(raw)), self.today
        below = raw.get("below_range") if isinstance(raw, dict) else None
        return Fact(
            measured, evidence, searched=True, observed=observed, window_days=spec.recency_days, below_range=below
        )


def _quantity(value: Any, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "code": unit, "system": "http://unitsofmeasure.org"}


def build_order(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """A MedicationRequest from the case shorthand ``{dose, every, days, count, dispense, supply_days, refills}``."""
    order: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": "case-order",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/case"},
    }
    if not raw:
        return order
    if "fhir" in raw:
        return {**order, **raw["fhir"]}
    if "dose" in raw:
        repeat: dict[str, Any] = {}
        if "every" in raw:
            period, punit = raw["every"]
            repeat.update({"frequency": 1, "period": period, "periodUnit": punit})
        if "days" in raw:
            repeat["boundsDuration"] = _quantity(raw["days"], "d")
        if "count" in raw:
            repeat["count"] = raw["count"]
        order["dosageInstruction"] = [
            {"timing": {"repeat": repeat}, "doseAndRate": [{"doseQuantity": _quantity(*raw["dose"])}]}
        ]
    if "dispense" in raw:
        disp: dict[str, Any] = {"quantity": _quantity(*raw["dispense"])}
        if "supply_days" in raw:
            disp["expectedSupplyDuration"] = _quantity(raw["supply_days"], "d")
        if "refills" in raw:
            disp["numberOfRepeatsAllowed"] = raw["refills"]
        order["dispenseRequest"] = disp
    return order


def build_answers(raw: Mapping[str, Any] | None) -> Answers:
    values: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        if value is None:
            continue  # a case can take back an answer its defaults give
        if isinstance(value, dict) and "value" in value and "unit" in value:
            values[str(key)] = Quantity(float(value["value"]), str(value["unit"]))
        else:
            values[str(key)] = value
    return Answers(values, source="case-answers")


@dataclass
class CaseResult:
    note: str
    determination: Determination
    wanted: frozenset[str] = frozenset()
    problems: list[str] = field(default_factory=list)


def _product(policy: Policy, name: str | None) -> Product:
    if name is None:
        if len(policy.products) != 1:
            raise CaseError("the policy has several products: name one with 'product'")
        return policy.products[0]
    for product in policy.products:
        if product.id == name:
            return product
    raise CaseError(f"no product '{name}' in {policy.id}")


def _states(det: Determination) -> dict[str, State]:
    states: dict[str, State] = {}
    for finding in det.findings():
        for f in finding.walk():
            if f.id:
                states[f.id] = f.state
    for d in det.doses:
        states[d.id] = d.state
    return states


def run_case(policy: Policy, mappings: Mappings, case: Mapping[str, Any], defaults: Mapping[str, Any]) -> CaseResult:
    extra = set(case) - _CASE_KEYS
    if extra:
        raise CaseError(f"unknown keys {sorted(extra)}")
    note = str(case.get("note") or "")
    if not note:
        raise CaseError("every case needs a note")
    today = date.fromisoformat(str(case.get("today") or defaults.get("today") or "2026-01-15"))
    product = _product(policy, case.get("product") or defaults.get("product"))
    facts = StaticFacts(
        mappings, {**(defaults.get("facts") or {}), **(case.get("facts") or {})}, today, case.get("reason")
    )
    order = build_order(case.get("order") if "order" in case else defaults.get("order"))
    answers = {**(defaults.get("answers") or {}), **(case.get("answers") or {})}
    det = evaluate(policy, product, mappings, facts, order, today, build_answers(answers))
    want = case.get("want") or {}
    if not isinstance(want, dict) or not want:
        raise CaseError(f"{note}: 'want' is required")
    result = CaseResult(note, det, frozenset(want))
    extra = set(want) - _WANT_KEYS
    if extra:
        raise CaseError(f"{note}: unknown expectations {sorted(extra)}")
    problems = result.problems
    if "decision" in want and det.decision.value != want["decision"]:
        problems.append(f"decision is {det.decision.value}, wanted {want['decision']}")
    if "indication" in want:
        got = det.chosen.indication.id if det.chosen else None
        if got != want["indication"]:
            problems.append(f"indication is {got}, wanted {want['indication']}")
    states = _states(det)
    for cid, wanted in (want.get("criteria") or {}).items():
        got_state = states.get(str(cid))
        if got_state is None or got_state.value != wanted:
            problems.append(f"{cid} is {got_state.value if got_state else 'not evaluated'}, wanted {wanted}")
    for cid, wanted in (want.get("doses") or {}).items():
        got_state = states.get(str(cid))
        if got_state is None or got_state.value != wanted:
            problems.append(f"dose {cid} is {got_state.value if got_state else 'not checked'}, wanted {wanted}")
    questions = shown(open_questions(det, mappings))
    if "questions" in want:
        got_q = [q.link_id for q in questions]
        if got_q != list(want["questions"]):
            problems.append(f"questions are {got_q}, wanted {want['questions']}")
    if "prefill" in want:
        got_p = {q.link_id: q.prefill for q in questions if q.prefill is not None}
        if got_p != dict(want["prefill"]):
            problems.append(f"prefill is {got_p}, wanted {want['prefill']}")
    if "authorization_months" in want and det.authorization_months != want["authorization_months"]:
        problems.append(f"authorization is {det.authorization_months} months, wanted {want['authorization_months']}")
    if "authorization_days" in want and det.authorization_days != want["authorization_days"]:
        problems.append(f"authorization is {det.authorization_days} days, wanted {want['authorization_days']}")
    if "not_covered" in want:
        got_nc = [f.id for f in det.not_covered]
        if got_nc != list(want["not_covered"]):
            problems.append(f"not-covered uses are {got_nc}, wanted {want['not_covered']}")
    if "continuation" in want and det.continuation != want["continuation"]:
        problems.append(f"continuation is {det.continuation}, wanted {want['continuation']}")
    return result


def load_case_file(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import yaml

    raw = yaml.safe_load((folder / "cases.yaml").read_text())
    read_cases(folder)  # the same checks as at load
    return dict(raw.get("defaults") or {}), list(raw["cases"])


def run_policy_cases(policy: Policy, mappings: Mappings) -> list[CaseResult]:
    defaults, cases = load_case_file(Path(policy.path))
    return [run_case(policy, mappings, case, defaults) for case in cases]


def coverage_gaps(policy: Policy, results: list[CaseResult]) -> list[str]:
    """What the cases leave untested: each criterion both ways, each dose rule both ways, each not-covered use,
    the authorization duration, and (for multi-indication products) the indication question."""
    gaps: list[str] = []
    seen: dict[str, set[State]] = {}
    fired: set[str] = set()
    asked: set[str] = set()
    other_use: set[str] = set()
    durations: set[str] = set()
    for r in results:
        det = r.determination
        if det.decision in (Decision.NOT_COVERED, Decision.REVIEW) and not det.indications and not det.not_covered:
            other_use.add(det.product.other_use.id)
        if "authorization_months" in r.wanted or "authorization_days" in r.wanted:
            durations.add(det.product.authorization.id)
        for cid, state in _states(r.determination).items():
            seen.setdefault(cid, set()).add(state)
        fired.update(f.id or "" for f in r.determination.not_covered)
        if r.determination.selection is not None:
            asked.add(r.determination.product.selection_id)
    for product in policy.products:
        for node in product.all_nodes():
            if not node.id or any(node is nc.when or node in nc.when.walk() for nc in product.not_covered):
                continue
            states = seen.get(node.id, set())
            for want in (State.MET, State.NOT_MET):
                if want not in states:
                    gaps.append(f"{node.id} is never {want.value}")
        for rule in product.dose_rules():
            states = seen.get(rule.id, set())
            for want in (State.MET, State.NOT_MET):
                if want not in states:
                    gaps.append(f"dose rule {rule.id} is never {want.value}")
        for nc in product.not_covered:
            if nc.id not in fired:
                gaps.append(f"not-covered use {nc.id} never applies")
        if len(product.indications) > 1 and product.selection_id not in asked:
            gaps.append(f"the indication question {product.selection_id} is never asked")
        if product.other_use.id not in other_use:
            gaps.append(f"{product.other_use.id} (any other use) is never the decision")
        if product.authorization.id not in durations:
            gaps.append(f"no case checks the authorization duration {product.authorization.id}")
    return gaps
