"""Everything a request needs that outlives it, built once per process and never changed afterwards."""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cds.config import Config
from cds.payers import PayerRegistry
from cds.store import Store
from fhir_mappings.loader import Mappings
from policies.loader import PolicySet

if TYPE_CHECKING:
    from cds.auth import Verifier


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A stored or given time in UTC; a naive one (SQLite hands them back) is taken to be UTC already."""
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def random_id() -> str:
    return str(uuid.uuid4())


def random_pa_id() -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "PA-" + "".join(secrets.choice(alphabet) for _ in range(10))


@dataclass(frozen=True)
class Runtime:
    config: Config
    mappings: Mappings
    policies: PolicySet
    payers: PayerRegistry
    store: Store
    verifier: Verifier | None
    templates: Mapping[str, str]
    clock: Callable[[], datetime] = utc_now
    new_id: Callable[[], str] = random_id
    new_pa_id: Callable[[], str] = random_pa_id
    # hook calls of this process that may wait on EHR reads at once (cds.crd.prefetch.DataSource); made before gunicorn
    # forks, so each worker has its own count
    ehr_slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        threads = int(self.config["threads"])
        slots = max(1, min(int(self.config["ehr_calls"]), threads - 1))
        object.__setattr__(self, "ehr_slots", threading.BoundedSemaphore(slots))

    @property
    def base_url(self) -> str:
        return self.config.base_url

    def fhir_servers(self, client: str | None) -> tuple[str, ...]:
        """The FHIR servers a call from ``client`` (a verified ``iss``; None when unauthenticated) may have queried."""
        if client is None:
            return tuple(self.config["fhir_servers"])
        trusted = self.verifier.clients.get(client) if self.verifier is not None else None
        return trusted.fhir_servers if trusted is not None else ()


def current() -> Runtime:
    """The runtime of the app serving the request in progress (every HTTP edge reads it from here)."""
    from flask import current_app

    rt: Runtime = current_app.extensions["cds"]
    return rt
