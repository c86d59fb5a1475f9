"""Which stored requests an inquiry asks about: query by example over the inquiry Claim's items (PAS "Prior
Authorization Inquiries", X12 278 inquiry).

The payer, the member id and the requesting provider are matched by the store (:func:`cds.pas.store.matching`). Each
inquiry item is then an example, and a request matches when one of its items fits one of them:

- ``productOrService``: the item's code (system|code; a coding without a system matches on the code), or a code in
  the range up to ``extension-productOrServiceCodeEnd``; no code, or the data-absent code ``not-applicable``, is any
  service (§spec-43);
- ``extension-authorizationNumber`` / ``extension-administrationReferenceNumber``: the authorization issued for the
  item (its ``preAuthRef``), or a reference number the submitter sent on it.

An inquiry without items asks about every request of the patient from that provider.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cds.pas.bundle import PAS, extension, mappings

AUTHORIZATION_NUMBER = PAS + "extension-authorizationNumber"
ADMINISTRATION_REFERENCE = PAS + "extension-administrationReferenceNumber"
CODE_END = PAS + "extension-productOrServiceCodeEnd"
NUMBERS = (AUTHORIZATION_NUMBER, ADMINISTRATION_REFERENCE)
NOT_APPLICABLE = "not-applicable"

Code = tuple[str, str]  # system ("" when not given), code


@dataclass(frozen=True)
class Example:
    codes: frozenset[Code]  # empty: any service
    ranges: tuple[tuple[Code, str], ...]  # (system, first code), last code
    numbers: frozenset[str]  # empty: any authorization

    def fits(self, item: Mapping[str, Any], pa_id: str | None) -> bool:
        if self.codes or self.ranges:
            found = _codes(item.get("productOrService"))
            if not any(self._has(code) for code in found):
                return False
        if self.numbers:
            carried = {n for n in (_number(item, url) for url in NUMBERS) if n}
            if not (self.numbers & ({pa_id} if pa_id else set()) or self.numbers & carried):
                return False
        return True

    def _has(self, code: Code) -> bool:
        if any(_same(code, wanted) for wanted in self.codes):
            return True
        return any(
            _same_system(code[0], first[0])
            and len(code[1]) == len(first[1]) == len(last)
            and first[1] <= code[1] <= last
            for first, last in self.ranges
        )


def examples(claim: Mapping[str, Any]) -> list[Example]:
    """One example per inquiry item."""
    out = []
    for item in mappings(claim.get("item")):
        codes = [c for c in _codes(item.get("productOrService")) if c[1] != NOT_APPLICABLE]
        end = extension(item, CODE_END)
        last = _codes((end or {}).get("valueCodeableConcept"))
        ranges = tuple((first, last[0][1]) for first in codes) if last else ()
        numbers = frozenset(n for n in (_number(item, url) for url in NUMBERS) if n)
        out.append(Example(frozenset() if ranges else frozenset(codes), ranges, numbers))
    return out


def matches(wanted: Sequence[Example], request: Mapping[str, Any]) -> bool:
    """Whether a stored request (its submitted Bundle and explanation) is one the inquiry asks about."""
    if not wanted:
        return True
    pa_ids = {s.get("sequence"): s.get("pa_id") for s in mappings(request["explanation"].get("items"))}
    entries = mappings(request["request"].get("entry"))
    claim = entries[0].get("resource") if entries and isinstance(entries[0], Mapping) else None
    items = mappings(claim.get("item")) if isinstance(claim, Mapping) else []
    return any(e.fits(item, pa_ids.get(item.get("sequence"))) for e in wanted for item in items)


def _codes(concept: Any) -> list[Code]:
    codings: Iterable[Any] = concept.get("coding") or () if isinstance(concept, Mapping) else ()
    return [
        (str(c.get("system") or ""), str(c["code"]))
        for c in (codings if isinstance(codings, list) else ())
        if isinstance(c, Mapping) and c.get("code")
    ]


def _number(item: Mapping[str, Any], url: str) -> str:
    ext = extension(item, url)
    value = (ext or {}).get("valueString")
    return value.strip() if isinstance(value, str) else ""


def _same_system(a: str, b: str) -> bool:
    return not a or not b or a == b


def _same(a: Code, b: Code) -> bool:
    return a[1] == b[1] and _same_system(a[0], b[0])
