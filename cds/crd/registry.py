"""The services this deployment offers. Discovery and routing are both built from :data:`SERVICES`, so a hook
module listed here is always discoverable and always answers, and nothing else does."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cds import constants

if TYPE_CHECKING:
    from cds.crd.assess import Assessment
    from cds.crd.hookrequest import HookRequest
    from cds.runtime import Runtime


@dataclass(frozen=True)
class HookOutcome:
    body: dict[str, Any]
    assessment: Assessment | None = None


@dataclass(frozen=True)
class Option:
    code: str
    type: str  # boolean | integer
    name: str
    description: str
    default: bool | int

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "type": self.type,
            "name": self.name,
            "description": self.description,
            "default": self.default,
        }


ORDER_OPTIONS: tuple[Option, ...] = (
    Option(
        constants.OPTION_COVERAGE_INFO,
        "boolean",
        "Coverage information",
        "Coverage information on each draft order (system action) and the cards that explain it.",
        True,
    ),
    Option(
        constants.OPTION_GUIDELINE,
        "boolean",
        "Policy reference",
        "A card linking the payer policy each determination rests on.",
        True,
    ),
    Option(
        constants.OPTION_ALTERNATIVES,
        "boolean",
        "Covered alternatives",
        "Cards proposing a covered drug, or the dose at the policy limit.",
        True,
    ),
    Option(
        constants.OPTION_FORM_COMPLETION,
        "boolean",
        "Form completion card",
        "The documentation Questionnaire inline as a Task (for clients without DTR).",
        False,
    ),
    Option(
        constants.OPTION_UNSOLICITED,
        "boolean",
        "Unsolicited determinations",
        "Issue a prior authorization number when every criterion is met (false for what-if calls).",
        True,
    ),
    Option(
        constants.OPTION_MAX_CARDS,
        "integer",
        "Maximum cards",
        "The most cards returned; the most important are kept.",
        10,
    ),
)


@dataclass(frozen=True)
class ServiceDefinition:
    id: str
    hook: str
    title: str
    description: str
    prefetch: Mapping[str, str]
    handle: Callable[[Runtime, HookRequest], HookOutcome]
    options: tuple[Option, ...] = ORDER_OPTIONS

    def discovery(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": dict(self.prefetch),
            "extension": {
                "davinci-crd.version": list(constants.CRD_VERSIONS),
                "davinci-crd.configuration-options": [o.as_json() for o in self.options],
            },
        }

    def option_defaults(self) -> dict[str, Any]:
        return {o.code: o.default for o in self.options}
