"""The ``cds`` command: serve, mint a demo token, check policies, evaluate a request offline."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from cds.errors import CdsError


def _config(overrides: dict[str, Any]) -> Any:
    from cds.config import load_config

    return load_config({k: v for k, v in overrides.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from cds import create_app
    from cds.server import serve

    overrides = {
        k: v for k, v in {"host": args.host, "port": args.port, "workers": args.workers}.items() if v is not None
    }
    cfg = _config(overrides)
    app = create_app(overrides)
    base = cfg.base_url
    store = cfg.database_url.split("://")[0]
    policies = ", ".join(sorted(app.extensions["cds"].policies.policies))
    logging.getLogger("cds.serve").info(
        "serving %s with %s workers x %s threads; store %s; policies %s",
        base,
        cfg["workers"],
        cfg["threads"],
        store,
        policies,
    )
    if cfg["demo_client"] or sys.stdout.isatty():  # a person is reading; a log collector gets the line above only
        print(
            f"cds: serving {base} (discovery: {base}/cds-services) with {cfg['workers']} workers; store {store}",
            flush=True,
        )
    if cfg["demo_client"] and cfg["auth_required"]:
        print(
            "cds: demo client on. Call a service with a demo token:\n"
            f"  TOKEN=$(cds token order-sign --base-url {base})\n"
            f"  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' "
            f"-d @fixtures/requests/order-sign-acquired-hemophilia.json {base}/cds-services/order-sign",
            flush=True,
        )
    serve(app, str(cfg["host"]), int(cfg["port"]), int(cfg["workers"]), int(cfg["threads"]))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from cds.demo import mint

    cfg = _config({"host": args.host, "port": args.port})
    if (args.host or args.port) and not args.base_url and cfg["base_url"]:
        print(
            f"cds: base_url is set ({cfg.base_url}), so the audience follows it, not --host/--port "
            "(as `cds serve` does)",
            file=sys.stderr,
        )
    base = (args.base_url or cfg.base_url).rstrip("/")
    if args.access:
        from cds.demo import access_token
        from cds.smart import SCOPES, TOKEN_PATH

        print(access_token(Path(cfg["data_dir"]), f"{base}{TOKEN_PATH}", args.scope or " ".join(SCOPES)))
        return 0
    audience = args.aud or (f"{base}/cds-services/{args.service}" if args.service else f"{base}/cds-services")
    print(mint(Path(cfg["data_dir"]), audience, args.lifetime))
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from policies.check import check_all

    problems = check_all(Path(args.dir) if args.dir else None)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("policies: all checks passed")
    return 0


def cmd_policy_lock(args: argparse.Namespace) -> int:
    from fhir_mappings.loader import load_mappings
    from policies.check import LOCK, write_lock
    from policies.loader import load_policies

    refused = write_lock(load_policies(load_mappings()))
    for line in refused:
        print(line, file=sys.stderr)
    if refused:
        return 1
    print(f"wrote {LOCK}")
    return 0


def cmd_cql(args: argparse.Namespace) -> int:
    """`cds cql build` regenerates the policies' CQL and translates it to ELM; `cds cql check` reports stale files."""
    from cds.dtr import library
    from fhir_mappings.loader import load_mappings
    from policies.loader import load_policies

    mappings = load_mappings()
    policies = list(load_policies(mappings).policies.values())
    try:
        if args.cql_command == "build":
            for path in library.build(policies, mappings):
                print(f"wrote {path}")
            print("cql: libraries are up to date")
            return 0
        problems = library.stale(policies, mappings)
    except library.TranslationError as exc:
        print(f"cds: {exc}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} stale artifact(s)", file=sys.stderr)
        return 1
    print("cql: generated CQL and ELM match the policies and mappings")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cds.crd.evaluate import evaluate_file

    print(evaluate_file(Path(args.request), as_json=args.json, today=args.today))
    return 0


def cmd_reviewer_hash(args: argparse.Namespace) -> int:
    from cds.pas.reviewers import hash_password

    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("cds: give the password on stdin (one line)", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the production server (gunicorn)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("token", help="mint a CDS Hooks JWT (or get a SMART access token) from the demo client")
    p.add_argument("service", nargs="?", help="service id (audience {base_url}/cds-services/{service})")
    p.add_argument("--aud", help="explicit audience URL")
    p.add_argument("--lifetime", type=int, default=300, help="seconds until exp (default 300)")
    p.add_argument(
        "--base-url", help="the service's base URL (default: the configuration's base_url, or http://{host}:{port})"
    )
    p.add_argument("--host", help="the address the service was started on (`cds serve --host`), when base_url is unset")
    p.add_argument("--port", type=int, help="the port the service was started on (`cds serve --port`), ditto")
    p.add_argument(
        "--access", action="store_true", help="get a SMART access token from {base_url}/auth/token of the service"
    )
    p.add_argument("--scope", help="with --access: space-separated scopes (default: every scope offered)")
    p.set_defaults(func=cmd_token)
    p = sub.add_parser("policy", help="policy author tools")
    psub = p.add_subparsers(dest="policy_command", required=True)
    c = psub.add_parser("check", help="lint every policy and run its cases")
    c.add_argument("--dir", help="policy directory (default: the shipped policies)")
    c.set_defaults(func=cmd_policy_check)
    c = psub.add_parser("lock", help="record each policy's version and content hash in versions.lock")
    c.set_defaults(func=cmd_policy_lock)
    p = sub.add_parser("cql", help="the policies' generated CQL prepopulation libraries and their ELM")
    csub = p.add_subparsers(dest="cql_command", required=True)
    csub.add_parser("build", help="regenerate the CQL and translate it to ELM (needs scripts/node)").set_defaults(
        func=cmd_cql
    )
    csub.add_parser("check", help="report CQL or ELM that no longer matches the data (exit 1)").set_defaults(
        func=cmd_cql
    )
    p = sub.add_parser("reviewer", help="clinical reviewer accounts (the reviewers setting)")
    rsub = p.add_subparsers(dest="reviewer_command", required=True)
    rsub.add_parser("hash", help="read a password from stdin, print its hash for password_hash").set_defaults(
        func=cmd_reviewer_hash
    )
    p = sub.add_parser("evaluate", help="print the determination for an offline hook request")
    p.add_argument("request", help="a CDS Hooks request JSON file with full prefetch")
    p.add_argument("--json", action="store_true", help="print the hook response as JSON too")
    p.add_argument("--today", help="evaluation date (YYYY-MM-DD; default today)")
    p.set_defaults(func=cmd_evaluate)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CdsError as exc:
        print(f"cds: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
