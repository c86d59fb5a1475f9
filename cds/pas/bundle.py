"""Checking a PAS request Bundle (Da Vinci PAS 2.2.1 §2.2) before anything is decided or stored.

A Bundle that cannot be processed is a 4xx OperationOutcome whose ``expression`` names the element (PAS §spec-35):
not a collection Bundle with an identifier, no entries, an entry without ``fullUrl`` or resource, a first entry that
is not a Claim for ``preauthorization``, a reference that resolves to nothing inside the Bundle, a repeated
``supportingInfo.sequence`` or item sequence, or a Coverage / insurer that identifies none of our payers; and, when
reading the request fails, the first element that is not valid FHIR R4 (:func:`read_as_r4`: validating every entry
up front costs up to 10 ms a resource, so it is done only when needed). Everything the request asks that the policy
cannot settle is answered in the ClaimResponse instead (PAS §conf-14).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cds.crd.hookrequest import validate_resource
from cds.errors import CoverageProblem, InvalidRequest, InvalidResource
from cds.payers import Payer
from cds.runtime import Runtime

PAS = "http://hl7.org/fhir/us/davinci-pas/StructureDefinition/"
CERTIFICATION_TYPE = PAS + "extension-certificationType"
REQUESTED_SERVICE = PAS + "extension-requestedService"
LEVEL_OF_SERVICE = PAS + "extension-levelOfServiceCode"
TRANSMISSION_IDS = PAS + "extension-TransmissionIdentifiers"
INFO_CANCELLED = PAS + "modifierextension-infoCancelled"
INFO_CHANGED = PAS + "extension-infoChanged"
NPI = "http://hl7.org/fhir/sid/us-npi"
MEMBER_TYPE = "MB"


@dataclass(frozen=True)
class Checked:
    """A processable request: the Claim (first entry), every entry by fullUrl and by ``Type/id``, the payer the
    Coverage and insurer name, and for a Claim update the prior Claim it carries."""

    bundle: Mapping[str, Any]
    claim: Mapping[str, Any]
    claim_url: str
    payer: Payer
    coverage: Mapping[str, Any] | None
    prior_claim: Mapping[str, Any] | None
    index: Mapping[str, tuple[str, Mapping[str, Any]]] = field(repr=False)

    @property
    def bundle_key(self) -> str:
        ident = self.bundle.get("identifier") or {}
        return f"{ident.get('system') or ''}|{ident.get('value')}"

    @property
    def claim_key(self) -> str:
        return identifier_key(self.claim) or self.claim_url

    def entry(self, ref: Any) -> tuple[str, Mapping[str, Any]] | None:
        """The (fullUrl, resource) a Reference (or reference string) points to, or None."""
        target = ref.get("reference") if isinstance(ref, Mapping) else ref
        return lookup(self.index, target) if isinstance(target, str) else None

    def resolve(self, ref: Any) -> Mapping[str, Any] | None:
        found = self.entry(ref)
        return found[1] if found else None

    def closure(self, *refs: Any) -> list[tuple[str, Mapping[str, Any]]]:
        """The entries these references point to and, transitively, every entry those reference (each once)."""
        out: dict[str, Mapping[str, Any]] = {}
        todo = list(refs)
        while todo:
            found = self.entry(todo.pop())
            if found is None or found[0] in out:
                continue
            out[found[0]] = found[1]
            todo.extend(ref for _path, ref in references(found[1], ""))
        return list(out.items())


def identifier_key(resource: Mapping[str, Any]) -> str | None:
    for ident in resource.get("identifier") or ():
        if isinstance(ident, Mapping) and ident.get("value"):
            return f"{ident.get('system') or ''}|{ident['value']}"
    return None


def lookup(index: Mapping[str, tuple[str, Mapping[str, Any]]], target: str) -> tuple[str, Mapping[str, Any]] | None:
    if target in index:
        return index[target]
    parts = target.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    return index.get("/".join(parts[-2:])) if len(parts) >= 2 else None


def references(resource: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every ``reference`` string in a resource with its FHIRPath-like path; contained and nested Bundles (a DTR
    QuestionnaireResponse Bundle resolves within itself) are not searched, nor local ``#`` references."""
    if isinstance(resource, Mapping):
        if resource.get("resourceType") == "Bundle" and path:
            return
        for key, value in resource.items():
            if key == "contained":
                continue
            if key == "reference" and isinstance(value, str):
                if not value.startswith("#"):
                    yield path, value
                continue
            yield from references(value, f"{path}.{key}" if path else key)
    elif isinstance(resource, list):
        for i, value in enumerate(resource):
            yield from references(value, f"{path}[{i}]")


def mappings(value: Any) -> list[Mapping[str, Any]]:
    """The objects of a JSON array (anything else in it, or a value that is not an array, gives none)."""
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def codes(concept: Any) -> list[str]:
    codings = concept.get("coding") if isinstance(concept, Mapping) else None
    return [str(c.get("code")) for c in codings or () if isinstance(c, Mapping) and c.get("code")]


def extension(element: Any, url: str) -> Mapping[str, Any] | None:
    for ext in (element.get("extension") or ()) if isinstance(element, Mapping) else ():
        if isinstance(ext, Mapping) and ext.get("url") == url:
            return ext
    return None


def certification_type(element: Mapping[str, Any]) -> str | None:
    ext = extension(element, CERTIFICATION_TYPE)
    found = codes(ext.get("valueCodeableConcept")) if ext else []
    return found[0] if found else None


def is_cancelled(element: Mapping[str, Any]) -> bool:
    """certificationType 3 (X12 1322 Cancel), or the infoCancelled modifier extension (PAS §spec-69/70)."""
    cancelled = any(
        isinstance(m, Mapping) and m.get("url") == INFO_CANCELLED and m.get("valueBoolean") is True
        for m in element.get("modifierExtension") or ()
    )
    return cancelled or certification_type(element) == "3"


def _index(entries: list[Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    index: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for i, entry in enumerate(entries):
        where = f"Bundle.entry[{i}]"
        if not isinstance(entry, Mapping):
            raise InvalidResource("Each entry is an object", expression=where)
        url, resource = entry.get("fullUrl"), entry.get("resource")
        if not isinstance(url, str) or not url:
            raise InvalidResource("Every entry of a PAS Bundle has a fullUrl", expression=f"{where}.fullUrl")
        if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
            raise InvalidResource("Every entry of a PAS Bundle has a resource", expression=f"{where}.resource")
        if url in index:
            raise InvalidResource(
                f"The fullUrl {url[:200]} is used twice (PAS §spec-14: each resource once)",
                expression=f"{where}.fullUrl",
            )
        index[url] = (url, resource)
        if isinstance(resource.get("id"), str):
            index.setdefault(f"{resource['resourceType']}/{resource['id']}", (url, resource))
    return index


def _where(entry: int, path: str) -> str:
    return ("Claim" if entry == 0 else f"Bundle.entry[{entry}].resource") + (f".{path}" if path else "")


def _sequences(elements: Any, where: str, *, required: bool) -> None:
    seen: set[Any] = set()
    for i, element in enumerate(elements or ()):
        seq = element.get("sequence") if isinstance(element, Mapping) else None
        if seq is None and not required:
            continue
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise InvalidResource(
                f"{where}[{i}] needs a positive integer sequence", expression=f"{where}[{i}].sequence"
            )
        if seq in seen:
            raise InvalidResource(
                f"{where}.sequence {seq} is used twice; sequences are unique (PAS §spec-22)",
                expression=f"{where}[{i}].sequence",
            )
        seen.add(seq)


def _payer_identifiers(checked_index: Mapping[str, tuple[str, Mapping[str, Any]]], ref: Any) -> list[Mapping[str, Any]]:
    if not isinstance(ref, Mapping):
        return []
    if isinstance(ref.get("identifier"), Mapping):
        return [ref["identifier"]]
    target = ref.get("reference")
    found = lookup(checked_index, target) if isinstance(target, str) else None
    if found is None:
        return []
    return [i for i in found[1].get("identifier") or () if isinstance(i, Mapping)]


def check(rt: Runtime, body: Any, *, inquiry: bool = False) -> Checked:
    """The request Bundle checked (PAS request or inquiry request); raises a 4xx :class:`cds.errors.ClientError`
    whose expression names the offending element."""
    what = "PAS inquiry request" if inquiry else "PAS request"
    if not isinstance(body, Mapping) or body.get("resourceType") != "Bundle":
        raise InvalidResource(f"Send a {what} Bundle (or Parameters with it as resource)", expression="Bundle")
    if body.get("type") != "collection":
        raise InvalidResource(f"A {what} Bundle is of type collection", expression="Bundle.type")
    ident = body.get("identifier")
    if not isinstance(ident, Mapping) or not isinstance(ident.get("value"), str) or not ident["value"]:
        raise InvalidRequest(
            f"A {what} Bundle carries the submitter's transaction identifier", expression="Bundle.identifier"
        )
    entries = body.get("entry")
    if not isinstance(entries, list) or not entries:
        raise InvalidRequest(f"A {what} Bundle holds the Claim and what it references", expression="Bundle.entry")
    index = _index(entries)
    claim_url, claim = entries[0]["fullUrl"], entries[0]["resource"]
    if claim.get("resourceType") != "Claim":
        raise InvalidResource("The first entry of a PAS Bundle is the Claim", expression="Bundle.entry[0].resource")
    if claim.get("use") != "preauthorization":
        raise InvalidResource("The Claim's use is preauthorization", expression="Claim.use")
    _sequences(claim.get("supportingInfo"), "Claim.supportingInfo", required=True)
    _sequences(claim.get("item"), "Claim.item", required=True)
    whole_cancel = certification_type(claim) == "3"
    if not inquiry and not whole_cancel and not claim.get("item"):
        raise InvalidRequest("The Claim asks for at least one item", expression="Claim.item")
    for i, entry in enumerate(entries):
        for path, target in references(entry["resource"], ""):
            if i > 0 and entry["resource"].get("resourceType") == "Claim" and path.startswith("related"):
                continue  # the prior Claim of an update comes without its own predecessor (PAS §spec-66)
            if lookup(index, target) is None:
                raise InvalidResource(
                    f"The reference {target[:200]} does not resolve inside the Bundle (PAS §spec-13)",
                    expression=_where(i, path),
                )
    for name in ("patient", "insurer", "provider"):
        if not isinstance(claim.get(name), Mapping):
            raise InvalidRequest(f"The Claim names its {name}", expression=f"Claim.{name}")
    insurer_ids = _payer_identifiers(index, claim["insurer"])
    payer = rt.payers.match(insurer_ids)
    if payer is None:
        raise CoverageProblem(
            "Claim.insurer identifies none of the payers this service serves", expression="Claim.insurer"
        )
    coverage: Mapping[str, Any] | None = None
    insurance = [i for i in claim.get("insurance") or () if isinstance(i, Mapping)]
    focal = next((n for n, i in enumerate(insurance) if i.get("focal") is True), 0 if insurance else None)
    if focal is None:
        if not inquiry:
            raise InvalidRequest("The Claim names its Coverage (insurance.focal)", expression="Claim.insurance")
    else:
        found = lookup(index, str((insurance[focal].get("coverage") or {}).get("reference") or ""))
        where = f"Claim.insurance[{focal}].coverage"
        if found is None or found[1].get("resourceType") != "Coverage":
            raise InvalidResource("The focal insurance names a Coverage inside the Bundle", expression=where)
        coverage = found[1]
        payors = [p for ref in coverage.get("payor") or () for p in _payer_identifiers(index, ref)]
        if rt.payers.match(payors) is not payer:
            raise CoverageProblem(
                f"The Coverage's payor is not {payer.name}, the Claim's insurer", expression=f"{where}.payor"
            )
    prior: Mapping[str, Any] | None = None
    for n, related in enumerate(claim.get("related") or ()):
        ref = related.get("claim") if isinstance(related, Mapping) else None
        if ref is not None:
            found = lookup(index, str(ref.get("reference") or "")) if isinstance(ref, Mapping) else None
            if found is None or found[1].get("resourceType") != "Claim":
                raise InvalidResource(
                    "A Claim update carries the prior Claim in the Bundle (PAS §spec-65)",
                    expression=f"Claim.related[{n}].claim",
                )
            prior = found[1]
    return Checked(body, claim, claim_url, payer, coverage, prior, index)


def member_id(checked: Checked) -> str:
    """The patient's member id: the Coverage's identifier of type MB, else its subscriberId, else the Patient's MB
    identifier ("" when none is given)."""
    patient = checked.resolve(checked.claim.get("patient")) or {}
    for resource in (checked.coverage or {}, patient):
        for ident in resource.get("identifier") or ():
            if isinstance(ident, Mapping) and MEMBER_TYPE in codes(ident.get("type")) and ident.get("value"):
                return str(ident["value"])
        if resource is checked.coverage and isinstance(resource.get("subscriberId"), str):
            return str(resource["subscriberId"])
    return ""


def provider_key(checked: Checked) -> str:
    """The requesting provider: its NPI (for a PractitionerRole, the practitioner's, else its organization's), else
    its first identifier, as system|value."""
    provider = checked.resolve(checked.claim.get("provider")) or {}
    candidates = [provider]
    if provider.get("resourceType") == "PractitionerRole":
        candidates += [checked.resolve(provider.get(k)) or {} for k in ("practitioner", "organization")]
    idents = [i for c in candidates for i in c.get("identifier") or () if isinstance(i, Mapping) and i.get("value")]
    ref = checked.claim.get("provider") or {}
    if isinstance(ref, Mapping) and isinstance(ref.get("identifier"), Mapping):
        idents.insert(0, ref["identifier"])
    best = next((i for i in idents if i.get("system") == NPI), idents[0] if idents else None)
    return f"{best.get('system') or ''}|{best['value']}" if best else ""


def org_identifier(checked: Checked) -> str:
    """The sending system: ISA06 (interchangeSenderID of the Claim's TransmissionIdentifiers), else the provider
    Organization's identifier value (PAS §spec-58, the Subscription filter ``org-identifier``)."""
    ext = extension(checked.claim, TRANSMISSION_IDS)
    for part in (ext or {}).get("extension") or ():
        if isinstance(part, Mapping) and part.get("url") == "interchangeSenderID" and part.get("valueString"):
            return str(part["valueString"])
    provider = checked.resolve(checked.claim.get("provider")) or {}
    if provider.get("resourceType") == "PractitionerRole":
        provider = checked.resolve(provider.get("organization")) or provider
    key = provider_key(checked)
    for ident in provider.get("identifier") or ():
        if isinstance(ident, Mapping) and ident.get("value"):
            return str(ident["value"])
    return key.partition("|")[2]


def expedited(claim: Mapping[str, Any]) -> bool:
    """Claim.priority stat / urgent, or levelOfServiceCode U (urgent) or E (emergency)."""
    level = extension(claim, LEVEL_OF_SERVICE)
    return bool(set(codes(claim.get("priority"))) & {"stat", "urgent"}) or bool(
        set(codes((level or {}).get("valueCodeableConcept"))) & {"U", "E"}
    )


@contextmanager
def read_as_r4(body: Any) -> Iterator[None]:
    """Around everything that reads a request Bundle (checking, deciding): an element of a type FHIR R4 does not
    allow makes the reading fail (TypeError, KeyError...); then every entry is validated and the 400 names the first
    element that is not R4. When every entry is valid the fault is ours and the error goes on (a 500). Reading
    stores nothing, so nothing is left behind."""
    try:
        yield
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        entries = body.get("entry") if isinstance(body, Mapping) else None
        for i, entry in enumerate(entries if isinstance(entries, list) else ()):
            if isinstance(entry, Mapping) and isinstance(entry.get("resource"), Mapping):
                validate_resource(entry["resource"], _where(i, ""))
        raise
