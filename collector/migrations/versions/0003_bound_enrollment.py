"""Enrollment binds what a host may not choose: an enrollment token names its pool, and a new
key for a known host waits for an operator's permission (the host remembers who gave it and
the last new key it refused).

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
    with op.batch_alter_table("enroll_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pool", sa.String(length=128), nullable=True))
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rekey_allowed_by", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("refused_key_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("refused_key_id")
        batch_op.drop_column("rekey_allowed_by")
    with op.batch_alter_table("enroll_tokens", schema=None) as batch_op:
        batch_op.drop_column("pool")
