"""Response: replacements (one open per host), holds, drift marks for the storm breaker and
image quarantine, alert incidents, break-glass sessions and the rails' decisions.

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
        "breakglass",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host_id", sa.String(length=128), nullable=False),
        sa.Column("login_user", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("operator", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("ticket", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("login_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("login", sa.JSON(), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_breakglass")),
    )
    with op.batch_alter_table("breakglass", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_breakglass_host_id"), ["host_id"], unique=False)

    op.create_table(
        "decisions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("host_id", sa.String(length=128), nullable=True),
        sa.Column("pool", sa.String(length=128), nullable=True),
        sa.Column("decision", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
    )
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_decisions_host_id"), ["host_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_decisions_pool"), ["pool"], unique=False)

    op.create_table(
        "drift_marks",
        sa.Column("host_id", sa.String(length=128), nullable=False),
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("pool", sa.String(length=128), nullable=True),
        sa.Column("image", sa.String(length=255), nullable=True),
        sa.Column("fresh", sa.Boolean(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("host_id", "signature", name=op.f("pk_drift_marks")),
    )
    with op.batch_alter_table("drift_marks", schema=None) as batch_op:
        batch_op.create_index("ix_drift_marks_pool_at", ["pool", "at"], unique=False)

    op.create_table(
        "holds",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(length=255), nullable=True),
        sa.Column("release_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_holds")),
    )
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.create_index(
            "uq_holds_open",
            ["scope", "target", "kind"],
            unique=True,
            sqlite_where=sa.text("released_at IS NULL"),
            postgresql_where=sa.text("released_at IS NULL"),
        )

    op.create_table(
        "incidents",
        sa.Column("dedup_key", sa.String(length=255), nullable=False),
        sa.Column("host_id", sa.String(length=128), nullable=True),
        sa.Column("pool", sa.String(length=128), nullable=True),
        sa.Column("cause", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("alert", sa.JSON(), nullable=False),
        sa.Column("sent", sa.JSON(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("dedup_key", name=op.f("pk_incidents")),
    )
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_incidents_host_id"), ["host_id"], unique=False)

    op.create_table(
        "replacements",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host_id", sa.String(length=128), nullable=False),
        sa.Column("pool", sa.String(length=128), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=True),
        sa.Column("cause", sa.String(length=64), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("blocked_by", sa.String(length=32), nullable=True),
        sa.Column("blocked_reason", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replacements")),
        sa.UniqueConstraint("request_id", name=op.f("uq_replacements_request_id")),
    )
    with op.batch_alter_table("replacements", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_replacements_host_id"), ["host_id"], unique=False)
        batch_op.create_index(
            "uq_replacements_open_host",
            ["host_id"],
            unique=True,
            sqlite_where=sa.text("state IN ('blocked', 'acting', 'verifying')"),
            postgresql_where=sa.text("state IN ('blocked', 'acting', 'verifying')"),
        )


def downgrade() -> None:
    with op.batch_alter_table("replacements", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_replacements_open_host",
            sqlite_where=sa.text("state IN ('blocked', 'acting', 'verifying')"),
            postgresql_where=sa.text("state IN ('blocked', 'acting', 'verifying')"),
        )
        batch_op.drop_index(batch_op.f("ix_replacements_host_id"))

    op.drop_table("replacements")
    with op.batch_alter_table("incidents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_incidents_host_id"))

    op.drop_table("incidents")
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_holds_open",
            sqlite_where=sa.text("released_at IS NULL"),
            postgresql_where=sa.text("released_at IS NULL"),
        )

    op.drop_table("holds")
    with op.batch_alter_table("drift_marks", schema=None) as batch_op:
        batch_op.drop_index("ix_drift_marks_pool_at")

    op.drop_table("drift_marks")
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_decisions_pool"))
        batch_op.drop_index(batch_op.f("ix_decisions_host_id"))

    op.drop_table("decisions")
    with op.batch_alter_table("breakglass", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_breakglass_host_id"))

    op.drop_table("breakglass")
