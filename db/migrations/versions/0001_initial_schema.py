"""The initial schema: users, API tokens, submissions, evaluations (db/models.py at 0.1.0).

A migration is a frozen record of one schema change, never edited afterwards nor shared with
later code, which is why its table shapes repeat those of other migrations (the duplicates
tool flags them).

Revision ID: 0001
Revises:
Create Date: 2026-11-25 00:48:38.524272
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("daily_limit", sa.Integer(), nullable=True),
        sa.Column("concurrent_limit", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_user_id"), "api_tokens", ["user_id"], unique=False)
    op.create_table(
        "submissions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column("benchmark", sa.String(length=64), nullable=False),
        sa.Column(
            "model_format",
            sa.Enum(
                "safetensors",
                "export",
                name="model_format",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("architecture", sa.String(length=100), nullable=True),
        sa.Column("mean", sa.JSON(), nullable=True),
        sa.Column("std", sa.JSON(), nullable=True),
        sa.Column(
            "training_method",
            sa.Enum(
                "standard",
                "augmentation",
                "worst-of-k",
                "other",
                name="training_method",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("extra_data", sa.Boolean(), nullable=False),
        sa.Column("paper_url", sa.String(length=500), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("is_public", sa.Boolean(), nullable=False),
        sa.Column("is_baseline", sa.Boolean(), nullable=False),
        sa.Column("is_flagged", sa.Boolean(), nullable=False),
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "finished",
                "failed",
                "cancelled",
                name="submission_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("phase", sa.String(length=32), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("forward_passes", sa.BigInteger(), nullable=False),
        sa.Column("eta_seconds", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_submissions_owner_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_submissions")),
        sa.UniqueConstraint("file_sha256", "benchmark", name="uq_submission_file_benchmark"),
    )
    op.create_index(
        "ix_submissions_benchmark_public_status",
        "submissions",
        ["benchmark", "is_public", "status"],
        unique=False,
    )
    op.create_index(
        "ix_submissions_owner_created", "submissions", ["owner_id", "created_at"], unique=False
    )
    op.create_index(
        "ix_submissions_status_heartbeat", "submissions", ["status", "heartbeat_at"], unique=False
    )
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("submission_id", sa.String(length=32), nullable=False),
        sa.Column("benchmark", sa.String(length=64), nullable=False),
        sa.Column("natural", sa.Float(), nullable=True),
        sa.Column("random", sa.Float(), nullable=True),
        sa.Column("worst_of_k", sa.Float(), nullable=True),
        sa.Column("grid", sa.Float(), nullable=True),
        sa.Column("vote_natural", sa.Float(), nullable=True),
        sa.Column("grid_vote", sa.Float(), nullable=True),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("landscape", sa.JSON(), nullable=True),
        sa.Column("per_image", sa.JSON(), nullable=True),
        sa.Column("examples", sa.JSON(), nullable=True),
        sa.Column("forward_passes", sa.BigInteger(), nullable=False),
        sa.Column("wall_time_s", sa.Float(), nullable=False),
        sa.Column("device", sa.String(length=200), nullable=False),
        sa.Column("precision", sa.String(length=16), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("cost", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["submissions.id"],
            name=op.f("fk_evaluations_submission_id_submissions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
        sa.UniqueConstraint("submission_id", name=op.f("uq_evaluations_submission_id")),
    )
    op.create_index(
        "ix_evaluations_benchmark_grid", "evaluations", ["benchmark", "grid"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_evaluations_benchmark_grid", table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_index("ix_submissions_status_heartbeat", table_name="submissions")
    op.drop_index("ix_submissions_owner_created", table_name="submissions")
    op.drop_index("ix_submissions_benchmark_public_status", table_name="submissions")
    op.drop_table("submissions")
    op.drop_index(op.f("ix_api_tokens_user_id"), table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("users")
