"""Initial schema: hosts and their keys, envelopes, findings, the audit trail, jobs, tokens,
images and fleet events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "enroll_tokens",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("note", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("uses_left", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enroll_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enroll_tokens_token_hash")),
    )
    op.create_table(
        "envelopes",
        sa.Column("host_id", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("boot_id", sa.String(length=128), nullable=False),
        sa.Column("time", sa.String(length=40), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("host_id", "key_id", "seq", name=op.f("pk_envelopes")),
    )
    with op.batch_alter_table("envelopes", schema=None) as batch_op:
        batch_op.create_index(
            "ix_envelopes_host_received", ["host_id", "received_at"], unique=False
        )

    op.create_table(
        "findings",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("drift", sa.Boolean(), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
    )
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_findings_host_id"), ["host_id"], unique=False)

    op.create_table(
        "fleet_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleet_events")),
    )
    with op.batch_alter_table("fleet_events", schema=None) as batch_op:
        batch_op.create_index(
            "uq_fleet_events_open_kind",
            ["kind"],
            unique=True,
            sqlite_where=sa.text("closed_at IS NULL"),
            postgresql_where=sa.text("closed_at IS NULL"),
        )

    op.create_table(
        "host_keys",
        sa.Column("host_id", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_digest", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("host_id", "key_id", name=op.f("pk_host_keys")),
    )
    op.create_table(
        "hosts",
        sa.Column("host_id", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("state_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state_cause", sa.String(length=64), nullable=False),
        sa.Column("resume_state", sa.String(length=32), nullable=True),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pool", sa.String(length=128), nullable=True),
        sa.Column("boot_id", sa.String(length=128), nullable=False),
        sa.Column("agent_version", sa.String(length=64), nullable=False),
        sa.Column("image_build_id", sa.String(length=255), nullable=True),
        sa.Column("image_root", sa.String(length=128), nullable=True),
        sa.Column("cloud_image_id", sa.String(length=255), nullable=True),
        sa.Column("measured_root", sa.String(length=128), nullable=True),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("envelopes", sa.BigInteger(), nullable=False),
        sa.Column("health", sa.JSON(), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("host_id", name=op.f("pk_hosts")),
    )
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_hosts_image_build_id"), ["image_build_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_hosts_last_seen_at"), ["last_seen_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_hosts_pool"), ["pool"], unique=False)
        batch_op.create_index(batch_op.f("ix_hosts_state"), ["state"], unique=False)

    op.create_table(
        "images",
        sa.Column("build_id", sa.String(length=255), nullable=False),
        sa.Column("root", sa.String(length=128), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("policy_digest", sa.String(length=128), nullable=False),
        sa.Column("created", sa.String(length=40), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("statement", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("build_id", name=op.f("pk_images")),
    )
    op.create_table(
        "jobs",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("dedup_key", sa.String(length=512), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_claim", ["kind", "state", "next_attempt_at"], unique=False)
        batch_op.create_index(
            "uq_jobs_open_dedup",
            ["kind", "dedup_key"],
            unique=True,
            sqlite_where=sa.text("state IN ('pending', 'running')"),
            postgresql_where=sa.text("state IN ('pending', 'running')"),
        )

    op.create_table(
        "transitions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host_id", sa.String(length=128), nullable=False),
        sa.Column("from_state", sa.String(length=32), nullable=True),
        sa.Column("to_state", sa.String(length=32), nullable=False),
        sa.Column("cause", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transitions")),
    )
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_transitions_host_id"), ["host_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_transitions_host_id"))

    op.drop_table("transitions")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_jobs_open_dedup",
            sqlite_where=sa.text("state IN ('pending', 'running')"),
            postgresql_where=sa.text("state IN ('pending', 'running')"),
        )
        batch_op.drop_index("ix_jobs_claim")

    op.drop_table("jobs")
    op.drop_table("images")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_hosts_state"))
        batch_op.drop_index(batch_op.f("ix_hosts_pool"))
        batch_op.drop_index(batch_op.f("ix_hosts_last_seen_at"))
        batch_op.drop_index(batch_op.f("ix_hosts_image_build_id"))

    op.drop_table("hosts")
    op.drop_table("host_keys")
    with op.batch_alter_table("fleet_events", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_fleet_events_open_kind",
            sqlite_where=sa.text("closed_at IS NULL"),
            postgresql_where=sa.text("closed_at IS NULL"),
        )

    op.drop_table("fleet_events")
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_findings_host_id"))

    op.drop_table("findings")
    with op.batch_alter_table("envelopes", schema=None) as batch_op:
        batch_op.drop_index("ix_envelopes_host_received")

    op.drop_table("envelopes")
    op.drop_table("enroll_tokens")
    op.drop_table("api_tokens")
