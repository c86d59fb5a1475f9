"""order-sign (primary hook): coverage information for every draft MedicationRequest, with the Questionnaire for
what is missing or the prior authorization the record already satisfies."""

from __future__ import annotations

from cds.crd.hookrequest import HookRequest, order_bundle, require_id, require_reference
from cds.crd.hooks.orders import answer
from cds.crd.registry import HookOutcome, ServiceDefinition
from cds.runtime import Runtime


def handle(rt: Runtime, request: HookRequest) -> HookOutcome:
    require_reference(request.context, "userId", ("Practitioner", "PractitionerRole"))
    require_id(request.context, "patientId")
    require_id(request.context, "encounterId", required=False)
    orders = order_bundle(request.context)
    return answer(rt, request, orders, primary=True)


def service(prefetch: dict[str, str]) -> ServiceDefinition:
    return ServiceDefinition(
        id="order-sign",
        hook="order-sign",
        title="Drug coverage requirements (order-sign)",
        description=(
            "Coverage, prior authorization and documentation requirements for signed medication orders, "
            "under the payer's drug policies; approves at once when the record meets the policy."
        ),
        prefetch=prefetch,
        handle=handle,
    )
