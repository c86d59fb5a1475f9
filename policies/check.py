"""``cds policy check``: everything a policy author needs to know before a policy ships.

- every policy loads (strict: unknown operators, inputs without a mapping, missing cases fail with file and place);
- no criterion is unreachable: comparisons on one input that no value can meet together (an ``all``) or that every
  value meets (an ``any``), and not-covered uses that need an indication's own diagnosis (so they can never apply);
- every case passes;
- the cases cover every criterion both ways, every dose rule both ways, every not-covered use, "any other use",
  the authorization duration, and the indication question;
- no mapping input goes unused;
- ``versions.lock`` records each policy's version and content hash: content that changed without a version change
  is an error (bump ``version`` and run ``cds policy lock``).
"""

from __future__ import annotations

from pathlib import Path

from cds.errors import LoadError
from fhir_mappings.loader import Mappings, load_mappings
from policies.cases import CaseError, coverage_gaps, run_policy_cases
from policies.loader import HERE, PolicySet, load_policies
from policies.model import COMPARISONS, Node, Policy
from policies.needs import inputs_of

LOCK = HERE / "versions.lock"


def read_lock(path: Path = LOCK) -> dict[str, tuple[str, str]]:
    entries: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return entries
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pid, version, digest = line.split()
        entries[pid] = (version, digest)
    return entries


def lock_problems(policies: PolicySet, path: Path = LOCK) -> list[str]:
    lock = read_lock(path)
    out = []
    for pid, policy in sorted(policies.policies.items()):
        entry = lock.get(pid)
        if entry is None:
            out.append(f"{policy.path}: not in {path.name}; run `cds policy lock`")
        elif entry[0] == policy.version and entry[1] != policy.content_hash:
            out.append(
                f"{policy.path}/policy.yaml: content changed but the version ({policy.version}) did not; "
                "bump 'version' and run `cds policy lock`"
            )
        elif entry[0] != policy.version:
            out.append(
                f"{policy.path}: version {policy.version} is not in {path.name} (it records {entry[0]}); "
                "run `cds policy lock`"
            )
    for pid in lock:
        if pid not in policies.policies:
            out.append(f"{path.name}: {pid} is locked but no such policy is loaded")
    return out


def write_lock(policies: PolicySet, path: Path = LOCK) -> list[str]:
    """Record versions and hashes; refuses (returns problems) when content changed under an unchanged version."""
    lock = read_lock(path)
    refused = [
        f"{p.path}/policy.yaml: content changed but the version ({p.version}) did not"
        for pid, p in policies.policies.items()
        if pid in lock and lock[pid][0] == p.version and lock[pid][1] != p.content_hash
    ]
    if refused:
        return refused
    lines = [
        "# policy id, encoding version, sha256 of policy.yaml content. Written by `cds policy lock`;",
        "# checked by `cds policy check` and the tests: content may not change without a version change.",
    ]
    lines += [f"{pid} {p.version} {p.content_hash}" for pid, p in sorted(policies.policies.items())]
    path.write_text("\n".join(lines) + "\n")
    return []


def unused_inputs(mappings: Mappings, policies: PolicySet) -> list[str]:
    used: set[str] = set()
    for policy in policies.policies.values():
        for product in policy.products:
            used |= inputs_of(product)
    for name, spec in mappings.inputs.items():
        if spec.kind == "medication_history" and name in used and spec.drug:
            used.add(spec.drug)
    return [
        f"fhir_mappings/inputs.yaml: {name} is not used by any policy" for name in mappings.inputs if name not in used
    ]


_BOUND = {">=": (True, False), ">": (True, True), "<=": (False, False), "<": (False, True)}


def _interval(nodes: list[Node]) -> tuple[float, bool, float, bool]:
    """The values meeting every comparison: (low, low excluded, high, high excluded)."""
    lo, lo_open, hi, hi_open = float("-inf"), False, float("inf"), False
    for n in nodes:
        lower, strict = _BOUND[n.op]
        v = float(n.value or 0)
        if lower and (v > lo or (v == lo and strict)):
            lo, lo_open = v, strict
        if not lower and (v < hi or (v == hi and strict)):
            hi, hi_open = v, strict
    return lo, lo_open, hi, hi_open


def unreachable(policy: Policy) -> list[str]:
    out: list[str] = []
    where = f"{policy.path}/policy.yaml"

    def visit(node: Node) -> None:
        comparisons: dict[str, list[Node]] = {}
        for child in node.children:
            if child.op in COMPARISONS and child.input:
                comparisons.setdefault(child.input, []).append(child)
        for name, group in comparisons.items():
            if len(group) < 2:
                continue
            label = node.id or "a group"
            if node.op == "all":
                lo, lo_open, hi, hi_open = _interval(group)
                if lo > hi or (lo == hi and (lo_open or hi_open)):
                    out.append(f"{where}: {label}: no value of {name} meets {' and '.join(n.shown for n in group)}")
            if node.op == "any":
                lows = [n for n in group if _BOUND[n.op][0]]
                highs = [n for n in group if not _BOUND[n.op][0]]
                for a in lows:
                    for b in highs:
                        va, vb = float(a.value or 0), float(b.value or 0)
                        if va < vb or (va == vb and not (_BOUND[a.op][1] and _BOUND[b.op][1])):
                            out.append(f"{where}: {label}: every value of {name} meets {a.shown} or {b.shown}")
        for child in node.children:
            visit(child)

    for product in policy.products:
        for node in product.all_nodes():
            if node.children:
                visit(node)
        diagnosis_inputs = {
            n.input for ind in product.indications for n in ind.diagnosis.walk() if n.op == "present" and n.input
        }
        for nc in product.not_covered:
            needed = {n.input for n in nc.when.walk() if n.op == "present" and n.input} & diagnosis_inputs
            if needed and nc.when.op != "any":
                out.append(
                    f"{where}: {nc.id} needs {', '.join(sorted(needed))}, an indication's own diagnosis: "
                    "it can never apply (an established indication takes precedence)"
                )
    return list(dict.fromkeys(out))


def check_all(directory: Path | None = None) -> list[str]:
    try:
        mappings = load_mappings()
        policies = load_policies(mappings, directory)
    except LoadError as exc:
        return [exc.message]
    problems: list[str] = []
    for _pid, policy in sorted(policies.policies.items()):
        try:
            results = run_policy_cases(policy, mappings)
        except CaseError as exc:
            problems.append(f"{policy.path}/cases.yaml: {exc}")
            continue
        for r in results:
            problems.extend(f"{policy.path}/cases.yaml: {r.note}: {p}" for p in r.problems)
        problems.extend(f"{policy.path}/cases.yaml: {gap}" for gap in coverage_gaps(policy, results))
    if directory is None:
        problems.extend(unused_inputs(mappings, policies))
        problems.extend(lock_problems(policies))
    return problems
