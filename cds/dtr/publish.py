"""Publishing a form: the Questionnaire for a determination's open questions, with the CQL that prepopulates it,
stored so that its canonical resolves (``GET /fhir/Questionnaire/{id}``) and packages can carry it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cds.dtr import cql, forms, library
from cds.runtime import Runtime
from fhir_mappings.loader import Mappings
from policies.model import Policy, Product
from policies.questions import Question

_CACHE: dict[tuple[str, int], tuple[str | None, Callable[[str], str | None]]] = {}


def _prepopulation(policy: Policy, mappings: Mappings) -> tuple[str | None, Callable[[str], str | None]]:
    """The policy library's canonical and the CQL expression for each input it defines (computed once per policy
    version and mappings: they are fixed for the life of the process)."""
    key = (policy.ref, id(mappings))
    if key not in _CACHE:
        _CACHE[key] = _compute(policy, mappings)
    return _CACHE[key]


def _compute(policy: Policy, mappings: Mappings) -> tuple[str | None, Callable[[str], str | None]]:
    defines = {name: cql.expression(policy, mappings, name) for name in cql.defines(policy, mappings)}
    return library.library_canonical(policy, mappings), defines.get


def publish(rt: Runtime, policy: Policy, product: Product, questions: Sequence[Question]) -> dict[str, Any]:
    canonical, expression = _prepopulation(policy, rt.mappings)
    questionnaire = forms.build(policy, product, questions, rt.base_url, library=canonical, expression=expression)
    rt.store.save_questionnaire(questionnaire["id"], policy.ref, questionnaire)
    return questionnaire
