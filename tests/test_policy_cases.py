"""Every policy's table of cases (policies/*/cases.yaml), and what the tables must cover."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_mappings.loader import load_mappings
from policies.cases import coverage_gaps, load_case_file, run_case, run_policy_cases
from policies.check import lock_problems, unused_inputs
from policies.loader import PolicySet, load_policies, policy_folders

_MAPPINGS = load_mappings()
_POLICIES = load_policies(_MAPPINGS)
CASES = [
    (pid, case, defaults)
    for pid, policy in sorted(_POLICIES.policies.items())
    for defaults, cases in [load_case_file(__import__("pathlib").Path(policy.path))]
    for case in cases
]


@pytest.mark.parametrize("pid, case, defaults", CASES, ids=[f"{pid}: {case['note']}" for pid, case, _ in CASES])
def test_case(pid: str, case: dict[str, Any], defaults: dict[str, Any]) -> None:
    result = run_case(_POLICIES.policies[pid], _MAPPINGS, case, defaults)
    assert not result.problems, f"{_POLICIES.policies[pid].path}/cases.yaml: {case['note']}: {result.problems}"


@pytest.mark.parametrize("pid", sorted(_POLICIES.policies))
def test_cases_cover_every_criterion_both_ways(pid: str) -> None:
    policy = _POLICIES.policies[pid]
    gaps = coverage_gaps(policy, run_policy_cases(policy, _MAPPINGS))
    assert not gaps, f"{policy.path}/cases.yaml leaves untested: {gaps}"


def test_every_policy_folder_loads() -> None:
    assert {p.name for p in policy_folders()} == set(_POLICIES.policies)


def test_content_changes_need_a_version_change(policies: PolicySet) -> None:
    assert lock_problems(policies) == []


def test_a_changed_policy_under_the_same_version_is_caught(tmp_path: Any, policies: PolicySet) -> None:
    from dataclasses import replace
    from types import MappingProxyType

    policy = policies.policies["cigna-ip0356"]
    tampered = PolicySet(MappingProxyType({**policies.policies, policy.id: replace(policy, content_hash="0" * 64)}))
    problems = lock_problems(tampered)
    assert problems and f"content changed but the version ({policy.version}) did not" in problems[0]


def test_every_mapping_input_is_used_by_a_policy(policies: PolicySet) -> None:
    assert unused_inputs(_MAPPINGS, policies) == []
