"""What order-sign and order-select share: answering for the MedicationRequests in scope."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cds import cards
from cds.crd import assess
from cds.hookrequest import HookRequest
from cds.registry import HookOutcome
from cds.runtime import Runtime


def answer(rt: Runtime, request: HookRequest, orders: Sequence[Mapping[str, Any]], *, primary: bool) -> HookOutcome:
    assessment = assess(rt, request, orders, primary=primary)
    body: dict[str, Any] = {"cards": cards.build(rt, request, assessment, primary=primary)}
    actions = cards.system_actions(assessment, request.configuration)
    if actions:
        body["systemActions"] = actions
    return HookOutcome(body, assessment)
