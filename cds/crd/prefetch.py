"""Where the data for a decision comes from: the request's prefetch first, then the EHR's FHIR server.

:func:`open_source` decides whether the EHR may be queried at all (the client's ``fhir_servers``), and the
:class:`DataSource` holds one of the process's EHR slots while it queries (slow EHRs never take every thread).
:func:`check_resource` tells the client's mistake (an invalid prefetched resource: 400) from data we read from the
EHR and cannot use (412).

The prefetch templates (CDS Hooks 2.0: root-level context tokens only) are also the queries run when a key is
missing, so data from either path is the same. A key holding ``null`` means "no data"; a key holding an
OperationOutcome means the client could not fetch it, and it is queried like a missing key.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cds import metrics
from cds.crd.hookrequest import HookRequest, validate_resource
from cds.errors import DataUnavailable, InvalidRequest, InvalidResource
from cds.fhirclient import FhirClient, FhirReadError, bundle_resources
from cds.upstream import allowed
from fhir_mappings import systems
from fhir_mappings.loader import Mappings
from policies.model import Product
from policies.needs import inputs_of

if TYPE_CHECKING:
    from cds.runtime import Runtime

TOKEN = re.compile(r"\{\{\s*context\.([A-Za-z]+)\s*\}\}")

# the sources a decision reads, and the prefetch keys that feed each
SOURCES: Mapping[str, tuple[str, ...]] = {
    "patient": ("patient",),
    "coverage": ("coverage",),
    "practitioners": ("user", "practitionerRoles"),
    "conditions": ("conditions",),
    "observations": ("observations",),
    "medication_history": ("medicationStatements", "medicationRequests", "medicationAdministrations"),
    "procedures": ("procedures",),
    "encounter": ("encounter",),
}


# where each kind of policy input is read from (drug and answer inputs read no source)
KIND_SOURCES: Mapping[str, str] = {
    "age": "patient",
    "condition": "conditions",
    "order_reason": "conditions",
    "lab": "observations",
    "lab_code": "observations",
    "specialty": "practitioners",
    "medication_history": "medication_history",
    "procedure": "procedures",
    "setting": "encounter",
}
SOURCE_ORDER = (
    "patient",
    "encounter",
    "practitioners",
    "conditions",
    "observations",
    "medication_history",
    "procedures",
)


def sources_of(mappings: Mappings, product: Product) -> frozenset[str]:
    """The sources a product's inputs read: what a decision under it must fetch, and nothing more."""
    kinds = (mappings.inputs[name].kind for name in inputs_of(product))
    return frozenset(KIND_SOURCES[k] for k in kinds if k in KIND_SOURCES)


def order_prefetch(mappings: Mappings) -> dict[str, str]:
    """Prefetch templates for the order hooks. The Observation codes are every LOINC code the mappings read."""
    loinc = sorted({r.code for r in mappings.rows if r.system == systems.LOINC})
    codes = ",".join(f"{systems.LOINC}|{c}" for c in loinc)
    return {
        "patient": "Patient/{{context.patientId}}",
        "encounter": "Encounter/{{context.encounterId}}",
        "coverage": "Coverage?patient={{context.patientId}}&status=active",
        "user": "{{context.userId}}",
        "practitionerRoles": "PractitionerRole?practitioner={{context.userId}}",
        "conditions": "Condition?patient={{context.patientId}}",
        "observations": f"Observation?patient={{{{context.patientId}}}}&code={codes}",
        "medicationStatements": "MedicationStatement?patient={{context.patientId}}",
        "medicationRequests": "MedicationRequest?patient={{context.patientId}}",
        "medicationAdministrations": "MedicationAdministration?patient={{context.patientId}}",
        "procedures": "Procedure?patient={{context.patientId}}",
    }


@dataclass(frozen=True)
class Fetched:
    resources: tuple[Mapping[str, Any], ...] = ()
    status: str = "ok"  # ok | failed (queried, and the query failed) | unavailable (absent, and no way to query)
    note: str = ""
    origin: str = "prefetch"  # prefetch (the client sent it) | ehr (we read it from fhirServer)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def render(template: str, context: Mapping[str, Any]) -> str | None:
    """A template with its tokens filled from the context, or None when a token has no usable value."""
    missing = False

    def fill(match: re.Match[str]) -> str:
        nonlocal missing
        value = context.get(match.group(1))
        if not isinstance(value, str) or not value:
            missing = True
            return ""
        return value

    out = TOKEN.sub(fill, template)
    return None if missing else out


def _prefetched(key: str, value: Any) -> Fetched | None:
    """What a prefetch value holds, or None when it must be queried (an OperationOutcome)."""
    if value is None:
        return Fetched()
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        raise InvalidRequest(f"prefetch.{key} must be a FHIR resource, a Bundle or null", expression=f"prefetch.{key}")
    if value["resourceType"] == "OperationOutcome":
        return None
    if value["resourceType"] == "Bundle":
        return Fetched(tuple(bundle_resources(value)))
    return Fetched((value,))


def check_resource(resource: Mapping[str, Any], where: str, fetched: Fetched) -> None:
    """Validate a resource a decision rests on (FHIR R4). Sent in the prefetch, an invalid one is the client's
    mistake (400, naming the element); read by us from the EHR's FHIR server, it is data the service could not
    obtain in usable form (412, CDS Hooks: unable to retrieve the necessary FHIR data)."""
    try:
        validate_resource(resource, where)
    except InvalidResource as exc:
        if fetched.origin != "ehr":
            raise
        rtype = resource.get("resourceType")
        raise DataUnavailable(
            f"The {rtype} read from the EHR's FHIR server is not valid FHIR R4 ({exc.message}); it cannot be used"
        ) from None


class DataSource:
    """One request's view of the EHR data. Fetches each key once; queries missing keys in parallel.

    ``client`` is None when the call cannot be queried (no fhirServer or token, or a server this client may not
    name); ``why_not`` then says why. A call that queries holds one of the process's ``slots`` until it closes, so
    calls stuck on slow EHRs never take every worker thread: without a free slot its queries fail at once (the
    answer degrades) and the threads left serve the calls that need no EHR.
    """

    def __init__(
        self,
        request: HookRequest,
        templates: Mapping[str, str],
        client: FhirClient | None,
        *,
        slots: threading.Semaphore | None = None,
        why_not: str = "the FHIR server cannot be queried",
    ) -> None:
        self.request = request
        self.templates = templates
        self.client = client
        self.slots = slots
        self.why_not = why_not
        self._cache: dict[str, Fetched] = {}
        self._slot = threading.Lock()
        self._holding: bool | None = None  # None: not asked yet
        self.queried: list[str] = []  # keys and references read from the FHIR server (for the audit record)

    def _take_slot(self) -> bool:
        with self._slot:
            if self._holding is None:
                self._holding = self.slots is None or self.slots.acquire(timeout=0.05)
            return self._holding

    def _query(self, relative: str) -> Fetched:
        assert self.client is not None
        started = time.perf_counter()
        if not self._take_slot():
            metrics.ehr_query(relative, time.perf_counter() - started, "busy")
            return Fetched(status="failed", note="too many calls are waiting on EHR servers just now", origin="ehr")
        try:
            found = Fetched(tuple(self.client.search(relative)), origin="ehr")
        except FhirReadError as exc:
            late = self.client.reader.remaining() <= 0  # the call's deadline passed: a timeout, else an error
            metrics.ehr_query(relative, time.perf_counter() - started, "failed", "timeout" if late else "error")
            return Fetched(status="failed", note=str(exc), origin="ehr")
        metrics.ehr_query(relative, time.perf_counter() - started, "ok")
        return found

    def _resolve(self, key: str) -> Fetched:
        if key in self.request.prefetch:
            got = _prefetched(key, self.request.prefetch[key])
            if got is not None:
                return got
        template = self.templates.get(key)
        rendered = render(template, self.request.context) if template else None
        if rendered is None:
            return Fetched()  # nothing to look up (e.g. no userId): no data, not an error
        if key == "practitionerRoles" and not str(self.request.context.get("userId", "")).startswith("Practitioner/"):
            return Fetched()
        if self.client is None:
            return Fetched(status="unavailable", note=f"prefetch '{key}' was not sent and {self.why_not}")
        self.queried.append(rendered)
        return self._query(rendered)

    def fetch(self, keys: Iterable[str]) -> dict[str, Fetched]:
        wanted = [k for k in dict.fromkeys(keys) if k not in self._cache]
        local = [
            k for k in wanted if k in self.request.prefetch and _prefetched(k, self.request.prefetch[k]) is not None
        ]
        remote = [k for k in wanted if k not in local]
        for key in local:
            self._cache[key] = self._resolve(key)
        if len(remote) > 1 and self.client is not None:
            with ThreadPoolExecutor(max_workers=min(4, len(remote))) as pool:
                for key, got in zip(remote, pool.map(self._resolve, remote), strict=True):
                    self._cache[key] = got
        else:
            for key in remote:
                self._cache[key] = self._resolve(key)
        return {k: self._cache[k] for k in keys}

    def source(self, name: str) -> Fetched:
        """All resources of a named source (several prefetch keys may feed it)."""
        results = self.fetch(SOURCES[name])
        resources = tuple(r for f in results.values() for r in f.resources)
        origin = "ehr" if any(f.origin == "ehr" for f in results.values()) else "prefetch"
        bad = [f for f in results.values() if not f.ok]
        if bad:
            status = "unavailable" if any(f.status == "unavailable" for f in bad) else "failed"
            return Fetched(resources, status, "; ".join(f.note for f in bad), origin)
        return Fetched(resources, origin=origin)

    def search(self, relative: str) -> Fetched:
        """A search on the client's FHIR server (e.g. whether it holds a Questionnaire); unavailable without one."""
        if self.client is None:
            return Fetched(status="unavailable", note=self.why_not)
        self.queried.append(relative)
        return self._query(relative)

    def read(self, reference: str) -> Fetched:
        """A single resource by relative reference (``Organization/1``), from the prefetched data or the server."""
        key = f"read:{reference}"
        if key in self._cache:
            return self._cache[key]
        rtype, _, rid = reference.partition("/")
        for value in self.request.prefetch.values():
            if not isinstance(value, dict):
                continue
            found = [
                r
                for r in ([value] if value.get("resourceType") != "Bundle" else bundle_resources(value))
                if r.get("resourceType") == rtype and r.get("id") == rid
            ]
            if found:
                self._cache[key] = Fetched((found[0],))
                return self._cache[key]
        if self.client is None:
            got = Fetched(status="unavailable", note=f"{reference} is not in the prefetch and {self.why_not}")
        else:
            self.queried.append(reference)
            got = self._query(reference)
        self._cache[key] = got
        return got

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        with self._slot:
            if self._holding and self.slots is not None:
                self.slots.release()
            self._holding = False


def open_source(rt: Runtime, request: HookRequest) -> DataSource:
    """The data of one hook call. Its ``fhirServer`` is queried only when it is one the calling client may name
    (``[[clients]] fhir_servers``; ``fhir_servers`` without authentication): the bearer token and our requests go
    nowhere else, internal addresses included."""
    client = None
    why_not = "the FHIR server cannot be queried (no fhirServer and fhirAuthorization)"
    if request.can_query and request.fhir_server:
        if allowed(request.fhir_server, rt.fhir_servers(request.client)):
            cfg = rt.config
            client = FhirClient(
                request.fhir_server,
                request.access_token or "",
                connect_timeout=float(cfg["fhir_connect_timeout"]),
                read_timeout=float(cfg["fhir_read_timeout"]),
                budget_seconds=float(cfg["fhir_total_timeout"]),
                max_bytes=int(cfg["fhir_max_response_bytes"]),
            )
        else:
            why_not = "the fhirServer is not one this client is configured to name (fhir_servers), so it is not queried"
    return DataSource(request, rt.templates, client, slots=rt.ehr_slots, why_not=why_not)
