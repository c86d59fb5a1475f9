"""``cds evaluate REQUEST.json``: run a hook request offline and print each order's determination with its
explanation (for policy authors). Uses the shipped policies and payers, an in-memory store, no authentication."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time
from pathlib import Path

from cds.app import build_runtime
from cds.config import load_config
from cds.crd import hooks
from cds.crd.hookrequest import load_json
from cds.errors import CdsError, NotFound, to_operation_outcome
from policies import explain
from policies.questions import open_questions


def evaluate_file(path: Path, *, as_json: bool = False, today: str | None = None) -> str:
    raw_text = path.read_bytes()
    raw = load_json(raw_text)
    config = load_config({"database_url": "sqlite://", "auth_required": False, "demo_client": False})
    clock = None
    if today:
        day = date.fromisoformat(today)
        clock = lambda: datetime.combine(day, time(12), UTC)  # noqa: E731
    rt = build_runtime(config, clock=clock)
    services = {s.hook: s for s in hooks.services(rt.templates)}
    hook = raw.get("hook") if isinstance(raw, dict) else None
    service = services.get(str(hook))
    if service is None:
        raise NotFound(f"no service here answers the hook {hook!r} (known: {', '.join(sorted(services))})")
    from cds.crd import hookrequest

    lines: list[str] = []
    try:
        outcome = service.handle(rt, hookrequest.parse(raw_text, service.hook))
    except CdsError as exc:
        return f"HTTP {exc.http_status}: {exc.message}\n" + (
            json.dumps(to_operation_outcome(exc), indent=2) if as_json else ""
        )
    assessment = outcome.assessment
    assert assessment is not None
    lines.append(
        f"payer: {assessment.coverage.payer.name} ({assessment.coverage.payer.id}), {assessment.coverage.reference}"
    )
    for a in assessment.orders:
        info = a.info
        lines.append("")
        lines.append(f"{a.reference} — {a.drug}")
        lines.append(
            f"  covered: {info.covered}  pa-needed: {info.pa_needed or '—'}  doc-needed: "
            f"{info.doc_needed or '—'}  assertion: {info.assertion_id}"
        )
        for reason in info.reasons:
            lines.append(f"  reason: {reason.text}")
        det = a.determination
        if det is None:
            continue
        lines.append(f"  policy: {det.policy.ref} product {det.product.id}; decision {det.decision.value}")
        for row in explain.rows(det):
            evidence = ", ".join(row.evidence) or "—"
            note = f" ({row.note})" if row.note else ""
            lines.append(
                f"  {'  ' * row.depth}{row.id:<16} {explain.STATE_WORDS[row.state]:<8} {row.text}{note} [{evidence}]"
            )
        for q in open_questions(det, rt.mappings):
            prefill = f" (record suggests {q.prefill})" if q.prefill is not None else ""
            lines.append(f"  ask {q.link_id}: {q.text} [{q.type}{' ' + q.unit if q.unit else ''}]{prefill}")
    if as_json:
        lines.append("")
        lines.append(json.dumps(outcome.body, indent=2))
    return "\n".join(lines)
