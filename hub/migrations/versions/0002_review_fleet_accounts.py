"""Review, fleet and accounts: users, api_tokens, web_sessions, labels, reviews,
defect_classes, agents; samples gain max_score, reviewed_at, reviewed_by.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
QUEUE_INDEXES: tuple[tuple[str, list[str], list[str]], ...] = (  # name, leading columns, INCLUDE (PostgreSQL)
    ("ix_samples_station_id_capture_ts", ["station_id"], ["status", "max_score", "camera", "reason"]),
    ("ix_samples_status_capture_ts", ["status"], ["station_id", "max_score", "camera", "reason"]),
    ("ix_samples_capture_ts", [], ["station_id", "status", "max_score", "camera", "reason"]),
)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
    )
    op.create_index(op.f("ix_api_tokens_user_id"), "api_tokens", ["user_id"])
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_web_sessions_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_sessions")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_web_sessions_token_sha256")),
    )
    op.create_index(op.f("ix_web_sessions_user_id"), "web_sessions", ["user_id"])
    op.create_index(op.f("ix_web_sessions_expires_at"), "web_sessions", ["expires_at"])

    with op.batch_alter_table("samples") as b:
        b.add_column(sa.Column("max_score", sa.Float(), server_default="0", nullable=False))
        b.add_column(sa.Column("reviewed_at", TS, nullable=True))
        b.add_column(sa.Column("reviewed_by", sa.Integer(), nullable=True))
        b.create_foreign_key(op.f("fk_samples_reviewed_by_users"), "users", ["reviewed_by"], ["id"],
                             ondelete="SET NULL")
    for name in ("ix_samples_station_id_capture_ts", "ix_samples_status_capture_ts"):
        op.drop_index(name, table_name="samples")
    op.execute("UPDATE samples SET max_score = COALESCE("
               "(SELECT MAX(score) FROM detections WHERE detections.sample_pk = samples.id), 0)")
    # The review queue's indexes (see hub/tables.py): in the queue's order, covering its filters.
    for name, lead, include in QUEUE_INDEXES:
        op.create_index(name, "samples", [*lead, "capture_ts", "id"], postgresql_include=include)
    op.drop_index(op.f("ix_detections_cls"), table_name="detections")
    op.create_index("ix_detections_cls_sample_pk", "detections", ["cls", "sample_pk"])

    op.create_table(
        "labels",
        sa.Column("id", BigId, nullable=False),
        sa.Column("sample_pk", BigId, nullable=False),
        sa.Column("cls", sa.String(length=64), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["sample_pk"], ["samples.id"], name=op.f("fk_labels_sample_pk_samples"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
    )
    op.create_index(op.f("ix_labels_sample_pk"), "labels", ["sample_pk"])
    op.create_table(
        "reviews",
        sa.Column("id", BigId, nullable=False),
        sa.Column("sample_pk", BigId, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("status_before", sa.String(length=16), nullable=False),
        sa.Column("status_after", sa.String(length=16), nullable=False),
        sa.Column("boxes_json", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["sample_pk"], ["samples.id"], name=op.f("fk_reviews_sample_pk_samples"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_reviews_user_id_users"),
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
    )
    op.create_index(op.f("ix_reviews_sample_pk"), "reviews", ["sample_pk"])
    op.create_index(op.f("ix_reviews_created_at"), "reviews", ["created_at"])
    op.create_table(
        "defect_classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_defect_classes")),
        sa.UniqueConstraint("name", name=op.f("uq_defect_classes_name")),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("station_id", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="unknown", nullable=False),
        sa.Column("model_version", sa.String(length=64), server_default="", nullable=False),
        sa.Column("status_ts", TS, nullable=True),
        sa.Column("heartbeat_ts", TS, nullable=True),
        sa.Column("last_seen", TS, nullable=False),
        sa.Column("fps", sa.Float(), server_default="0", nullable=False),
        sa.Column("latency_p99_ms", sa.Float(), server_default="0", nullable=False),
        sa.Column("dropped_frames", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("outbox_depth", sa.Integer(), server_default="0", nullable=False),
        sa.Column("uptime_s", sa.Float(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["station_id"], ["stations.id"], name=op.f("fk_agents_station_id_stations"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("station_id", "agent_id", name=op.f("uq_agents_station_id_agent_id")),
    )


def downgrade() -> None:
    op.drop_table("agents")
    op.drop_table("defect_classes")
    op.drop_table("reviews")
    op.drop_table("labels")
    op.drop_index("ix_detections_cls_sample_pk", table_name="detections")
    op.create_index(op.f("ix_detections_cls"), "detections", ["cls"])
    for name, _, _ in QUEUE_INDEXES:
        op.drop_index(name, table_name="samples")
    op.create_index("ix_samples_station_id_capture_ts", "samples", ["station_id", "capture_ts"])
    op.create_index("ix_samples_status_capture_ts", "samples", ["status", "capture_ts"])
    with op.batch_alter_table("samples") as b:
        b.drop_constraint(op.f("fk_samples_reviewed_by_users"), type_="foreignkey")
        b.drop_column("reviewed_by")
        b.drop_column("reviewed_at")
        b.drop_column("max_score")
    op.drop_table("web_sessions")
    op.drop_table("api_tokens")
    op.drop_table("users")
