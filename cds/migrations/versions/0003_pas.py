"""PAS: requests with their current responses (one per submitter and Bundle.identifier), reviewer decisions, the
audit events, Subscriptions and the notification outbox, reviewer sessions and failed sign-ins.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pas_requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("submitter", sa.String(512), nullable=False),
        sa.Column("bundle_key", sa.String(1024), nullable=False),
        sa.Column("claim_key", sa.String(1024), nullable=False),
        sa.Column("patient_key", sa.String(128), nullable=False),
        sa.Column("payer_id", sa.String(64), nullable=False),
        sa.Column("member_id", sa.String(256), nullable=False),
        sa.Column("provider_key", sa.String(512), nullable=False),
        sa.Column("org_identifier", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("drug", sa.String(256), nullable=False),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("related_to", sa.String(64)),
        sa.Column("superseded_by", sa.String(64)),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("explanation", sa.Text, nullable=False),
        sa.UniqueConstraint("submitter", "bundle_key", name="ux_pas_request_bundle"),
    )
    op.create_index("ix_pas_request_inquiry", "pas_requests", ["payer_id", "member_id", "provider_key"])
    op.create_index("ix_pas_request_queue", "pas_requests", ["status", "due_at"])
    op.create_index("ix_pas_request_claim", "pas_requests", ["submitter", "claim_key"])
    op.create_table(
        "pas_decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("reviewer", sa.String(256), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("period_end", sa.Date),
        sa.Column("quantity", sa.Float),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pas_decisions_request_id", "pas_decisions", ["request_id"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(512), nullable=False),
        sa.Column("subject", sa.String(128)),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_events_kind", "audit_events", ["kind"])
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(512)),
        sa.Column("org_identifier", sa.String(1024), nullable=False),
        sa.Column("endpoint", sa.String(2048), nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("events_since_start", sa.Integer, nullable=False),
    )
    op.create_index("ix_subscriptions_owner", "subscriptions", ["owner"])
    op.create_index("ix_subscriptions_status", "subscriptions", ["status"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subscription_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.String(500)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(64)),
    )
    op.create_index("ix_outbox_subscription_id", "outbox", ["subscription_id"])
    op.create_index("ix_outbox_due", "outbox", ["delivered_at", "next_attempt_at"])
    op.create_table(
        "review_sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_review_sessions_expires_at", "review_sessions", ["expires_at"])
    op.create_table(
        "review_signin_failures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("username_key", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_review_signin_failures", "review_signin_failures", ["username_key", "at"])


def downgrade() -> None:
    for table in (
        "review_signin_failures",
        "review_sessions",
        "outbox",
        "subscriptions",
        "audit_events",
        "pas_decisions",
        "pas_requests",
    ):
        op.drop_table(table)
