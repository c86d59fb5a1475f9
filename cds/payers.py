"""Payer routing: the Coverage's payor Organization identifier selects the payer, and with it the policy set.

CRD §hook-13: no usable Coverage, several, a Coverage without a payer identifier, or a payer this deployment does
not serve is a 400 with an OperationOutcome. A payor given only as a reference is resolved (contained, prefetched, or
read from the EHR) first; when that read is impossible the data is unavailable (412).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cds.crd.prefetch import DataSource, check_resource
from cds.errors import CoverageProblem, DataUnavailable


@dataclass(frozen=True)
class Payer:
    id: str
    name: str
    identifier_system: str
    identifier_value: str
    policies: tuple[str, ...]


class PayerRegistry:
    def __init__(self, payers: Iterable[Payer]) -> None:
        self.payers = tuple(payers)
        self._by_identifier = {(p.identifier_system, p.identifier_value): p for p in self.payers}

    @staticmethod
    def from_config(raw: Iterable[Mapping[str, Any]]) -> PayerRegistry:
        return PayerRegistry(
            Payer(
                str(p["id"]),
                str(p["name"]),
                str(p["identifier_system"]),
                str(p["identifier_value"]),
                tuple(str(x) for x in p.get("policies", ())),
            )
            for p in raw
        )

    def match(self, identifiers: Iterable[Mapping[str, Any]]) -> Payer | None:
        for ident in identifiers:
            payer = self._by_identifier.get((str(ident.get("system")), str(ident.get("value"))))
            if payer:
                return payer
        return None


@dataclass(frozen=True)
class CoverageChoice:
    coverage: Mapping[str, Any]
    payer: Payer

    @property
    def reference(self) -> str:
        return f"Coverage/{self.coverage.get('id')}"

    @property
    def member_id(self) -> str | None:
        sub = self.coverage.get("subscriberId")
        if isinstance(sub, str) and sub:
            return sub
        for ident in self.coverage.get("identifier") or ():
            if isinstance(ident, Mapping) and ident.get("value"):
                return str(ident["value"])
        return None

    @property
    def identity(self) -> tuple[str, ...]:
        """Who this Coverage covers, as it says: its id, subscriber and member ids, the dependent number and the
        beneficiary (reference and identifier); "" for what it does not say. Members of one family coverage share
        the subscriberId; the dependent number and the beneficiary tell them apart."""
        c = self.coverage
        beneficiary = _mapping(c.get("beneficiary"))
        ident = _mapping(beneficiary.get("identifier"))
        return (
            _text(c.get("id")),
            _text(c.get("subscriberId")),
            self.member_id or "",
            _text(c.get("dependent")),
            _text(beneficiary.get("reference")),
            f"{_text(ident.get('system'))}|{_text(ident.get('value'))}",
        )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def payor_identifiers(coverage: Mapping[str, Any], source: DataSource) -> list[Mapping[str, Any]]:
    """Identifiers of the Coverage's payors: given on the reference, else read from the Organization it points to."""
    payors = [p for p in coverage.get("payor") or () if isinstance(p, Mapping)]
    direct = [p["identifier"] for p in payors if isinstance(p.get("identifier"), Mapping)]
    if direct:
        return direct
    found: list[Mapping[str, Any]] = []
    for payor in payors:
        target = payor.get("reference")
        if not isinstance(target, str) or not target:
            continue
        if target.startswith("#"):
            orgs = [c for c in coverage.get("contained") or () if c.get("id") == target[1:]]
        elif target.startswith("Organization/") or "/Organization/" in target:
            got = source.read("Organization/" + target.rsplit("/", 1)[-1])
            if not got.ok:
                raise DataUnavailable(f"The Coverage payor {target} must be read to route the request: {got.note}")
            orgs = list(got.resources)
        else:
            orgs = []
        for org in orgs:
            found.extend(i for i in org.get("identifier") or () if isinstance(i, Mapping))
    return found


def choose_coverage(source: DataSource, registry: PayerRegistry) -> CoverageChoice:
    """The single active Coverage of the request, and the payer it names."""
    got = source.fetch(["coverage"])["coverage"]
    if got.status == "unavailable":
        # CRD §hook-13: "no Coverage is accessible" is a 400 (neither prefetched nor queryable)
        raise CoverageProblem(f"No Coverage is accessible: {got.note} (CRD §hook-13)", expression="prefetch.coverage")
    if not got.ok:
        # the EHR was asked and did not answer usably: the data could not be retrieved (CDS Hooks 412)
        raise DataUnavailable(f"The patient's Coverage is needed to route the request: {got.note}")
    coverages = [
        c for c in got.resources if c.get("resourceType") == "Coverage" and c.get("status", "active") == "active"
    ]
    if not coverages:
        raise CoverageProblem(
            "No active Coverage is available for the patient (CRD §hook-13)", expression="prefetch.coverage"
        )
    if len(coverages) > 1:
        raise CoverageProblem(
            f"{len(coverages)} active Coverages are available; send only the one that applies (CRD §hook-13)",
            expression="prefetch.coverage",
        )
    coverage = coverages[0]
    check_resource(coverage, "prefetch.coverage", got)
    identifiers = payor_identifiers(coverage, source)
    if not identifiers:
        raise CoverageProblem(
            "The Coverage has no payer identifier (Coverage.payor must identify the payer)", expression="Coverage.payor"
        )
    payer = registry.match(identifiers)
    if payer is None:
        names = ", ".join(f"{i.get('system')}|{i.get('value')}" for i in identifiers)
        raise CoverageProblem(f"This endpoint does not serve the payer {names}", expression="Coverage.payor")
    return CoverageChoice(coverage, payer)
