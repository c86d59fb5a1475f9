"""DTR: the record each assertion was made on, the answered forms that settled assertions, and the errors DTR
clients report about forms.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "assertion_records",
        sa.Column("assertion_id", sa.String(64), primary_key=True),
        sa.Column("record", sa.Text, nullable=False),
    )
    op.create_table(
        "questionnaire_responses",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("assertion_id", sa.String(64), nullable=False),
        sa.Column("questionnaire", sa.String(512), nullable=False),
        sa.Column("via", sa.String(32), nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_questionnaire_responses_assertion_id", "questionnaire_responses", ["assertion_id"])
    op.create_table(
        "form_errors",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("client_iss", sa.String(512)),
        sa.Column("questionnaires", sa.Text, nullable=False),
        sa.Column("outcomes", sa.Text, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("form_errors", "questionnaire_responses", "assertion_records"):
        op.drop_table(table)
