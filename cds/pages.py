"""Human-readable pages of the policies as encoded: what the External Reference card links to."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from cds.errors import NotFound
from cds.runtime import Runtime

bp = Blueprint("pages", __name__)


def _rt() -> Runtime:
    rt: Runtime = current_app.extensions["cds"]
    return rt


@bp.get("/policies")
def index() -> str:
    policies = sorted(_rt().policies.policies.values(), key=lambda p: p.id)
    return render_template("policy.html", title="Policies", policy=None, policies=policies)


@bp.get("/policies/<policy_id>")
def policy(policy_id: str) -> str:
    found = _rt().policies.policies.get(policy_id)
    if found is None:
        raise NotFound(f"No policy '{policy_id}' here")
    return render_template("policy.html", title=f"{found.number} {found.title}", policy=found, policies=())
