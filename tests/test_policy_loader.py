"""Bad policy data fails at load time, naming the file and the place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cds.errors import PolicyLoadError
from fhir_mappings.loader import Mappings
from policies.loader import HERE, load_policies, load_policy

SOURCE = HERE / "cigna-ip0356"


def edited(tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    folder = tmp_path / "cigna-ip0356"
    shutil.copytree(SOURCE, folder)
    raw = yaml.safe_load((folder / "policy.yaml").read_text())
    change(raw)
    (folder / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def criterion(raw: dict, index: int = 2, crit: int = 0) -> dict:  # type: ignore[type-arg]
    return raw["products"][0]["indications"][index]["criteria"][crit]


@pytest.mark.parametrize(
    "change, place, problem",
    [
        (lambda r: criterion(r).update(op="gte"), "indications[2].criteria[0].op", "unknown operator 'gte'"),
        (lambda r: criterion(r).update(input="lab.nothing"), "criteria[0].input", "has no mapping"),
        (lambda r: criterion(r).update(op="present"), "criteria[0].op", "needs a yes/no input"),
        (lambda r: criterion(r).update(value="eighteen"), "criteria[0].value", "numeric value"),
        (lambda r: criterion(r, 3, 0)["any"][0].update(unit="kg"), "unit", "cannot convert"),
        (lambda r: criterion(r).update(id="IP0356-1A"), "criteria[0]", "used twice"),
        (lambda r: criterion(r).update(id="X-3A"), "criteria[0]", "must start with 'IP0356-'"),
        (lambda r: criterion(r).update(extra=1), "criteria[0]", "unknown keys"),
        (lambda r: criterion(r).update(within_days=30), "within_days", "lab inputs only"),
        (
            lambda r: r["products"][0]["indications"][0]["dosing"][0].update(kind="per_year"),
            "dosing[0]",
            "unknown dose kind",
        ),
        (lambda r: r["products"][0]["indications"][0]["dosing"][0].update(unit="mg"), "dosing[0]", "mass-per-kg"),
        (lambda r: r["products"][0].update(drugs=["dx.hemophilia_a"]), "drugs[0]", "not a drug input"),
        (lambda r: r["products"][0].pop("authorization"), "authorization", "is required"),
        (lambda r: r.pop("version"), "version", "is required"),
        (lambda r: r.update(surprise=True), "top level", "unknown keys"),
    ],
)
def test_bad_policy_data(tmp_path: Path, mappings: Mappings, change, place: str, problem: str) -> None:  # type: ignore[no-untyped-def]
    folder = edited(tmp_path, change)
    with pytest.raises(PolicyLoadError) as err:
        load_policy(folder, mappings)
    message = str(err.value)
    assert message.startswith(str(folder / "policy.yaml")) and place in message and problem in message


def test_a_policy_without_cases_does_not_load(tmp_path: Path, mappings: Mappings) -> None:
    folder = edited(tmp_path, lambda r: None)
    (folder / "cases.yaml").unlink()
    with pytest.raises(PolicyLoadError, match="cases.yaml: file: every policy needs a cases.yaml"):
        load_policy(folder, mappings)


def test_a_policy_with_empty_cases_does_not_load(tmp_path: Path, mappings: Mappings) -> None:
    folder = edited(tmp_path, lambda r: None)
    (folder / "cases.yaml").write_text("cases: []\n")
    with pytest.raises(PolicyLoadError, match="non-empty"):
        load_policy(folder, mappings)


def test_the_folder_name_is_the_policy_id(tmp_path: Path, mappings: Mappings) -> None:
    edited(tmp_path, lambda r: r.update(id="cigna-other"))
    with pytest.raises(PolicyLoadError, match="must equal the folder name"):
        load_policies(mappings, tmp_path)


def test_contradictory_comparisons_are_reported_unreachable(tmp_path: Path, mappings: Mappings) -> None:
    from policies.check import unreachable

    def change(raw: dict) -> None:  # type: ignore[type-arg]
        raw["products"][0]["indications"][2]["criteria"][0] = {
            "id": "IP0356-3A",
            "all": [{"op": ">=", "input": "age_years", "value": 18}, {"op": "<", "input": "age_years", "value": 12}],
        }

    problems = unreachable(load_policy(edited(tmp_path, change), mappings))
    assert len(problems) == 1 and "IP0356-3A: no value of age_years meets >= 18 years and < 12 years" in problems[0]


def test_an_always_true_alternative_is_reported(tmp_path: Path, mappings: Mappings) -> None:
    from policies.check import unreachable

    def change(raw: dict) -> None:  # type: ignore[type-arg]
        raw["products"][0]["indications"][2]["criteria"][0] = {
            "id": "IP0356-3A",
            "any": [{"op": ">=", "input": "age_years", "value": 18}, {"op": "<", "input": "age_years", "value": 18}],
        }

    assert "every value of age_years" in unreachable(load_policy(edited(tmp_path, change), mappings))[0]


def test_a_not_covered_use_that_needs_an_indications_diagnosis_is_reported(tmp_path: Path, mappings: Mappings) -> None:
    from policies.check import unreachable

    def change(raw: dict) -> None:  # type: ignore[type-arg]
        raw["products"][0]["not_covered"][0]["when"] = {"op": "present", "input": "dx.hemophilia_a"}

    assert "IP0356-NC.1 needs dx.hemophilia_a" in unreachable(load_policy(edited(tmp_path, change), mappings))[0]


def test_the_shipped_policies_have_nothing_unreachable(policies: object) -> None:
    from policies.check import unreachable

    assert [p for policy in policies.policies.values() for p in unreachable(policy)] == []  # type: ignore[attr-defined]


def test_an_indication_diagnosis_must_be_marked_a_disorder(tmp_path: Path, mappings: Mappings) -> None:
    """The order's reason is judged by inputs.yaml `disorder: true` (mapping data, the same whatever policies are
    loaded); a policy whose indication tests an unmarked diagnosis input does not load."""
    shutil.copytree(HERE / "cigna-ip0356", tmp_path / "cigna-ip0356")
    path = tmp_path / "cigna-ip0356" / "policy.yaml"
    path.write_text(
        path.read_text().replace(
            "diagnosis: {op: present, input: dx.acquired_hemophilia}",
            "diagnosis: {op: present, input: dx.gi_or_variceal_bleeding}",
        )
    )
    with pytest.raises(PolicyLoadError, match="disorder: true"):
        load_policies(mappings, tmp_path)
