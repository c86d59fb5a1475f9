"""The shape of a loaded policy. Frozen: nothing changes after load, so one copy serves every request.

A policy (one payer document) covers one or more products (drugs). A product lists its indications; an indication
is a diagnosis criterion plus the criteria that must all be met, and its dose rules. Criterion ids follow the
document's own numbering (``IP0356-4A.ii``), so every determination can be traced to the text it rests on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class State(StrEnum):
    MET = "met"
    NOT_MET = "not-met"
    UNKNOWN = "unknown"


COMPARISONS = (">=", ">", "<=", "<")
# the whole rule vocabulary: three combinators and these leaf operators (checked when policies load)
# "below_range": a lab result under the lab's own reference range (its L / LL flag, or value < referenceRange.low)
LEAF_OPS = frozenset({"present", "absent", "attested", "is", "below_range", *COMPARISONS})
# all / any / not as usual; "tests": children are tests of one fact (a failed one decides, else a passed one; tests
# not done do not count), e.g. an inhibitor titer and an inhibitor screen
GROUP_OPS = frozenset({"all", "any", "not", "tests"})


@dataclass(frozen=True)
class Node:
    """A criterion. A leaf tests one input (or asks for an attestation); a group combines children."""

    op: str
    id: str | None = None
    text: str = ""
    input: str | None = None
    value: float | str | None = None  # comparisons: threshold in the input's unit; "is": the answer code
    shown: str = ""  # the threshold as the policy wrote it, for explanations ("≥ 5 [beth'U]/mL")
    within_days: int | None = None  # results older than this count as missing
    children: tuple[Node, ...] = ()

    @property
    def is_leaf(self) -> bool:
        return self.op in LEAF_OPS

    def walk(self) -> tuple[Node, ...]:
        out: list[Node] = [self]
        for child in self.children:
            out.extend(child.walk())
        return tuple(out)


@dataclass(frozen=True)
class DoseRule:
    id: str
    kind: str  # a key of policies.dose.DOSE_KINDS
    text: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Alternative:
    drug: str  # a drug input
    text: str


@dataclass(frozen=True)
class Indication:
    id: str
    title: str
    diagnosis: Node
    criteria: tuple[Node, ...]
    dosing: tuple[DoseRule, ...] = ()


@dataclass(frozen=True)
class NotCovered:
    id: str
    title: str
    when: Node
    alternative: Alternative | None = None


@dataclass(frozen=True)
class Statement:
    """A numbered statement of the document that is not a test (e.g. "Receipt of sample product ...")."""

    id: str
    text: str


@dataclass(frozen=True)
class Authorization:
    id: str
    text: str
    initial_months: int | None  # None: the approval is for a number of doses, or for `days`
    renewal_months: int | None  # None: may not be renewed (unless it is counted in `days`)
    doses: int | None = None  # one-time therapies
    days: int | None = None  # an approval counted in days (Dsuvia: 72 hours), initial and renewal alike


@dataclass(frozen=True)
class Reauthorization:
    id: str
    text: str
    when: Node  # true when this request continues earlier therapy
    criteria: tuple[Node, ...]


@dataclass(frozen=True)
class Product:
    id: str
    title: str
    drugs: tuple[str, ...]
    indications: tuple[Indication, ...]
    selection_id: str  # linkId of the "which indication" question
    authorization: Authorization
    other_use: Statement  # "any other use is not covered"
    not_covered: tuple[NotCovered, ...] = ()
    dosing: tuple[DoseRule, ...] = ()  # rules for every indication
    reauthorization: Reauthorization | None = None
    documentation: Statement | None = None  # documentation required on every request
    off_label_review: Statement | None = None  # uses the policy does not list go to the off-label review
    statements: tuple[Statement, ...] = ()
    alternative: Alternative | None = None  # proposed when the product is not covered for the use

    def criteria_ids(self) -> tuple[str, ...]:
        ids: list[str] = []
        for node in self.all_nodes():
            if node.id:
                ids.append(node.id)
        return tuple(dict.fromkeys(ids))

    def all_nodes(self) -> tuple[Node, ...]:
        nodes: list[Node] = []
        for ind in self.indications:
            nodes.extend(ind.diagnosis.walk())
            for c in ind.criteria:
                nodes.extend(c.walk())
        for nc in self.not_covered:
            nodes.extend(nc.when.walk())
        if self.reauthorization:
            nodes.extend(self.reauthorization.when.walk())
            for c in self.reauthorization.criteria:
                nodes.extend(c.walk())
        return tuple(nodes)

    def dose_rules(self) -> tuple[DoseRule, ...]:
        rules = list(self.dosing)
        for ind in self.indications:
            rules.extend(ind.dosing)
        return tuple(rules)


@dataclass(frozen=True)
class Policy:
    id: str
    number: str
    title: str
    publisher: str
    effective: str
    version: str
    source: str
    document_url: str | None
    products: tuple[Product, ...]
    path: str
    content_hash: str
    criterion_prefix: str = ""  # every criterion id starts with it (IP0356-, PH109-, KS-, C1701-)

    @property
    def ref(self) -> str:
        """``policy|version``, the form every determination cites."""
        return f"{self.id}|{self.version}"

    def product_for(self, drug_inputs: set[str] | frozenset[str]) -> Product | None:
        for product in self.products:
            if drug_inputs.intersection(product.drugs):
                return product
        return None
