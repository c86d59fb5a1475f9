"""Subscription lifetime: ``Subscription.end`` (turned off when it passes), the backport heartbeat period, and when
the subscription was last sent something (a heartbeat is due that long after).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("heartbeat_seconds", sa.Integer, nullable=True))
        batch.add_column(sa.Column("last_notified_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("last_notified_at")
        batch.drop_column("heartbeat_seconds")
        batch.drop_column("ends_at")
