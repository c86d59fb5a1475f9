"""Rate limits counted by every worker together (cds.ratelimit): one row per counted request, kept for a window.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("bucket", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_rate_events", "rate_events", ["bucket", "key_hash", "at"])


def downgrade() -> None:
    op.drop_index("ix_rate_events", table_name="rate_events")
    op.drop_table("rate_events")
