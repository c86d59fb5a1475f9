"""Reads from the EHR's FHIR server with the hook's ``fhirAuthorization`` token, within one deadline.

No retries: a slow or failing server degrades the answer (the caller marks the data unavailable); it never turns
into an error for the client. Every read of one hook call shares one deadline (``fhir_total_timeout``), enforced
while bytes arrive (:mod:`cds.upstream`), and each response is capped in size. The token goes only to the server
the call named: a ``next`` link elsewhere (another host, port, scheme, or a path outside the base) is not followed.
The access token is never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin

from cds import jsonsafe
from cds.errors import MalformedJson
from cds.upstream import Reader, UpstreamError, same_server

log = logging.getLogger(__name__)


class FhirReadError(Exception):
    """The read failed: unreachable, timed out, too large, not authorised, not JSON, or not what was asked for."""


class FhirClient:
    def __init__(
        self,
        base: str,
        token: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        budget_seconds: float,
        max_bytes: int,
        max_pages: int = 3,
    ) -> None:
        self.base = base.rstrip("/")
        self.max_pages = max_pages
        self.reader = Reader(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            budget_seconds=budget_seconds,
            max_bytes=max_bytes,
            headers={"Accept": "application/fhir+json, application/json", "Authorization": f"Bearer {token}"},
        )

    def get(self, relative: str) -> Any:
        url = relative if relative.startswith(("http://", "https://")) else urljoin(self.base + "/", relative)
        if not same_server(self.base, url):
            raise FhirReadError("refusing to follow a link away from the FHIR server")
        try:
            answer = self.reader.get(url)
        except UpstreamError as exc:
            raise FhirReadError(f"the EHR FHIR server: {exc}") from None
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise FhirReadError(f"the EHR FHIR server answered HTTP {answer.status}")
        try:
            body = jsonsafe.loads(answer.body, source="The EHR's answer")
        except MalformedJson:
            raise FhirReadError("the EHR FHIR server answered with something other than usable JSON") from None
        if not isinstance(body, dict) or "resourceType" not in body:
            raise FhirReadError("the EHR FHIR server answered with something other than a FHIR resource")
        if body.get("resourceType") == "OperationOutcome":
            raise FhirReadError("the EHR FHIR server answered with an OperationOutcome")
        return body

    def search(self, relative: str) -> list[Mapping[str, Any]]:
        """All resources of a search (following ``next`` links up to ``max_pages``), or of a read."""
        body = self.get(relative)
        if body is None:
            return []
        if body.get("resourceType") != "Bundle":
            return [body]
        out = list(bundle_resources(body))
        pages = 1
        while pages < self.max_pages:
            links = body.get("link") if isinstance(body.get("link"), list) else ()
            nxt = next(
                (k.get("url") for k in links if isinstance(k, Mapping) and k.get("relation") == "next"),
                None,
            )
            if not isinstance(nxt, str) or not nxt:
                break
            body = self.get(nxt)
            if not body or body.get("resourceType") != "Bundle":
                break
            out.extend(bundle_resources(body))
            pages += 1
        return out

    def close(self) -> None:
        self.reader.close()


def bundle_resources(bundle: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else ():
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(resource, Mapping) or resource.get("resourceType") == "OperationOutcome":
            continue
        search = entry.get("search")
        if isinstance(search, Mapping) and search.get("mode") == "outcome":
            continue
        out.append(resource)
    return out
