"""Every acknowledged PAS submission survives ``kill -9`` of ``cds serve`` (issue 9 item 2), on SQLite and
PostgreSQL: submissions are acknowledged, the server's process group is SIGKILLed, a new server on the same data
(directory or database) finds every acknowledged one, and a resubmission returns the stored response."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from builders import med_order
from conftest import PG_URL, ClientKey
from sqlalchemy import create_engine, text
from test_e2e import Server
from test_pas import claim_response, pas_bundle

FHIR = {"Content-Type": "application/fhir+json"}


def pg_schema() -> tuple[str, str]:
    """A fresh PostgreSQL schema and a database_url whose connections use it."""
    schema = f"cds_pas_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    sep = "&" if "?" in PG_URL else "?"
    return schema, f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def drop_schema(schema: str) -> None:
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def kill_9(server: Server) -> None:
    """SIGKILL the server and its workers at once (no shutdown of any kind)."""
    pids = [server.proc.pid, *_children(server.proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(timeout=10)
    server.log.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_acknowledged_submissions_survive_kill_9(tmp_path: Path, client_key: ClientKey, backend: str) -> None:
    settings: dict[str, Any] = {"auth_required": False}
    schema = None
    if backend == "postgres":
        schema, settings["database_url"] = pg_schema()
    try:
        server = Server(tmp_path, client_key, **settings)
        acked: dict[str, dict[str, Any]] = {}
        try:
            for n in range(12):
                body = pas_bundle(med_order(status="active"), ident=f"TX-{n}", claim_id=f"claim-{n}")
                resp = requests.post(
                    f"{server.base}/fhir/Claim/$submit", data=json.dumps(body), headers=FHIR, timeout=10
                )
                assert resp.status_code == 200, resp.text
                acked[f"TX-{n}"] = resp.json()
        finally:
            kill_9(server)
        again = Server(tmp_path, client_key, **settings)
        try:
            for n, (ident, first) in enumerate(acked.items()):
                body = pas_bundle(med_order(status="active"), ident=ident, claim_id=f"claim-{n}")
                resp = requests.post(
                    f"{again.base}/fhir/Claim/$submit", data=json.dumps(body), headers=FHIR, timeout=10
                )
                assert resp.status_code == 200 and resp.json() == first  # the stored response, nothing new
            inquiry = pas_bundle(med_order(status="active"), ident="INQ", claim_id="inq")
            resp = requests.post(
                f"{again.base}/fhir/Claim/$inquire", data=json.dumps(inquiry), headers=FHIR, timeout=10
            )
            found = {claim_response(p["resource"])["id"] for p in resp.json()["parameter"]}
            assert found == {claim_response(b)["id"] for b in acked.values()}
        finally:
            again.stop()
    finally:
        if schema:
            drop_schema(schema)
