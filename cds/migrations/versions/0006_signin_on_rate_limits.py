"""Reviewer sign-in failures are counted in ``rate_events`` (cds.ratelimit, buckets ``review-signin-address`` and
``review-signin-user``) like the token endpoint's; their own table goes. A failure counted in it is at most a minute
old, so nothing is worth carrying over.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_review_signin_failures", table_name="review_signin_failures")
    op.drop_table("review_signin_failures")


def downgrade() -> None:
    op.create_table(
        "review_signin_failures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("username_key", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_review_signin_failures", "review_signin_failures", ["username_key", "at"])
