"""Which inputs a product reads: what the service must fetch for it, and what the mapping check calls used."""

from __future__ import annotations

from policies import dose
from policies.model import Product


def inputs_of(product: Product) -> frozenset[str]:
    used: set[str] = set(product.drugs)
    used.update(n.input for n in product.all_nodes() if n.input)
    for rule in product.dose_rules():
        used.update(dose.DOSE_KINDS[rule.kind].inputs(rule))
    for alternative in [product.alternative, *(nc.alternative for nc in product.not_covered)]:
        if alternative is not None:
            used.add(alternative.drug)
    return frozenset(used)
