"""FHIR ValueSets for the codes of ``fhir_mappings/codes.csv``: one per input (and strength), as the CQL uses them.

The CQL libraries (:mod:`cds.dtr.cql`) test record codes against these ValueSets, so the DTR client needs them:
each carries its canonical ``url`` and a ``version`` derived from its codes (a code added to codes.csv gives a new
version, and so a new library), a ``compose`` listing the codes, and an ``expansion`` when there are fewer than 40
(DTR §oper-15: small ValueSets travel pre-expanded).

Inputs whose rows differ in strength (diagnoses, procedures, settings) have two ValueSets: the codes that prove the
fact and the ``partial`` codes that only suggest it (``D68.2`` suggests factor VII deficiency), because the library
pre-populates from the two differently. Code families (``I61*``: every ICD-10 code under I61) cannot be listed
without the code system, so they are not in the ValueSets: the library matches them by prefix, and the ValueSet's
description names them. Product-name rows (``urn:cds:product-name``) are words of a drug's name, not codes, and are
left out too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fhir_mappings import systems
from fhir_mappings.loader import Mappings
from policies.model import Policy

# fixed canonical base of the generated Libraries and ValueSets: the ELM is committed, so it cannot name the
# deployment's base_url
CANONICAL_BASE = "http://cds-payer.org/fhir"
EXPANSION_LIMIT = 40  # DTR §oper-15: ValueSets with fewer codes are shipped expanded
# inputs whose rows are split by strength (a proof code settles the fact, a partial one suggests it)
SPLIT_KINDS = frozenset({"condition", "order_reason", "procedure", "setting"})
STRENGTHS = ("proof", "partial")


@dataclass(frozen=True)
class ValueSetSpec:
    """The codes of one input (of one strength, for the kinds split by strength) and how the CQL names them."""

    input: str
    strength: str | None  # "proof", "partial", or None: every row of the input
    codes: tuple[tuple[str, str, str], ...]  # (system, code, display), sorted
    families: tuple[tuple[str, str], ...]  # (system, prefix) of code families, sorted: matched by prefix in CQL

    @property
    def key(self) -> str:
        """The ValueSet's name in CQL (``valueset "<key>"``)."""
        return f"{self.input} {'codes' if self.strength in (None, 'proof') else 'suggestive codes'}"

    @property
    def id(self) -> str:
        base = self.input.replace("_", "-")
        return base if self.strength in (None, "proof") else f"{base}.partial"

    @property
    def url(self) -> str:
        return f"{CANONICAL_BASE}/ValueSet/{self.id}"

    @property
    def version(self) -> str:
        content = json.dumps([self.codes, self.families], sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:12]

    @property
    def canonical(self) -> str:
        return f"{self.url}|{self.version}"


def spec(mappings: Mappings, input_name: str, strength: str | None) -> ValueSetSpec:
    """The codes of ``input_name`` (of ``strength``, or all when None), as codes.csv lists them."""
    codes: dict[tuple[str, str], str] = {}
    families: set[tuple[str, str]] = set()
    for row in mappings.rows_for(input_name):
        if strength is not None and row.strength != strength:
            continue
        if row.system == systems.PRODUCT_NAME:
            continue
        if row.code.endswith("*"):
            families.add((row.system, row.code[:-1]))
        else:
            codes.setdefault((row.system, row.code), row.display)
    return ValueSetSpec(
        input_name,
        strength,
        tuple(sorted((s, c, d) for (s, c), d in codes.items())),
        tuple(sorted(families)),
    )


def specs_for(mappings: Mappings, input_name: str) -> tuple[ValueSetSpec, ...]:
    """The ValueSets of one input that list codes (families alone need none: the CQL tests them by prefix)."""
    kind = mappings.inputs[input_name].kind
    strengths: Iterable[str | None] = STRENGTHS if kind in SPLIT_KINDS else (None,)
    return tuple(s for s in (spec(mappings, input_name, st) for st in strengths) if s.codes)


def resource(vs: ValueSetSpec, mappings: Mappings, now: datetime | None = None) -> dict[str, Any]:
    """The FHIR R4 ValueSet: compose by system, and an expansion (timestamp ``now``) when it is small enough."""
    spec_input = mappings.inputs[vs.input]
    what = {"proof": "codes that establish", "partial": "codes that only suggest", None: "codes of"}[vs.strength]
    description = f"{what.capitalize()}: {spec_input.display} (fhir_mappings/codes.csv, input {vs.input})."
    if vs.families:
        shown = ", ".join(f"{prefix}*" for _, prefix in vs.families)
        description += f" Code families matched by prefix in the library's CQL, not listed here: {shown}."
    by_system: dict[str, list[dict[str, str]]] = {}
    for system, code, display in vs.codes:
        by_system.setdefault(system, []).append({"code": code, "display": display})
    out: dict[str, Any] = {
        "resourceType": "ValueSet",
        "id": vs.id,
        "url": vs.url,
        "version": vs.version,
        "name": "".join(ch for ch in vs.key.title() if ch.isalnum()),
        "title": f"{spec_input.display} ({'suggestive ' if vs.strength == 'partial' else ''}codes)",
        "status": "active",
        "publisher": "cds-payer",
        "description": description,
        "compose": {
            "include": [{"system": system, "concept": concepts} for system, concepts in sorted(by_system.items())]
        },
    }
    if len(vs.codes) < EXPANSION_LIMIT:
        out["expansion"] = expansion(vs, now)
    return out


def expansion(vs: ValueSetSpec, now: datetime | None = None) -> dict[str, Any]:
    """Every listed code (families are not: the library's CQL matches them by prefix, as its description says)."""
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {
        "identifier": f"urn:uuid:{_uuid(vs.canonical)}",
        "timestamp": stamp,
        "total": len(vs.codes),
        "contains": [{"system": s, "code": c, "display": d} for s, c, d in vs.codes],
    }


def _uuid(text: str) -> str:
    h = hashlib.sha256(text.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def value_sets(policy: Policy, mappings: Mappings) -> list[dict[str, Any]]:
    """The ValueSets the policy's library references, in the order it declares them."""
    from cds.dtr.cql import value_set_specs  # cql declares what it uses (and imports this module)

    return [resource(vs, mappings) for vs in value_set_specs(policy, mappings)]


def all_value_sets(mappings: Mappings, policies: Iterable[Policy]) -> list[dict[str, Any]]:
    """The ValueSets of every policy's library, each once (by canonical)."""
    from cds.dtr.cql import value_set_specs

    seen: dict[str, ValueSetSpec] = {}
    for policy in policies:
        for vs in value_set_specs(policy, mappings):
            seen.setdefault(vs.canonical, vs)
    return [resource(vs, mappings) for vs in seen.values()]


def find(mappings: Mappings, url: str, version: str | None) -> dict[str, Any] | None:
    """Any ValueSet a library may reference, by canonical (``version`` None: the current one), for ValueSet/$expand."""
    for vs in _all_specs(mappings).get(url, ()):
        if version in (None, vs.version):
            return resource(vs, mappings)
    return None


def _all_specs(mappings: Mappings) -> Mapping[str, tuple[ValueSetSpec, ...]]:
    by_url: dict[str, list[ValueSetSpec]] = {}
    for name, spec_input in mappings.inputs.items():
        if spec_input.kind in ("age", "answer"):
            continue
        for vs in specs_for(mappings, name):
            by_url.setdefault(vs.url, []).append(vs)
    return {url: tuple(v) for url, v in by_url.items()}
