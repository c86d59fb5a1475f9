"""Human-readable pages of the policies as encoded: what the External Reference card links to."""

from __future__ import annotations

from flask import Blueprint, render_template

from cds.errors import NotFound
from cds.runtime import current

bp = Blueprint("pages", __name__)


@bp.get("/policies")
def index() -> str:
    policies = sorted(current().policies.policies.values(), key=lambda p: p.id)
    return render_template("policy.html", title="Policies", policy=None, policies=policies)


@bp.get("/policies/<policy_id>")
def policy(policy_id: str) -> str:
    found = current().policies.policies.get(policy_id)
    if found is None:
        raise NotFound(f"No policy '{policy_id}' here")
    return render_template("policy.html", title=f"{found.number} {found.title}", policy=found, policies=())
