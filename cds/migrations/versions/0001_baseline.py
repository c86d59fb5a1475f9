"""The schema of the first releases (CRD): hook exchanges, coverage assertions, prior authorizations with the
unique index on their reuse key, published Questionnaires, seen JWT ids, card feedback. A database made before
migrations existed is stamped at this revision (cds.migrate) and upgraded from here.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

KEYED_ACTIVE = "status = 'active' AND policy LIKE '%|%'"


def upgrade() -> None:
    op.create_table(
        "hook_exchanges",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("hook_instance", sa.String(128), nullable=False),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("client_iss", sa.String(512)),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("queried", sa.Text),
    )
    op.create_index("ix_hook_exchanges_hook_instance", "hook_exchanges", ["hook_instance"])
    op.create_table(
        "coverage_assertions",
        sa.Column("assertion_id", sa.String(64), primary_key=True),
        sa.Column("hook_instance", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payer_id", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(128), nullable=False),
        sa.Column("order_ref", sa.String(128), nullable=False),
        sa.Column("policy", sa.String(128)),
        sa.Column("product", sa.String(64)),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("covered", sa.String(32), nullable=False),
        sa.Column("pa_needed", sa.String(32)),
        sa.Column("satisfied_pa_id", sa.String(64)),
        sa.Column("questionnaire", sa.String(512)),
        sa.Column("extension", sa.Text, nullable=False),
        sa.Column("trace", sa.Text, nullable=False),
        sa.Column("draft_response", sa.Text),
    )
    op.create_index("ix_coverage_assertions_hook_instance", "coverage_assertions", ["hook_instance"])
    op.create_index("ix_coverage_assertions_patient_key", "coverage_assertions", ["patient_key"])
    op.create_table(
        "prior_authorizations",
        sa.Column("pa_id", sa.String(64), primary_key=True),
        sa.Column("assertion_id", sa.String(64), nullable=False),
        sa.Column("payer_id", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(128), nullable=False),
        sa.Column("product", sa.String(64), nullable=False),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("valid_from", sa.Date, nullable=False),
        sa.Column("valid_to", sa.Date),
        sa.Column("doses", sa.Integer),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_prior_auth_member", "prior_authorizations", ["payer_id", "patient_key", "product"])
    op.create_index(
        "ux_prior_auth_active_key",
        "prior_authorizations",
        ["payer_id", "patient_key", "product", "policy"],
        unique=True,
        sqlite_where=sa.text(KEYED_ACTIVE),
        postgresql_where=sa.text(KEYED_ACTIVE),
    )
    op.create_table(
        "questionnaires",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "seen_jwt_ids",
        sa.Column("iss", sa.String(512), primary_key=True),
        sa.Column("jti", sa.String(256), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_seen_jwt_ids_expires_at", "seen_jwt_ids", ["expires_at"])
    op.create_table(
        "card_feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("card", sa.String(128), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_card_feedback_card", "card_feedback", ["card"])


def downgrade() -> None:
    for table in (
        "card_feedback",
        "seen_jwt_ids",
        "questionnaires",
        "prior_authorizations",
        "coverage_assertions",
        "hook_exchanges",
    ):
        op.drop_table(table)
