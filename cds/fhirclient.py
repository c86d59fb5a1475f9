"""Reads from the EHR's FHIR server with the hook's ``fhirAuthorization`` token, within a time budget.

No retries: a slow or failing server degrades the answer (the caller marks the data unavailable); it never turns
into an error for the client. The access token is never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import requests

log = logging.getLogger(__name__)


class FhirReadError(Exception):
    """The read failed: unreachable, timed out, not authorised, not JSON, or not what was asked for."""


@dataclass
class FhirClient:
    base: str
    token: str
    connect_timeout: float
    read_timeout: float
    max_pages: int = 3

    def __post_init__(self) -> None:
        self.session = requests.Session()
        self.session.headers.update(
            {"Accept": "application/fhir+json, application/json", "Authorization": f"Bearer {self.token}"}
        )

    def get(self, relative: str) -> Any:
        url = relative if relative.startswith(("http://", "https://")) else urljoin(self.base + "/", relative)
        if not url.startswith(self.base):
            raise FhirReadError("refusing to follow a link away from the FHIR server")
        try:
            resp = self.session.get(url, timeout=(self.connect_timeout, self.read_timeout), allow_redirects=False)
        except requests.Timeout:
            raise FhirReadError("the EHR FHIR server did not answer in time") from None
        except requests.RequestException as exc:
            raise FhirReadError(f"the EHR FHIR server could not be reached ({exc.__class__.__name__})") from None
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise FhirReadError(f"the EHR FHIR server answered HTTP {resp.status_code}")
        try:
            body = resp.json()
        except ValueError:
            raise FhirReadError("the EHR FHIR server answered with something other than JSON") from None
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
            nxt = next((link.get("url") for link in body.get("link") or () if link.get("relation") == "next"), None)
            if not nxt:
                break
            body = self.get(nxt)
            if not body or body.get("resourceType") != "Bundle":
                break
            out.extend(bundle_resources(body))
            pages += 1
        return out

    def close(self) -> None:
        self.session.close()


def bundle_resources(bundle: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(resource, Mapping) or resource.get("resourceType") == "OperationOutcome":
            continue
        if (entry.get("search") or {}).get("mode") == "outcome":
            continue
        out.append(resource)
    return out
