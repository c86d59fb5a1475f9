"""Which inputs a product reads: what the service must fetch for it, and what the mapping check calls used."""

from __future__ import annotations

from fhir_mappings.loader import Mappings
from policies import dose
from policies.model import Node, Product


def inputs_of(product: Product) -> frozenset[str]:
    used: set[str] = set(product.drugs)
    used.update(n.input for n in product.all_nodes() if n.input)
    for rule in product.dose_rules():
        used.update(dose.DOSE_KINDS[rule.kind].inputs(rule))
    for alternative in [product.alternative, *(nc.alternative for nc in product.not_covered)]:
        if alternative is not None:
            used.add(alternative.drug)
    return frozenset(used)


def diagnosis_inputs(node: Node, mappings: Mappings) -> frozenset[str]:
    """The diagnosis inputs an indication's diagnosis criterion tests (what an order's stated reason is matched to)."""
    return frozenset(
        n.input
        for n in node.walk()
        if n.op == "present" and n.input and mappings.inputs[n.input].kind in ("condition", "order_reason")
    )
