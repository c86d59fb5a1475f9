"""Parse a CDS Hooks request body into a :class:`HookRequest`, rejecting what is not a valid request (400).

Only the shape is checked here (CDS Hooks 2.0 and the hook's context); the FHIR resources in ``draftOrders`` are
validated against R4 by :func:`validate_resource`. Unknown fields are ignored, as CRD requires (§hook-23, §found-33).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from cds import constants, jsonsafe
from cds.errors import InvalidRequest, InvalidResource, MalformedJson, UnsupportedVersion

MAX_HOOK_INSTANCE = 128  # CDS Hooks: a UUID (36); the store keeps up to 128
REFERENCE = re.compile(r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a FHIRPath identifier (used with fullmatch)
VALIDATOR_STEP = re.compile(r"[a-z][a-z-]*\[.*\]")  # pydantic's own step in a location: function-after[...]
ORDER_TYPES = frozenset(
    {
        "MedicationRequest",
        "ServiceRequest",
        "DeviceRequest",
        "NutritionOrder",
        "VisionPrescription",
        "CommunicationRequest",
    }
)


@dataclass(frozen=True)
class HookRequest:
    hook: str
    hook_instance: str
    context: Mapping[str, Any]
    prefetch: Mapping[str, Any] = field(default_factory=dict)
    fhir_server: str | None = None
    access_token: str | None = None
    configuration: Mapping[str, Any] = field(default_factory=dict)
    requested_version: str | None = None
    client: str | None = None  # the verified ``iss`` of the caller; None when authentication is off

    @property
    def can_query(self) -> bool:
        return bool(self.fhir_server and self.access_token)


def load_json(body: bytes) -> Any:
    """The request body as JSON, within :mod:`cds.jsonsafe`'s bounds on nesting and number size (400 otherwise)."""
    return jsonsafe.loads(body, source="The request body")


def parse(body: bytes, hook: str, client: str | None = None) -> HookRequest:
    raw = load_json(body)
    if not isinstance(raw, dict):
        raise MalformedJson("The request body must be a JSON object")
    sent_hook = raw.get("hook")
    if not isinstance(sent_hook, str) or not sent_hook:
        raise InvalidRequest("'hook' is required", expression="hook")
    if sent_hook != hook:
        raise InvalidRequest(f"This service answers the '{hook}' hook, not '{sent_hook}'", expression="hook")
    instance = raw.get("hookInstance")
    if not isinstance(instance, str) or not instance.strip():
        raise InvalidRequest("'hookInstance' is required", expression="hookInstance")
    if len(instance) > MAX_HOOK_INSTANCE or not instance.isprintable():
        raise InvalidRequest(
            f"'hookInstance' is a UUID: at most {MAX_HOOK_INSTANCE} printable characters", expression="hookInstance"
        )
    context = raw.get("context")
    if not isinstance(context, dict):
        raise InvalidRequest("'context' is required and must be an object", expression="context")
    server = raw.get("fhirServer")
    if server is not None and (not isinstance(server, str) or not server.startswith(("http://", "https://"))):
        raise InvalidRequest("'fhirServer' must be an http(s) URL", expression="fhirServer")
    auth = raw.get("fhirAuthorization")
    token = None
    if auth is not None:
        if not isinstance(auth, dict):
            raise InvalidRequest("'fhirAuthorization' must be an object", expression="fhirAuthorization")
        if server is None:
            raise InvalidRequest("'fhirAuthorization' requires 'fhirServer'", expression="fhirServer")
        token = auth.get("access_token")
        if not isinstance(token, str) or not token:
            raise InvalidRequest(
                "'fhirAuthorization.access_token' is required", expression="fhirAuthorization.access_token"
            )
        if str(auth.get("token_type", "Bearer")).lower() != "bearer":
            raise InvalidRequest(
                "'fhirAuthorization.token_type' must be Bearer", expression="fhirAuthorization.token_type"
            )
    prefetch = raw.get("prefetch") or {}
    if not isinstance(prefetch, dict):
        raise InvalidRequest("'prefetch' must be an object", expression="prefetch")
    extension = raw.get("extension") or {}
    if not isinstance(extension, dict):
        raise InvalidRequest("'extension' must be an object", expression="extension")
    configuration = extension.get("davinci-crd.configuration") or {}
    if not isinstance(configuration, dict):
        raise InvalidRequest(
            "'davinci-crd.configuration' must be an object", expression="extension.davinci-crd.configuration"
        )
    version = extension.get("davinci-crd.requestedVersion")
    if version is not None and version not in constants.CRD_VERSIONS:
        raise UnsupportedVersion(
            f"CRD version {version!r} is not supported; this service implements {', '.join(constants.CRD_VERSIONS)}",
            expression="extension.davinci-crd.requestedVersion",
        )
    return HookRequest(
        hook=sent_hook,
        hook_instance=instance,
        context=MappingProxyType(context),
        prefetch=MappingProxyType(prefetch),
        fhir_server=server.rstrip("/") if server else None,
        access_token=token,
        configuration=MappingProxyType(configuration),
        requested_version=version,
        client=client,
    )


def require_reference(context: Mapping[str, Any], name: str, types: tuple[str, ...]) -> str:
    value = context.get(name)
    if not isinstance(value, str) or not REFERENCE.fullmatch(value) or value.split("/", 1)[0] not in types:
        raise InvalidRequest(
            f"context.{name} must be a reference to one of {', '.join(types)}", expression=f"context.{name}"
        )
    return value


def require_id(context: Mapping[str, Any], name: str, required: bool = True) -> str | None:
    value = context.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise InvalidRequest(f"context.{name} must be a resource id", expression=f"context.{name}")
    return value


def order_bundle(context: Mapping[str, Any], name: str = "draftOrders") -> list[dict[str, Any]]:
    """The order resources of a context Bundle, each checked against FHIR R4 (MedicationRequests in full)."""
    bundle = context.get(name)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidRequest(f"context.{name} must be a FHIR Bundle", expression=f"context.{name}")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise InvalidRequest(f"context.{name} must hold at least one entry", expression=f"context.{name}.entry")
    orders = []
    for i, entry in enumerate(entries):
        where = f"context.{name}.entry[{i}].resource"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            raise InvalidResource("every entry must carry a resource", expression=where)
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or rtype not in ORDER_TYPES:  # a list or object is no type name (unhashable)
            raise InvalidResource(
                f"{repr(rtype)[:100]} is not an order resource type ({', '.join(sorted(ORDER_TYPES))})",
                expression=where,
            )
        if not isinstance(resource.get("id"), str) or not ID.fullmatch(resource["id"]):
            raise InvalidResource(f"the {rtype} needs an id (CRD §found-36)", expression=f"{where}.id")
        if rtype == "MedicationRequest":
            validate_resource(resource, where)
        orders.append(resource)
    return orders


def validate_resource(resource: Mapping[str, Any], where: str) -> None:
    """Check a resource against the FHIR R4 structure (fhir.resources, R4B models: identical for the resources
    this service reads). Raises :class:`InvalidResource` naming the first problem."""
    rtype = resource.get("resourceType")
    try:
        model = get_fhir_model_class(str(rtype))
    except (KeyError, ValueError):
        raise InvalidResource(f"{rtype!r} is not a FHIR resource type", expression=where) from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
        path = fhirpath(first.get("loc", ()))
        raise InvalidResource(
            f"{rtype}/{resource.get('id')} is not valid FHIR R4: {loc or 'resource'}: {first.get('msg', 'invalid')}",
            expression=f"{where}.{path}" if path else where,
        ) from None
    except KeyError as exc:  # fhir.resources looks a contained resource's type up without checking it first
        raise InvalidResource(
            f"{rtype}/{resource.get('id')} is not valid FHIR R4: it holds a resource of no FHIR resource type "
            f"({str(exc.args[0] if exc.args else '')[:100]!r})",
            expression=where,
        ) from None


def fhirpath(loc: Iterable[int | str]) -> str:
    """A pydantic error location as a FHIRPath element path: ``dosageInstruction[0].doseAndRate``. The models' own
    steps (``root``, ``__root__``, ``function-after[...]``) are left out; a name that is no identifier (an unknown
    key the client sent) is delimited with backticks, escaped and cut to 64 characters."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("root", "__root__") and not VALIDATOR_STEP.fullmatch(part):
            out += f".{_name(part)}" if out else _name(part)
    return out


def _name(part: str) -> str:
    if IDENTIFIER.fullmatch(part):
        return part
    escaped = (
        c if c.isprintable() and c not in "`\\" else "\\`" if c == "`" else json.dumps(c)[1:-1] for c in part[:64]
    )
    return f"`{''.join(escaped)}`"
