"""The one SQLAlchemy Core schema both backends share; alembic migrations follow it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

Id = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on SQLite (naive text) as on PostgreSQL (timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


hosts = Table(
    "hosts",
    metadata,
    Column("host_id", String(128), primary_key=True),
    Column("state", String(32), nullable=False, index=True),
    Column("state_since", UtcDateTime, nullable=False),
    Column("state_cause", String(64), nullable=False),
    Column("resume_state", String(32)),
    Column("key_id", String(64), nullable=False),
    Column("public_key", LargeBinary, nullable=False),
    Column("hostname", String(255), nullable=False),
    Column("pool", String(128), index=True),
    Column("boot_id", String(128), nullable=False),
    Column("agent_version", String(64), nullable=False),
    Column("image_build_id", String(255), index=True),
    Column("image_root", String(128)),
    Column("cloud_image_id", String(255)),
    Column("measured_root", String(128)),
    Column("enrolled_at", UtcDateTime, nullable=False),
    Column("last_seen_at", UtcDateTime, index=True),
    Column("envelopes", BigInteger, nullable=False),
    Column("health", JSON, nullable=False),
    Column("facts", JSON, nullable=False),
    Column("rekey_allowed_by", String(255)),
    Column("refused_key_id", String(64)),
)

host_keys = Table(
    "host_keys",
    metadata,
    Column("host_id", String(128), primary_key=True),
    Column("key_id", String(64), primary_key=True),
    Column("public_key", LargeBinary, nullable=False),
    Column("enrolled_at", UtcDateTime, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_digest", String(64), nullable=False),
)

envelopes = Table(
    "envelopes",
    metadata,
    Column("host_id", String(128), primary_key=True),
    Column("key_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("boot_id", String(128), nullable=False),
    Column("time", String(40), nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("body", JSON, nullable=False),
    Index("ix_envelopes_host_received", "host_id", "received_at"),
)

findings = Table(
    "findings",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("host_id", String(128), nullable=False, index=True),
    Column("seq", BigInteger, nullable=False),
    Column("source", String(32), nullable=False),
    Column("type", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("drift", Boolean, nullable=False),
    Column("path", Text),
    Column("at", UtcDateTime, nullable=False),
    Column("detail", JSON, nullable=False),
)

transitions = Table(
    "transitions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("host_id", String(128), nullable=False, index=True),
    Column("from_state", String(32)),
    Column("to_state", String(32), nullable=False),
    Column("cause", String(64), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("evidence", JSON, nullable=False),
)

_OPEN = text("state IN ('pending', 'running')")
jobs = Table(
    "jobs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(64), nullable=False),
    Column("dedup_key", String(512), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    Column("claimed_by", String(255)),
    Column("lease_until", UtcDateTime),
    Column("last_error", Text),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index(
        "uq_jobs_open_dedup",
        "kind",
        "dedup_key",
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    ),
    Index("ix_jobs_claim", "kind", "state", "next_attempt_at"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime),
)

enroll_tokens = Table(
    "enroll_tokens",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("note", String(255), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime),
    Column("uses_left", Integer),
    Column("uses", Integer, nullable=False),
    Column("revoked_at", UtcDateTime),
    Column("pool", String(128)),
)

images = Table(
    "images",
    metadata,
    Column("build_id", String(255), primary_key=True),
    Column("root", String(128), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("policy_digest", String(128), nullable=False),
    Column("created", String(40), nullable=False),
    Column("registered_at", UtcDateTime, nullable=False),
    Column("statement", JSON, nullable=False),
)

_UNCLOSED = text("closed_at IS NULL")
fleet_events = Table(
    "fleet_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(64), nullable=False),
    Column("opened_at", UtcDateTime, nullable=False),
    Column("closed_at", UtcDateTime),
    Column("detail", JSON, nullable=False),
    Index(
        "uq_fleet_events_open_kind",
        "kind",
        unique=True,
        sqlite_where=_UNCLOSED,
        postgresql_where=_UNCLOSED,
    ),
)

# --- response: replacements and their safety rails, incidents, break-glass ------------------

_OPEN_REPLACEMENT = text("state IN ('blocked', 'acting', 'verifying')")
replacements = Table(
    "replacements",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("host_id", String(128), nullable=False, index=True),
    Column("pool", String(128)),
    Column("state", String(16), nullable=False),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("action", String(64)),
    Column("cause", String(64), nullable=False),
    Column("requests", Integer, nullable=False),
    Column("blocked_by", String(32)),
    Column("blocked_reason", Text),
    Column("lease_until", UtcDateTime),
    Column("acted_at", UtcDateTime),
    Column("outcome", JSON, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index(
        "uq_replacements_open_host",
        "host_id",
        unique=True,
        sqlite_where=_OPEN_REPLACEMENT,
        postgresql_where=_OPEN_REPLACEMENT,
    ),
)

_UNRELEASED = text("released_at IS NULL")
holds = Table(
    "holds",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("scope", String(16), nullable=False),
    Column("target", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("actor", String(255), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("detail", JSON, nullable=False),
    Column("released_at", UtcDateTime),
    Column("released_by", String(255)),
    Column("release_reason", Text),
    Index(
        "uq_holds_open",
        "scope",
        "target",
        "kind",
        unique=True,
        sqlite_where=_UNRELEASED,
        postgresql_where=_UNRELEASED,
    ),
)

drift_marks = Table(
    "drift_marks",
    metadata,
    Column("host_id", String(128), primary_key=True),
    Column("signature", String(64), primary_key=True),
    Column("pool", String(128)),
    Column("image", String(255)),
    Column("fresh", Boolean, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Index("ix_drift_marks_pool_at", "pool", "at"),
)

incidents = Table(
    "incidents",
    metadata,
    Column("dedup_key", String(255), primary_key=True),
    Column("host_id", String(128), index=True),
    Column("pool", String(128)),
    Column("cause", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("alert", JSON, nullable=False),
    Column("sent", JSON, nullable=False),
    Column("opened_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

breakglass = Table(
    "breakglass",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("host_id", String(128), nullable=False, index=True),
    Column("login_user", String(64), nullable=False),
    Column("actor", String(255), nullable=False),
    Column("operator", String(255), nullable=False),
    Column("reason", Text, nullable=False),
    Column("ticket", String(255)),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("login_at", UtcDateTime),
    Column("login", JSON, nullable=False),
    Column("ended_at", UtcDateTime),
    Column("ended_by", String(64)),
)

decisions = Table(
    "decisions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("host_id", String(128), index=True),
    Column("pool", String(128), index=True),
    Column("decision", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("actor", String(255), nullable=False),
    Column("detail", JSON, nullable=False),
)
