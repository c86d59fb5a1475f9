"""Explanations of a determination: one row per criterion it rests on, in the document's order and numbering.

Pure text, shared by the cards, the stored trace and ``cds evaluate``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from policies.engine import Decision, Determination, Finding
from policies.model import State

STATE_WORDS = {State.MET: "met", State.NOT_MET: "not met", State.UNKNOWN: "unknown"}

# UCUM as people read it (the seeds write mcg, BU, IU); the codes stay UCUM wherever a machine reads them
_SHOWN = (
    (re.compile(r"(?<![A-Za-z\[])ug(?=\b|/)"), "mcg"),
    (re.compile(r"\[beth'U\]"), "BU"),
    (re.compile(r"\[IU\]"), "IU"),
    (re.compile(r"\{kit\}"), "kit(s)"),
    (re.compile(r"\{tbl\}"), "tablet(s)"),
)


def shown(text: str) -> str:
    """A note or reason with its UCUM units written as the policies write them (ug/kg: mcg/kg; [beth'U]/mL: BU/mL)."""
    for pattern, word in _SHOWN:
        text = pattern.sub(word, text)
    return text


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    state: State
    evidence: tuple[str, ...]
    note: str
    depth: int


def _rows(finding: Finding, depth: int, out: list[Row]) -> None:
    if finding.id:
        out.append(Row(finding.id, finding.node.text, finding.state, finding.evidence, shown(finding.note), depth))
        depth += 1
    for child in finding.children:
        _rows(child, depth, out)


def rows(det: Determination) -> list[Row]:
    """Every numbered criterion of the candidate indications (and the tests around them), with its result."""
    out: list[Row] = []
    if det.renewal is not None and det.continuation:
        _rows(det.renewal, 0, out)
    if det.selection is not None:
        _rows(det.selection, 0, out)
    results = [det.chosen] if det.chosen is not None else list(det.indications)
    for result in results:
        for finding in result.findings:
            _rows(finding, 0, out)
    for finding in det.not_covered:
        _rows(finding, 0, out)
    for dose in det.doses:
        out.append(Row(dose.id, dose.rule.text, dose.state, dose.evidence, shown(dose.note), 0))
    return out


def trace(det: Determination) -> dict[str, Any]:
    """The stored trace: decision, policy, and every criterion with state and evidence (JSON-ready)."""
    return {
        "policy": det.policy.ref,
        "product": det.product.id,
        "decision": det.decision.value,
        "date": det.today.isoformat(),
        "continuation": det.continuation,
        "indication": det.chosen.indication.id if det.chosen else None,
        "criteria": [
            {"id": r.id, "text": r.text, "state": r.state.value, "evidence": list(r.evidence), "note": r.note}
            for r in rows(det)
        ],
        "notes": list(det.notes),
    }


def failed_text(det: Determination) -> str:
    """Why the order is not covered, citing the criteria."""
    if det.not_covered:
        nc = det.not_covered[0]
        return f"{nc.id} {nc.node.text}: {det.product.other_use.text}"
    if not det.indications:
        why = f" ({'; '.join(det.notes)})" if det.notes else ""
        return f"{det.product.other_use.id}: {det.product.other_use.text}{why}"
    failed = det.failed()
    parts = [f"{f.id} {f.node.text} (not met{': ' + shown(f.note) if f.note else ''})" for f in failed[:3]]
    if det.notes:
        parts.extend(det.notes)
    return "; ".join(parts) or det.product.other_use.text


def headline(det: Determination) -> str:
    return {
        Decision.APPROVED: "criteria met",
        Decision.DOCUMENTATION: "criteria met; documentation required",
        Decision.NEEDS_INFO: "documentation needed",
        Decision.DOSE_REVIEW: "dose exceeds the policy limit",
        Decision.NOT_COVERED: "not covered",
        Decision.REVIEW: "not a listed use; off-label review",
    }[det.decision]
