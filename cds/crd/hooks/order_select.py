"""order-select (secondary hook): early coverage information for the selected MedicationRequests. Never asks for
clinical documentation (CRD §hook-19) and never issues an authorization: that waits for order-sign."""

from __future__ import annotations

from cds.crd.hookrequest import HookRequest, order_bundle, require_id, require_reference
from cds.crd.hooks.orders import answer
from cds.crd.registry import HookOutcome, ServiceDefinition
from cds.errors import InvalidRequest
from cds.runtime import Runtime


def handle(rt: Runtime, request: HookRequest) -> HookOutcome:
    require_reference(request.context, "userId", ("Practitioner", "PractitionerRole"))
    require_id(request.context, "patientId")
    require_id(request.context, "encounterId", required=False)
    orders = order_bundle(request.context)
    selections = request.context.get("selections")
    if not isinstance(selections, list) or not selections or not all(isinstance(s, str) for s in selections):
        raise InvalidRequest(
            "context.selections must list the selected orders (Type/id)", expression="context.selections"
        )
    known = {f"{o['resourceType']}/{o['id']}": o for o in orders}
    unknown = [s for s in selections if s not in known]
    if unknown:
        raise InvalidRequest(
            f"context.selections names orders not in draftOrders: {', '.join(unknown)}", expression="context.selections"
        )
    return answer(rt, request, [known[s] for s in selections], primary=False)


def service(prefetch: dict[str, str]) -> ServiceDefinition:
    return ServiceDefinition(
        id="order-select",
        hook="order-select",
        title="Drug coverage requirements (order-select)",
        description=(
            "Early coverage and prior authorization information for selected medication orders; the "
            "documentation and any authorization follow at order-sign."
        ),
        prefetch=prefetch,
        handle=handle,
    )
