"""FHIR Library resources for the DTR package: each policy's prepopulation library, and FHIRHelpers, which it includes.

The CQL (:mod:`cds.dtr.cql`) and its ELM are committed beside the policy (``policies/<id>/<Library>.cql`` and
``.elm.json``; FHIRHelpers' in ``cds/dtr/fhirhelpers/``), because the ELM comes from the reference translator, a
Node tool the service does not run. :func:`libraries` serves them as they are committed (read once, then cached);
``cds cql build`` regenerates and translates them, and ``cds cql check`` (:func:`stale`, also a test) fails when a
committed file no longer matches the policy and mapping data, so what is served is what the data says.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cds.dtr import cql, valuesets
from fhir_mappings.loader import Mappings
from policies.model import Policy

CANONICAL_BASE: str = valuesets.CANONICAL_BASE
FHIRHELPERS_URL = "http://hl7.org/fhir/Library/FHIRHelpers"  # the canonical HL7's FHIR-based IGs depend on
LIBRARY_TYPE = "http://terminology.hl7.org/CodeSystem/library-type"
HELPERS_DIR = Path(__file__).parent / "fhirhelpers"
HELPERS_CQL = HELPERS_DIR / f"{cql.FHIRHELPERS_NAME}-{cql.FHIRHELPERS_VERSION}.cql"
HELPERS_ELM = HELPERS_DIR / f"{cql.FHIRHELPERS_NAME}-{cql.FHIRHELPERS_VERSION}.elm.json"
ROOT = Path(__file__).resolve().parents[2]
TRANSLATE = ROOT / "js" / "translate.mjs"
_VERSION_LINE = re.compile(r"^library (\w+) version '([^']*)'$", re.MULTILINE)


class TranslationError(RuntimeError):
    """The reference translator could not run, or reported errors in a library."""


def cql_path(policy: Policy) -> Path:
    return Path(policy.path) / f"{cql.library_name(policy)}.cql"


def elm_path(policy: Policy) -> Path:
    return Path(policy.path) / f"{cql.library_name(policy)}.elm.json"


def _canonical(url: str, version: str) -> str:
    return f"{url}|{version}"


def library_url(policy: Policy) -> str:
    return f"{CANONICAL_BASE}/Library/{cql.library_name(policy)}"


def committed_version(policy: Policy) -> str:
    """The version the committed CQL declares (what is served, even if the data moved on since the last build)."""
    found = _VERSION_LINE.search(cql_path(policy).read_text())
    if found is None:
        raise TranslationError(f"{cql_path(policy)}: no 'library ... version' line")
    return found.group(2)


def library_canonical(policy: Policy, mappings: Mappings) -> str:
    """``url|version`` of the policy's library, for the Questionnaire's cqf-library extension."""
    return _canonical(library_url(policy), committed_version(policy))


_CACHE: dict[tuple[int, str, str], tuple[Mappings, list[dict[str, Any]]]] = {}


def libraries(policy: Policy, mappings: Mappings) -> list[dict[str, Any]]:
    """The Libraries the policy's form needs: its own first, then FHIRHelpers (every ``depends-on`` Library)."""
    key = (id(mappings), policy.id, policy.content_hash)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not mappings:
        hit = (mappings, [_policy_library(policy, mappings), _helpers_library()])
        _CACHE[key] = hit
    return copy.deepcopy(hit[1])


def _content(cql_text: str, elm_text: str) -> list[dict[str, str]]:
    elm = json.dumps(json.loads(elm_text), separators=(",", ":"))  # compact: the committed file is indented
    return [
        {"contentType": "text/cql", "data": base64.b64encode(cql_text.encode()).decode()},
        {"contentType": "application/elm+json", "data": base64.b64encode(elm.encode()).decode()},
    ]


def _policy_library(policy: Policy, mappings: Mappings) -> dict[str, Any]:
    name = cql.library_name(policy)
    related = [
        {
            "type": "depends-on",
            "display": f"Library {cql.FHIRHELPERS_NAME}",
            "resource": _canonical(FHIRHELPERS_URL, cql.FHIRHELPERS_VERSION),
        }
    ]
    related.extend(
        {"type": "depends-on", "display": f"ValueSet {vs.key}", "resource": vs.canonical}
        for vs in cql.value_set_specs(policy, mappings)
    )
    parameters: list[dict[str, Any]] = [
        {"name": cql.ORDER_PARAMETER, "use": "in", "min": 0, "max": "1", "type": "MedicationRequest"}
    ]
    parameters.extend(
        {"name": define, "use": "out", "min": 0, "max": "1", "type": type_}
        for define, type_ in cql.outputs(policy, mappings)
    )
    return {
        "resourceType": "Library",
        "id": name,
        "url": library_url(policy),
        "version": committed_version(policy),
        "name": name,
        "title": f"{policy.number} prepopulation ({policy.title})",
        "status": "active",
        "experimental": False,
        "type": {"coding": [{"system": LIBRARY_TYPE, "code": "logic-library"}]},
        "publisher": policy.publisher,
        "description": (
            f"Pre-populates the prior-authorization questions of {policy.publisher} {policy.number} "
            f"({policy.ref}) from the patient's record. Generated from the policy and its code mappings."
        ),
        "relatedArtifact": related,
        "parameter": parameters,
        "dataRequirement": _data_requirements(cql.data_requirements(policy, mappings)),
        "content": _content(cql_path(policy).read_text(), elm_path(policy).read_text()),
    }


def _data_requirements(reqs: Iterable[tuple[str, str | None, str | None]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for type_, path, valueset in reqs:
        req: dict[str, Any] = {"type": type_}
        if path and valueset:
            req["codeFilter"] = [{"path": path, "valueSet": valueset}]
        out.append(req)
    return out


def _helpers_library() -> dict[str, Any]:
    return {
        "resourceType": "Library",
        "id": f"{cql.FHIRHELPERS_NAME}-{cql.FHIRHELPERS_VERSION.replace('.', '-')}",
        "url": FHIRHELPERS_URL,
        "version": cql.FHIRHELPERS_VERSION,
        "name": cql.FHIRHELPERS_NAME,
        "title": "FHIRHelpers",
        "status": "active",
        "type": {"coding": [{"system": LIBRARY_TYPE, "code": "logic-library"}]},
        "publisher": "HL7 International - Clinical Decision Support Work Group",
        "description": (
            "HL7's FHIRHelpers for FHIR 4.0.1, unmodified (cqframework/clinical_quality_language, Apache-2.0): "
            "conversions between FHIR data types and CQL system types."
        ),
        "content": _content(HELPERS_CQL.read_text(), HELPERS_ELM.read_text()),
    }


# --- building and checking the committed artifacts (developer tools: they need Node and js/node_modules) ------------


def translate(texts: Mapping[str, str]) -> dict[str, Any]:
    """ELM JSON of each CQL text (key -> ELM), from the reference translator in one Node process.

    :raise TranslationError: Node or the translator is missing, or a library has errors (all are listed)."""
    node = shutil.which("node")
    if node is None or not (ROOT / "js" / "node_modules" / "@cqframework" / "cql").is_dir():
        raise TranslationError("the CQL translator is not installed: run scripts/node (Node 20 and npm)")
    request = json.dumps({"include": str(HELPERS_DIR), "libraries": dict(texts)})
    done = subprocess.run([node, str(TRANSLATE)], input=request, capture_output=True, text=True, check=False)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise TranslationError(f"the translator failed: {done.stderr.strip()[-2000:]}") from None
    errors = [f"{key}: {e}" for key, found in answer.get("errors", {}).items() for e in found]
    if errors or done.returncode:
        raise TranslationError("CQL errors:\n  " + "\n  ".join(errors or [done.stderr.strip()[-2000:]]))
    elm: dict[str, Any] = answer["elm"]
    return elm


def _elm_text(elm: Any) -> str:
    return json.dumps(elm, indent=1, ensure_ascii=False) + "\n"


def build(policies: Iterable[Policy], mappings: Mappings) -> list[Path]:
    """Regenerate every policy's CQL, translate it and FHIRHelpers, and write the artifacts. Returns what changed."""
    policies = list(policies)
    texts = {cql.library_name(p): cql.generate(p, mappings) for p in policies}
    elm = translate({**texts, cql.FHIRHELPERS_NAME: HELPERS_CQL.read_text()})
    wanted: dict[Path, str] = {HELPERS_ELM: _elm_text(elm[cql.FHIRHELPERS_NAME])}
    for p in policies:
        wanted[cql_path(p)] = texts[cql.library_name(p)]
        wanted[elm_path(p)] = _elm_text(elm[cql.library_name(p)])
    changed = []
    for path, text in wanted.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    for p in policies:
        for extra in _leftovers(p):
            extra.unlink()
            changed.append(extra)
    return changed


def _leftovers(policy: Policy) -> list[Path]:
    """Library files in the policy folder that are not its library's (a renamed policy leaves them)."""
    keep = {cql_path(policy).name, elm_path(policy).name}
    folder = Path(policy.path)
    return sorted(p for p in [*folder.glob("*.cql"), *folder.glob("*.elm.json")] if p.name not in keep)


def stale(policies: Iterable[Policy], mappings: Mappings, *, translator: bool = True) -> list[str]:
    """What is out of date: a committed CQL that the generator no longer writes, an ELM that the translator no longer
    gives for the committed CQL (``translator``: run it; else only the CQL is checked), a missing or left-over file.
    """
    policies = list(policies)
    problems: list[str] = []
    committed: dict[str, str] = {}
    for p in policies:
        path = cql_path(p)
        if not path.exists():
            problems.append(f"{path}: missing (run `cds cql build`)")
        elif path.read_text() != cql.generate(p, mappings):
            problems.append(f"{path}: stale, the policy or the mappings changed (run `cds cql build`)")
        else:
            committed[cql.library_name(p)] = path.read_text()
        problems.extend(f"{extra}: not this policy's library (run `cds cql build`)" for extra in _leftovers(p))
    if not translator:
        return problems
    elm = translate({**committed, cql.FHIRHELPERS_NAME: HELPERS_CQL.read_text()})
    targets = {cql.FHIRHELPERS_NAME: HELPERS_ELM, **{cql.library_name(p): elm_path(p) for p in policies}}
    for key, path in targets.items():
        if key not in elm:
            continue
        if not path.exists():
            problems.append(f"{path}: missing (run `cds cql build`)")
        elif json.loads(path.read_text()) != elm[key]:
            problems.append(f"{path}: stale, it is not the translation of the committed CQL (run `cds cql build`)")
    return problems
