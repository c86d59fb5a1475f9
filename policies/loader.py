"""Load policy folders strictly: every problem stops the service at start-up with the file and the place.

A policy folder holds ``policy.yaml`` (the rules) and ``cases.yaml`` (its table of test cases, required). The rule
vocabulary is closed (:data:`policies.model.LEAF_OPS`, :data:`policies.model.GROUP_OPS`, the dose kinds of
:mod:`policies.dose`); inputs must exist in ``fhir_mappings/inputs.yaml`` and fit the operator.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from cds.errors import PolicyLoadError
from fhir_mappings import units
from fhir_mappings.loader import Mappings
from policies import dose
from policies.model import (
    COMPARISONS,
    GROUP_OPS,
    LEAF_OPS,
    Alternative,
    Authorization,
    DoseRule,
    Indication,
    Node,
    NotCovered,
    Policy,
    Product,
    Reauthorization,
    Statement,
)
from policies.needs import diagnosis_inputs

HERE = Path(__file__).parent
_TOP_KEYS = {
    "id",
    "number",
    "criterion_prefix",
    "title",
    "publisher",
    "effective",
    "version",
    "source",
    "document_url",
    "products",
}
_PRODUCT_KEYS = {
    "id",
    "title",
    "drugs",
    "selection_id",
    "authorization",
    "other_use",
    "indications",
    "not_covered",
    "dosing",
    "reauthorization",
    "documentation",
    "statements",
    "alternative",
    "off_label_review",
}
_NODE_KEYS = {"id", "text", "op", "input", "value", "unit", "within_days", "all", "any", "not", "tests"}
_QUALITATIVE = {"present", "absent"}


@dataclass(frozen=True)
class PolicySet:
    policies: Mapping[str, Policy]

    def find(
        self, policy_ids: tuple[str, ...] | list[str], drug_inputs: frozenset[str]
    ) -> tuple[Policy, Product] | None:
        """The first of ``policy_ids`` with a product for one of the order's drug inputs."""
        for pid in policy_ids:
            policy = self.policies.get(pid)
            product = policy.product_for(drug_inputs) if policy else None
            if policy and product:
                return policy, product
        return None

    @property
    def drug_inputs(self) -> frozenset[str]:
        return frozenset(d for p in self.policies.values() for prod in p.products for d in prod.drugs)


def content_hash(raw: Any) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


class _Reader:
    def __init__(self, file: str, mappings: Mappings, prefix: str) -> None:
        self.file = file
        self.mappings = mappings
        self.prefix = prefix
        self.ids: set[str] = set()

    def fail(self, place: str, problem: str) -> PolicyLoadError:
        return PolicyLoadError(self.file, place, problem)

    def claim_id(self, ident: str, place: str) -> None:
        if not ident.startswith(self.prefix):
            raise self.fail(place, f"criterion id '{ident}' must start with '{self.prefix}' (the document's numbering)")
        if ident in self.ids:
            raise self.fail(place, f"criterion id '{ident}' is used twice")
        self.ids.add(ident)

    def statement(self, raw: Any, place: str) -> Statement:
        if not isinstance(raw, dict) or set(raw) - {"id", "text"} or not raw.get("id") or not raw.get("text"):
            raise self.fail(place, "needs exactly an id and a text")
        self.claim_id(str(raw["id"]), place)
        return Statement(str(raw["id"]), str(raw["text"]).strip())

    def node(
        self, raw: Any, place: str, default_id: str | None = None, default_text: str = "", under_id: bool = False
    ) -> Node:
        if not isinstance(raw, dict):
            raise self.fail(place, "a criterion must be a mapping")
        extra = set(raw) - _NODE_KEYS
        if extra:
            raise self.fail(place, f"unknown keys {sorted(extra)}")
        ident = raw.get("id", default_id)
        if ident is not None:
            ident = str(ident)
            self.claim_id(ident, place)
        text = str(raw.get("text", default_text)).strip()
        groups = [k for k in ("all", "any", "not", "tests") if k in raw]
        if len(groups) > 1 or (groups and "op" in raw):
            raise self.fail(place, "a criterion is either a group (all/any/not) or a leaf (op), not both")
        if groups:
            op = groups[0]
            body = raw[op]
            if set(raw) & {"input", "value", "unit", "within_days"}:
                raise self.fail(place, "input, value, unit and within_days belong to leaves")
            inner = under_id or ident is not None
            if op == "not":
                children: tuple[Node, ...] = (self.node(body, f"{place}.not", under_id=inner),)
            else:
                if not isinstance(body, list) or not body:
                    raise self.fail(f"{place}.{op}", "must be a non-empty list")
                children = tuple(self.node(c, f"{place}.{op}[{i}]", under_id=inner) for i, c in enumerate(body))
            return Node(op=op, id=ident, text=text, children=children)
        op = str(raw.get("op"))
        if op not in LEAF_OPS:
            raise self.fail(f"{place}.op", f"unknown operator {op!r}; known: {sorted(LEAF_OPS | GROUP_OPS)}")
        if op == "attested":
            if not text or (ident is None and not under_id):
                raise self.fail(place, "an 'attested' criterion needs a text and an id (its own or its criterion's)")
            if set(raw) & {"input", "value", "unit", "within_days"}:
                raise self.fail(place, "an 'attested' criterion takes no input")
            return Node(op=op, id=ident, text=text)
        name = raw.get("input")
        spec = self.mappings.inputs.get(str(name))
        if spec is None:
            raise self.fail(f"{place}.input", f"input {name!r} has no mapping in fhir_mappings/inputs.yaml")
        within = raw.get("within_days")
        if within is not None:
            if spec.kind not in ("lab", "lab_code") or not isinstance(within, int) or within <= 0:
                raise self.fail(f"{place}.within_days", "a positive number of days, for lab inputs only")
        if op == "below_range":
            if spec.kind != "lab" or set(raw) & {"value", "unit"}:
                raise self.fail(place, "'below_range' tests a lab input against the lab's own range; it takes no value")
            return Node(
                op=op,
                id=ident,
                text=text or f"{spec.display} below the reference range",
                input=spec.name,
                shown="below the reference range",
                within_days=within,
            )
        if op in _QUALITATIVE:
            if spec.type != "boolean":
                raise self.fail(f"{place}.op", f"'{op}' needs a yes/no input; {name} is {spec.type}")
            if "value" in raw or "unit" in raw:
                raise self.fail(place, f"'{op}' takes no value")
            return Node(op=op, id=ident, text=text or spec.display, input=spec.name)
        if op == "is":
            codes = dict(spec.options)
            if spec.type != "code" or raw.get("value") not in codes:
                raise self.fail(f"{place}.value", f"'is' needs a code input and one of its options {sorted(codes)}")
            shown = f"is {codes[raw['value']]}"
            return Node(
                op=op,
                id=ident,
                text=text or f"{spec.display} {shown}",
                input=spec.name,
                value=str(raw["value"]),
                shown=shown,
                within_days=within,
            )
        assert op in COMPARISONS
        if spec.type not in ("quantity", "age"):
            raise self.fail(f"{place}.op", f"'{op}' needs a numeric input; {name} is {spec.type}")
        value = raw.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{place}.value", "a comparison needs a numeric value")
        unit = raw.get("unit")
        converted = float(value)
        if spec.type == "quantity":
            if not unit:
                raise self.fail(f"{place}.unit", f"{name} is a quantity in {spec.unit}; give the threshold's unit")
            try:
                converted = units.convert(float(value), str(unit), spec.unit or "")
            except units.UnitError as exc:
                raise self.fail(f"{place}.unit", str(exc)) from None
        elif unit not in (None, "a"):
            raise self.fail(f"{place}.unit", "ages are compared in years ('a')")
        shown = (
            f"{op} {value:g}{' ' + str(unit) if unit and unit != 'a' else ''}{' years' if spec.type == 'age' else ''}"
        )
        return Node(
            op=op,
            id=ident,
            text=text or f"{spec.display} {shown}",
            input=spec.name,
            value=converted,
            shown=shown,
            within_days=within,
        )

    def criteria(self, raw: Any, place: str) -> tuple[Node, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.fail(place, "must be a non-empty list of criteria")
        out = []
        for i, c in enumerate(raw):
            node = self.node(c, f"{place}[{i}]")
            if node.id is None:
                raise self.fail(f"{place}[{i}]", "each listed criterion needs an id from the document's numbering")
            out.append(node)
        return tuple(out)

    def dose_rule(self, raw: Any, place: str) -> DoseRule:
        if not isinstance(raw, dict) or not raw.get("id") or not raw.get("kind"):
            raise self.fail(place, "a dose rule needs an id and a kind")
        ident = str(raw["id"])
        self.claim_id(ident, place)
        params = {k: v for k, v in raw.items() if k not in ("id", "kind", "text")}
        problem = dose.validate_params(str(raw["kind"]), params)
        if problem:
            raise self.fail(place, problem)
        rule = DoseRule(ident, str(raw["kind"]), str(raw.get("text", "")).strip(), MappingProxyType(params))
        for name in dose.DOSE_KINDS[rule.kind].inputs(rule):
            if name not in self.mappings.inputs:
                raise self.fail(place, f"the rule reads input {name!r}, which has no mapping")
        return rule

    def doses(self, raw: Any, place: str) -> tuple[DoseRule, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.fail(place, "must be a list of dose rules")
        return tuple(self.dose_rule(r, f"{place}[{i}]") for i, r in enumerate(raw))

    def alternative(self, raw: Any, place: str) -> Alternative | None:
        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) - {"drug", "text"} or not raw.get("text"):
            raise self.fail(place, "an alternative needs a drug input and a text")
        spec = self.mappings.inputs.get(str(raw.get("drug")))
        if spec is None or spec.kind != "drug":
            raise self.fail(f"{place}.drug", f"{raw.get('drug')!r} is not a drug input")
        return Alternative(spec.name, str(raw["text"]).strip())

    def product(self, raw: Any, place: str) -> Product:
        if not isinstance(raw, dict):
            raise self.fail(place, "a product must be a mapping")
        extra = set(raw) - _PRODUCT_KEYS
        if extra:
            raise self.fail(place, f"unknown keys {sorted(extra)}")
        self.ids = set()  # ids are unique within a product (a guideline may apply to two products)
        for key in ("id", "title", "drugs", "indications", "authorization"):
            if raw.get(key) in (None, "", []):
                raise self.fail(f"{place}.{key}", "is required")
        drugs = raw["drugs"]
        if not isinstance(drugs, list):
            raise self.fail(f"{place}.drugs", "must be a list of drug inputs")
        for i, d in enumerate(drugs):
            spec = self.mappings.inputs.get(str(d))
            if spec is None or spec.kind != "drug":
                raise self.fail(f"{place}.drugs[{i}]", f"{d!r} is not a drug input in fhir_mappings/inputs.yaml")
        selection_id = str(raw.get("selection_id") or f"{self.prefix}MNC")
        indications = []
        for i, ind in enumerate(raw["indications"]):
            iplace = f"{place}.indications[{i}]"
            if not isinstance(ind, dict) or not ind.get("id") or not ind.get("title") or "diagnosis" not in ind:
                raise self.fail(iplace, "needs an id, a title and a diagnosis")
            extra = set(ind) - {"id", "title", "diagnosis", "criteria", "dosing"}
            if extra:
                raise self.fail(iplace, f"unknown keys {sorted(extra)}")
            iid = str(ind["id"])
            diag_raw = ind["diagnosis"]
            diagnosis = self.node(
                diag_raw,
                f"{iplace}.diagnosis",
                default_id=None if isinstance(diag_raw, dict) and "id" in diag_raw else iid,
                default_text=str(ind["title"]),
            )
            unmarked = sorted(
                n for n in diagnosis_inputs(diagnosis, self.mappings) if not self.mappings.inputs[n].disorder
            )
            if unmarked:
                raise self.fail(
                    f"{iplace}.diagnosis",
                    f"{', '.join(unmarked)}: an indication's diagnosis is a disorder; mark it `disorder: true` in "
                    "fhir_mappings/inputs.yaml (an order whose reason names it is then judged by it)",
                )
            criteria = self.criteria(ind["criteria"], f"{iplace}.criteria") if ind.get("criteria") else ()
            indications.append(
                Indication(
                    iid,
                    str(ind["title"]).strip(),
                    diagnosis,
                    criteria,
                    self.doses(ind.get("dosing"), f"{iplace}.dosing"),
                )
            )
        if len(indications) > 1:
            self.claim_id(selection_id, f"{place}.selection_id")
        auth = raw["authorization"]
        keys = {"id", "text", "initial_months", "renewal_months", "days", "doses"}
        if not isinstance(auth, dict) or set(auth) - keys:
            raise self.fail(f"{place}.authorization", f"keys: {', '.join(sorted(keys))}")
        for key in ("initial_months", "renewal_months", "days", "doses"):
            v = auth.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise self.fail(f"{place}.authorization.{key}", "must be a positive whole number or absent")
        if auth.get("initial_months") is None and auth.get("doses") is None and auth.get("days") is None:
            raise self.fail(f"{place}.authorization", "give initial_months (or days), or doses for a one-time approval")
        if auth.get("days") is not None and (auth.get("initial_months") or auth.get("renewal_months")):
            raise self.fail(f"{place}.authorization", "an approval lasts days or months, not both")
        if not auth.get("id") or not auth.get("text"):
            raise self.fail(f"{place}.authorization", "needs the id and text of the document's duration statement")
        self.claim_id(str(auth["id"]), f"{place}.authorization")
        authorization = Authorization(
            str(auth["id"]),
            str(auth["text"]).strip(),
            auth.get("initial_months"),
            auth.get("renewal_months"),
            auth.get("doses"),
            auth.get("days"),
        )
        not_covered = []
        for i, nc in enumerate(raw.get("not_covered") or []):
            nplace = f"{place}.not_covered[{i}]"
            if not isinstance(nc, dict) or set(nc) - {"id", "title", "when", "alternative"}:
                raise self.fail(nplace, "keys: id, title, when, alternative")
            if not nc.get("id") or not nc.get("title") or "when" not in nc:
                raise self.fail(nplace, "needs an id, a title and a 'when' criterion")
            self.claim_id(str(nc["id"]), nplace)
            not_covered.append(
                NotCovered(
                    str(nc["id"]),
                    str(nc["title"]).strip(),
                    self.node(nc["when"], f"{nplace}.when"),
                    self.alternative(nc.get("alternative"), f"{nplace}.alternative"),
                )
            )
        reauth = None
        if raw.get("reauthorization") is not None:
            ra = raw["reauthorization"]
            rplace = f"{place}.reauthorization"
            if not isinstance(ra, dict) or set(ra) - {"id", "text", "when", "criteria"} or not ra.get("id"):
                raise self.fail(rplace, "keys: id, text, when, criteria")
            self.claim_id(str(ra["id"]), rplace)
            reauth = Reauthorization(
                str(ra["id"]),
                str(ra.get("text", "")).strip(),
                self.node(ra.get("when"), f"{rplace}.when"),
                self.criteria(ra.get("criteria"), f"{rplace}.criteria"),
            )
        statements = tuple(
            self.statement(s, f"{place}.statements[{i}]") for i, s in enumerate(raw.get("statements") or [])
        )
        documentation = (
            self.statement(raw["documentation"], f"{place}.documentation") if raw.get("documentation") else None
        )
        off_label = (
            self.statement(raw["off_label_review"], f"{place}.off_label_review")
            if raw.get("off_label_review")
            else None
        )
        if raw.get("other_use"):
            other_use = self.statement(raw["other_use"], f"{place}.other_use")
        elif off_label is not None:
            other_use = off_label  # any other use goes to the off-label review
        else:
            raise self.fail(f"{place}.other_use", "is required (what the document says of any other use)")
        return Product(
            id=str(raw["id"]),
            title=str(raw["title"]).strip(),
            drugs=tuple(str(d) for d in drugs),
            indications=tuple(indications),
            selection_id=selection_id,
            authorization=authorization,
            other_use=other_use,
            not_covered=tuple(not_covered),
            dosing=self.doses(raw.get("dosing"), f"{place}.dosing"),
            reauthorization=reauth,
            documentation=documentation,
            off_label_review=off_label,
            statements=statements,
            alternative=self.alternative(raw.get("alternative"), f"{place}.alternative"),
        )


def _require(raw: Mapping[str, Any], key: str, file: str) -> Any:
    if raw.get(key) in (None, ""):
        raise PolicyLoadError(file, key, "is required")
    return raw[key]


def read_policy_yaml(folder: Path) -> dict[str, Any]:
    file = str(folder / "policy.yaml")
    try:
        raw = yaml.safe_load((folder / "policy.yaml").read_text())
    except OSError as exc:
        raise PolicyLoadError(file, "file", f"cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PolicyLoadError(file, "file", f"invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise PolicyLoadError(file, "file", "must be a mapping")
    return raw


def load_policy(folder: Path, mappings: Mappings) -> Policy:
    file = str(folder / "policy.yaml")
    raw = read_policy_yaml(folder)
    extra = set(raw) - _TOP_KEYS
    if extra:
        raise PolicyLoadError(file, "top level", f"unknown keys {sorted(extra)}")
    read_cases(folder)
    number = str(_require(raw, "number", file))
    r = _Reader(file, mappings, str(_require(raw, "criterion_prefix", file)))
    products_raw = _require(raw, "products", file)
    if not isinstance(products_raw, list):
        raise r.fail("products", "must be a list")
    products = tuple(r.product(p, f"products[{i}]") for i, p in enumerate(products_raw))
    seen: set[str] = set()
    for i, p in enumerate(products):
        if p.id in seen:
            raise r.fail(f"products[{i}].id", f"product id '{p.id}' is used twice")
        seen.add(p.id)
    return Policy(
        id=str(_require(raw, "id", file)),
        number=number,
        title=str(_require(raw, "title", file)),
        publisher=str(_require(raw, "publisher", file)),
        effective=str(_require(raw, "effective", file)),
        version=str(_require(raw, "version", file)),
        source=str(_require(raw, "source", file)),
        document_url=raw.get("document_url"),
        products=products,
        path=str(folder),
        content_hash=content_hash(raw),
        criterion_prefix=r.prefix,
    )


def read_cases(folder: Path) -> list[dict[str, Any]]:
    path = folder / "cases.yaml"
    if not path.exists():
        raise PolicyLoadError(str(path), "file", "every policy needs a cases.yaml beside it")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PolicyLoadError(str(path), "file", f"invalid YAML ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cases"), list) or not raw["cases"]:
        raise PolicyLoadError(str(path), "cases", "must be a non-empty list")
    return list(raw["cases"])


def policy_folders(directory: Path | None = None) -> list[Path]:
    base = directory or HERE
    return sorted(p.parent for p in base.glob("*/policy.yaml"))


def load_policies(mappings: Mappings, directory: Path | None = None) -> PolicySet:
    policies: dict[str, Policy] = {}
    for folder in policy_folders(directory):
        policy = load_policy(folder, mappings)
        if policy.id in policies:
            raise PolicyLoadError(str(folder / "policy.yaml"), "id", f"policy id '{policy.id}' is used twice")
        if policy.id != folder.name:
            raise PolicyLoadError(str(folder / "policy.yaml"), "id", f"must equal the folder name '{folder.name}'")
        policies[policy.id] = policy
    return PolicySet(MappingProxyType(policies))
