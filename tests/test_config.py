"""Configuration in layers: defaults < TOML named by CDS_CONFIG < CDS_* environment < create_app(config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cds.config import SETTINGS, load_config
from cds.errors import ConfigError


def test_defaults() -> None:
    cfg = load_config(environ={})
    assert cfg["port"] == 8080 and cfg["auth_required"] is True
    assert cfg.base_url == "http://127.0.0.1:8080"
    assert cfg.database_url.startswith("sqlite:///") and cfg.database_url.endswith("data/cds.sqlite3")
    assert [p["id"] for p in cfg["payers"]] == ["cigna", "bcbsks", "ny-pharmacy-109"]
    assert all(p["identifier_system"] == "urn:cds:payer-id" and p["identifier_value"] == p["id"] for p in cfg["payers"])


def test_layers_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "cds.toml"
    toml.write_text('port = 9000\nworkers = 5\nbase_url = "https://payer.example"\n')
    env = {"CDS_CONFIG": str(toml), "CDS_WORKERS": "7", "CDS_AUTH_REQUIRED": "false"}
    cfg = load_config({"workers": 9}, environ=env)
    assert cfg["port"] == 9000 and cfg["workers"] == 9 and cfg["auth_required"] is False
    assert cfg.base_url == "https://payer.example"
    assert load_config(environ=env)["workers"] == 7


def test_environment_values_are_parsed_as_json(tmp_path: Path) -> None:
    cfg = load_config(
        environ={"CDS_CLIENTS": '[{"iss": "a", "jwks_url": "https://a/jwks"}]', "CDS_FHIR_READ_TIMEOUT": "2"}
    )
    assert cfg["clients"][0]["iss"] == "a" and cfg["fhir_read_timeout"] == 2.0


@pytest.mark.parametrize(
    "environ, problem",
    [
        ({"CDS_NO_SUCH": "1"}, "unknown setting 'no_such'"),
        ({"CDS_PORT": "eighty"}, "setting 'port'"),
        ({"CDS_AUTH_REQUIRED": "maybe"}, "auth_required"),
        ({"CDS_CLIENTS": '[{"iss": "a"}]'}, "needs 'jwks_url' or 'jwks'"),
        ({"CDS_CONFIG": "/nonexistent/cds.toml"}, "/nonexistent/cds.toml: cannot read"),
    ],
)
def test_bad_settings_name_their_source(environ: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(environ=environ)


def test_invalid_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(environ={"CDS_CONFIG": str(bad)})


def test_a_payer_naming_an_unknown_policy_stops_startup(make_app: object) -> None:
    payers = [{"id": "x", "name": "X", "identifier_system": "s", "identifier_value": "v", "policies": ["nope"]}]
    with pytest.raises(ConfigError, match="names policy 'nope'"):
        make_app(payers=payers)  # type: ignore[operator]


def test_two_payers_with_one_identifier_are_refused() -> None:
    payers = [{"id": i, "name": i, "identifier_system": "s", "identifier_value": "v"} for i in ("a", "b")]
    with pytest.raises(ConfigError, match="used by two payers"):
        load_config({"payers": payers}, environ={})


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in readme]
    assert not missing, f"settings missing from README.md: {missing}"
