"""The generated CQL prepopulation libraries (cds/dtr/cql.py): fresh, valid, shipped right, and in agreement.

Agreement: for every case of every policy, a FHIR record is synthesized from the case's facts (tests/casefhir.py);
the Python engine (fhir_mappings.extract.FactFinder) reads it, the committed ELM runs over the same resources in
cql-execution + cql-exec-fhir (js/run_elm.mjs, one Node process for all cases), and every define that stands for an
input must give what the Python engine extracts for it.

The Node tests skip only when js/node_modules is absent and ``CI`` is not set (scripts/node installs it); under CI
they run, and fail without Node.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from casefhir import synthesize

from cds.dtr import cql, library, valuesets
from fhir_mappings.extract import Fact, FactFinder, Range, age_range
from fhir_mappings.loader import Mappings, load_mappings
from policies.cases import load_case_file
from policies.loader import load_policies
from policies.model import Policy

ROOT = Path(__file__).resolve().parent.parent
RUN_ELM = ROOT / "js" / "run_elm.mjs"
_MAPPINGS = load_mappings()
_POLICIES = load_policies(_MAPPINGS)
POLICY_IDS = sorted(_POLICIES.policies)
NODE_MODULES = ROOT / "js" / "node_modules"
HAVE_NODE_MODULES = (NODE_MODULES / "cql-execution").is_dir() and (NODE_MODULES / "@cqframework" / "cql").is_dir()
needs_node = pytest.mark.skipif(
    not HAVE_NODE_MODULES and not os.environ.get("CI"),
    reason="js/node_modules is not installed (run scripts/node); under CI these tests run",
)


def _policy(pid: str) -> Policy:
    return _POLICIES.policies[pid]


# --- the generator and the shipped resources (no Node) ---------------------------------------------------------------


@pytest.mark.parametrize("pid", POLICY_IDS)
def test_committed_cql_is_what_the_generator_writes(pid: str) -> None:
    assert library.stale([_policy(pid)], _MAPPINGS, translator=False) == []


def test_library_names_are_unique_cql_identifiers() -> None:
    names = [cql.library_name(p) for p in _POLICIES.policies.values()]
    assert len(set(names)) == len(names)
    assert all(n.isidentifier() and n[0].isalpha() and n.endswith("Prepopulation") for n in names)
    assert cql.library_name(_policy("cigna-ip0356")) == "CignaIP0356Prepopulation"


def test_generation_is_deterministic() -> None:
    policy = _policy("ph109-gene-therapy")
    assert cql.generate(policy, _MAPPINGS) == cql.generate(policy, load_mappings())


@pytest.mark.parametrize("pid", POLICY_IDS)
def test_every_define_and_expression_names_a_define_of_the_library(pid: str) -> None:
    policy = _policy(pid)
    text = cql.generate(policy, _MAPPINGS)
    found = cql.defines(policy, _MAPPINGS)
    assert found, "a policy with questions about the record has defines"
    for input_name, define in found.items():
        assert f'\ndefine "{define}":' in text
        assert cql.expression(policy, _MAPPINGS, input_name) == f'"{cql.library_name(policy)}"."{define}"'
    assert cql.expression(policy, _MAPPINGS, "answer.fix_baseline") is None
    assert f"library {cql.library_name(policy)} version '{cql.version(policy, _MAPPINGS)}'" in text


def test_defines_follow_the_question_types() -> None:
    ip0356 = _policy("cigna-ip0356")
    found = cql.defines(ip0356, _MAPPINGS)
    assert found["dx.hemophilia_a"] == "dx.hemophilia_a"  # boolean item
    assert found["lab.fvii_activity"] == "lab.fvii_activity below range"  # asked only as "below the range?"
    assert found["lab.fviii_inhibitor_titer"] == "lab.fviii_inhibitor_titer"  # quantity item
    assert found["age_years"] == "age_years"  # the date of birth
    assert found["obs.body_weight"] == "obs.body_weight"  # the dose rule's weight question
    assert "answer.fix_baseline" not in cql.defines(_policy("ph109-gene-therapy"), _MAPPINGS)
    assert "drug.novoseven_rt" not in found  # the order itself, not a question
    ph109 = cql.uses(_policy("ph109-gene-therapy"), _MAPPINGS)
    assert ph109["lab.hbsag"].window == 90 and ph109["lab.fix_activity"].window is None


def test_library_version_follows_policy_version_and_content() -> None:
    policy = _policy("cigna-ip0356")
    version = cql.version(policy, _MAPPINGS)
    assert version.startswith(f"{policy.version}-") and len(version) == len(policy.version) + 9
    assert library.committed_version(policy) == version


@pytest.mark.parametrize("pid", POLICY_IDS)
def test_libraries_ship_cql_and_elm_with_their_dependencies(pid: str) -> None:
    policy = _policy(pid)
    own, helpers = library.libraries(policy, _MAPPINGS)
    assert own["url"] == f"{library.CANONICAL_BASE}/Library/{cql.library_name(policy)}"
    assert library.library_canonical(policy, _MAPPINGS) == f"{own['url']}|{own['version']}"
    assert own["name"] == cql.library_name(policy) and own["status"] == "active"
    assert own["type"]["coding"][0]["code"] == "logic-library" == helpers["type"]["coding"][0]["code"]
    for lib, cql_file, elm_file in (
        (own, library.cql_path(policy), library.elm_path(policy)),
        (helpers, library.HELPERS_CQL, library.HELPERS_ELM),
    ):
        types = [c["contentType"] for c in lib["content"]]
        assert types == ["text/cql", "application/elm+json"]
        assert base64.b64decode(lib["content"][0]["data"]).decode() == cql_file.read_text()
        assert json.loads(base64.b64decode(lib["content"][1]["data"])) == json.loads(elm_file.read_text())
    assert (helpers["url"], helpers["version"], helpers["name"]) == (library.FHIRHELPERS_URL, "4.0.1", "FHIRHelpers")
    depends = [r["resource"] for r in own["relatedArtifact"] if r["type"] == "depends-on"]
    assert depends[0] == f"{helpers['url']}|{helpers['version']}"
    shipped_sets = {f"{vs['url']}|{vs['version']}" for vs in valuesets.value_sets(policy, _MAPPINGS)}
    assert set(depends[1:]) == shipped_sets
    filters = {f["valueSet"] for req in own["dataRequirement"] for f in req.get("codeFilter", ())}
    assert filters <= shipped_sets and {req["type"] for req in own["dataRequirement"]} >= {"Patient"}
    assert library.libraries(policy, _MAPPINGS) == [own, helpers]  # cached, and a copy each time
    assert library.libraries(policy, _MAPPINGS)[0] is not own


def test_value_sets_carry_codes_of_codes_csv_and_small_ones_are_expanded() -> None:
    policy = _policy("cigna-ip0356")
    sets = {vs["id"]: vs for vs in valuesets.value_sets(policy, _MAPPINGS)}
    partial, proof = sets["dx.factor-vii-deficiency.partial"], sets["dx.hemophilia-a"]
    assert [c["code"] for c in partial["expansion"]["contains"]] == ["D68.2"]
    assert [c["code"] for c in proof["compose"]["include"][0]["concept"]] == ["D66"]
    for vs in sets.values():
        assert vs["url"] == f"{library.CANONICAL_BASE}/ValueSet/{vs['id']}" and vs["version"]
        listed = sum(len(inc["concept"]) for inc in vs["compose"]["include"])
        assert ("expansion" in vs) == (listed < valuesets.EXPANSION_LIMIT)
    found = valuesets.find(_MAPPINGS, proof["url"], proof["version"])
    assert found is not None and found["compose"] == proof["compose"]
    assert valuesets.find(_MAPPINGS, proof["url"], None) is not None
    assert valuesets.find(_MAPPINGS, proof["url"], "0") is None
    every = valuesets.all_value_sets(_MAPPINGS, _POLICIES.policies.values())
    assert len({(v["url"], v["version"]) for v in every}) == len(every)
    families = next(v for v in every if v["id"] == "dx.advanced-liver-disease.partial")
    assert "K72.1*" in families["description"]  # matched by prefix in the CQL, named in the ValueSet


# --- the translator (Node) ---------------------------------------------------------------------------------------


@needs_node
def test_committed_elm_is_the_translation_of_the_committed_cql() -> None:
    # one Node process translates every library and FHIRHelpers; any translator error fails the check
    assert library.stale(_POLICIES.policies.values(), _MAPPINGS) == []


@needs_node
def test_the_translate_script_fails_on_cql_errors() -> None:
    bad = "library Broken version '1'\nusing FHIR version '4.0.1'\ncontext Patient\ndefine \"X\": NoSuchThing\n"
    with pytest.raises(library.TranslationError, match="NoSuchThing"):
        library.translate({"Broken": bad})


# --- agreement with the Python extraction (Node) -------------------------------------------------------------------


def _cases() -> Iterator[tuple[Policy, dict[str, Any], dict[str, Any]]]:
    for pid in POLICY_IDS:
        policy = _policy(pid)
        defaults, cases = load_case_file(Path(policy.path))
        for case in cases:
            yield policy, case, defaults


def _value_sets() -> dict[str, dict[str, list[dict[str, str]]]]:
    out: dict[str, dict[str, list[dict[str, str]]]] = {}
    for policy in _POLICIES.policies.values():
        for vs in cql.value_set_specs(policy, _MAPPINGS):
            out.setdefault(vs.url, {})[vs.version] = [{"system": s, "code": c} for s, c, _ in vs.codes]
    return out


def _run_elm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    libraries = {cql.library_name(p): json.loads(library.elm_path(p).read_text()) for p in _POLICIES.policies.values()}
    libraries[cql.FHIRHELPERS_NAME] = json.loads(library.HELPERS_ELM.read_text())
    request = json.dumps({"libraries": libraries, "valuesets": _value_sets(), "runs": runs})
    node = shutil.which("node") or "node"
    done = subprocess.run([node, str(RUN_ELM)], input=request, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


class Agreement:
    """Every case's record through both engines: the Python facts and the CQL results, by run id."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[Policy, str, FactFinder, date]] = {}
        runs = []
        for i, (policy, case, defaults) in enumerate(_cases()):
            uses = cql.uses(policy, _MAPPINGS)
            record = synthesize(policy, _MAPPINGS, case, defaults, list(uses))
            run_id = str(i)
            self.records[run_id] = (policy, str(case["note"]), FactFinder(_MAPPINGS, record.data), record.data.today)
            runs.append(
                {
                    "id": run_id,
                    "library": cql.library_name(policy),
                    "bundle": record.bundle,
                    "now": f"{record.data.today.isoformat()}T12:00:00.000Z",
                    "parameters": {cql.ORDER_PARAMETER: record.order},
                }
            )
        answer = _run_elm(runs)
        self.errors: dict[str, str] = answer["errors"]
        self.results: dict[str, dict[str, Any]] = answer["results"]


@pytest.fixture(scope="module")
def agreement() -> Agreement:
    return Agreement()


def _stale(fact: Fact, window: int | None, today: date) -> bool:
    return bool(window and fact.observed is not None and (today - fact.observed).days > window)


def _exact(value: Any) -> float | None:
    return value.lo if isinstance(value, Range) and value.lo is not None and value.lo == value.hi else None


def expected(policy: Policy, mappings: Mappings, finder: FactFinder, today: date) -> dict[str, tuple[str, Any]]:
    """define -> (comparison kind, what the Python engine says the define must give)."""
    out: dict[str, tuple[str, Any]] = {}
    for name, use in cql.uses(policy, mappings).items():
        spec = mappings.inputs[name]
        fact = finder.get(name)
        if spec.kind in cql.BOOLEAN_KINDS:
            suggested = True if fact.value is None and fact.partial is True else None
            out[f"{name} record"] = ("bool", fact.value)
            out[f"{name} suggested"] = ("bool", suggested)
            out[name] = ("bool", fact.value if fact.value is not None else suggested)
        elif spec.kind in ("lab", "lab_code"):
            stale = _stale(fact, use.window, today)
            out[f"{name} date"] = ("text", fact.observed.isoformat() if fact.observed else None)
            if spec.kind == "lab":
                out[name] = ("quantity", None if stale else _exact(fact.value))
                if "below_range" in use.ops:
                    out[f"{name} below range"] = ("bool", None if stale else fact.below_range)
            else:
                out[name] = ("code", None if stale else fact.value)
        elif spec.kind == "age":
            out[name] = ("age", fact)
    return out


def _same(kind: str, want: Any, got: Any, unit: str | None, today: date) -> bool:
    if kind == "quantity":
        if want is None or got is None:
            return want is None and got is None
        return bool(got.get("unit") == unit and math.isclose(float(got["value"]), want, rel_tol=1e-6, abs_tol=1e-9))
    if kind == "code":
        return bool((got or {}).get("code") == want)
    if kind == "age":
        fact: Fact = want
        if got is None:
            return fact.value is None
        return bool(fact.value == age_range(str(got), today) and fact.partial in (None, got))
    return bool(got == want and type(got) is type(want))


def _mismatches(agreement: Agreement, pid: str) -> tuple[list[str], int]:
    problems: list[str] = []
    settled = 0
    for run_id, (policy, note, finder, today) in agreement.records.items():
        if policy.id != pid:
            continue
        if run_id in agreement.errors:
            problems.append(f"{pid}/{note}: the ELM failed: {agreement.errors[run_id][:500]}")
            continue
        results = agreement.results[run_id]
        for define, (kind, want) in expected(policy, _MAPPINGS, finder, today).items():
            if define not in results:
                if kind == "bool" and want is None and define.endswith(" suggested"):
                    continue  # inputs that nothing can merely suggest have no "suggested" define
                problems.append(f"{pid}/{note}: {define}: python={want!r} cql=<no such define>")
                continue
            got = results[define]
            spec = _MAPPINGS.inputs[define.split(" ")[0]]
            if not _same(kind, want, got, spec.unit, today):
                shown = want.value if isinstance(want, Fact) else want
                problems.append(f"{pid}/{note}: {define}: python={shown!r} cql={got!r}")
            elif got is not None:
                settled += 1
    return problems, settled


@needs_node
@pytest.mark.parametrize("pid", POLICY_IDS)
def test_cql_agrees_with_the_python_extraction_on_every_case(agreement: Agreement, pid: str) -> None:
    problems, settled = _mismatches(agreement, pid)
    assert not problems, f"{len(problems)} disagreement(s):\n" + "\n".join(problems[:60])
    assert settled >= 20, f"only {settled} non-null values compared for {pid}: the records are too thin to test"


@needs_node
def test_every_item_define_gives_a_value_in_some_case(agreement: Agreement) -> None:
    """The synthesized records exercise every define a question reads (else agreement would prove little)."""
    seen: set[tuple[str, str]] = set()
    for run_id, (policy, _, _, _) in agreement.records.items():
        for define, value in agreement.results.get(run_id, {}).items():
            if value is not None:
                seen.add((policy.id, define))
    missing = [
        f"{pid}: {define}"
        for pid in POLICY_IDS
        for define in cql.defines(_policy(pid), _MAPPINGS).values()
        if (pid, define) not in seen
    ]
    assert not missing, f"never given a value by any case: {missing}"
