"""The `cds` command: policy check, evaluate, token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from cds.cli import main

ROOT = Path(__file__).resolve().parent.parent
REQUEST = ROOT / "fixtures" / "requests" / "order-sign-acquired-hemophilia.json"


def test_policy_check_passes_on_the_shipped_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_policy_check_reports_a_broken_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    folder = tmp_path / "cigna-ip0356"
    shutil.copytree(ROOT / "policies" / "cigna-ip0356", folder)
    text = (folder / "cases.yaml").read_text().replace("decision: dose-review", "decision: approved", 1)
    (folder / "cases.yaml").write_text(text)
    assert main(["policy", "check", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "cases.yaml" in out and "decision is dose-review, wanted approved" in out


def test_evaluate_prints_the_determination_and_its_explanation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(REQUEST), "--today", "2026-11-23"]) == 0
    out = capsys.readouterr().out
    assert "pa-needed: satisfied" in out and "cigna-ip0356|2" in out
    assert "IP0356-3A" in out and "Patient/pat-1" in out


def test_evaluate_reports_a_client_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"hook": "order-sign", "hookInstance": "x", "context": {}}')
    assert main(["evaluate", str(bad)]) == 0
    assert "HTTP 400" in capsys.readouterr().out


def test_token_mints_a_verifiable_demo_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CDS_BASE_URL", "https://payer.example")
    assert main(["token", "order-sign"]) == 0
    token = capsys.readouterr().out.strip()
    from cds.demo import demo_client

    key = jwt.PyJWK(demo_client(tmp_path).jwks["keys"][0])  # type: ignore[index]
    claims = jwt.decode(token, key.key, algorithms=["ES384"], audience="https://payer.example/cds-services/order-sign")
    assert claims["iss"] == "urn:cds:demo-client" and len(claims["jti"]) == 64


def test_the_console_script_is_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "cds.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("serve", "token", "policy", "evaluate"):
        assert command in out.stdout


def test_token_follows_the_port_the_service_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path))
    for name in ("CDS_CONFIG", "CDS_BASE_URL", "CDS_HOST", "CDS_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["token", "order-sign", "--port", "9001"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["aud"] == "http://127.0.0.1:9001/cds-services/order-sign"
    assert main(["token", "--base-url", "http://localhost:9002/"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["aud"] == "http://localhost:9002/cds-services"
