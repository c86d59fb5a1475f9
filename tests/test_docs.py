"""The documentation says what the code does: the README's first screen, CI, the fixtures' sources."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_screen_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()[:15]
    return [line.strip() for line in lines if line.startswith("    ") and line.strip()]


def test_the_first_screen_gives_exactly_two_commands() -> None:
    assert first_screen_commands() == ["./scripts/serve", "./scripts/test"]
    for command in first_screen_commands():
        assert (ROOT / command).stat().st_mode & 0o111, f"{command} must be executable"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec \./scripts/test\s*$", ci, re.M)


def test_the_test_command_installs_before_it_runs() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    assert "pip install" in script and ".[dev]" in script and "pytest" in script
    assert "ruff check" in script and "mypy" in script


def test_every_vendored_example_names_its_source() -> None:
    readme = (ROOT / "fixtures" / "README.md").read_text()
    for path in (ROOT / "fixtures" / "examples").rglob("*.json"):
        assert f"`{path.name}`" in readme, f"{path.name} is not described in fixtures/README.md"


def test_policies_readme_lists_every_policy_folder() -> None:
    readme = (ROOT / "policies" / "README.md").read_text()
    for folder in (ROOT / "policies").glob("*/policy.yaml"):
        assert f"`{folder.parent.name}`" in readme
