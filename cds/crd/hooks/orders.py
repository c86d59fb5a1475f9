"""What order-sign and order-select share: answering for the MedicationRequests in scope."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cds.crd import cards
from cds.crd.assess import assess
from cds.crd.hookrequest import HookRequest
from cds.crd.registry import HookOutcome
from cds.runtime import Runtime


def answer(rt: Runtime, request: HookRequest, orders: Sequence[Mapping[str, Any]], *, primary: bool) -> HookOutcome:
    assessment = assess(rt, request, orders, primary=primary)
    body: dict[str, Any] = {"cards": cards.build(rt, request, assessment, primary=primary)}
    actions = cards.system_actions(assessment, request.configuration)
    # order-sign always carries the key, [] when no order is due an action (a re-signed unchanged order, CRD
    # §resp-29): Inferno's CRD suite errors on a missing systemActions for order-sign; order-select omits an empty one
    if actions or primary:
        body["systemActions"] = actions
    return HookOutcome(body, assessment)
