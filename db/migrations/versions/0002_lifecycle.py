"""One owner of a submission's lifecycle: claim tokens, queue order, publish times, the job a
result was computed with, per-owner uniqueness, resubmissions counted by the daily cap; and
the first-order accuracy as a column.

A migration is a frozen record of one schema change, never edited afterwards nor shared with
later code, which is why its table shapes repeat those of other migrations (the duplicates
tool flags them).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 18:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("submissions", schema=None) as batch:
        batch.add_column(sa.Column("claim_token", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint("uq_submission_file_benchmark", type_="unique")
        batch.create_unique_constraint(
            "uq_submission_owner_file_benchmark", ["owner_id", "file_sha256", "benchmark"]
        )
    # Existing rows keep their place: the queue order of a row is when it was created.
    op.execute("UPDATE submissions SET queued_at = created_at")
    with op.batch_alter_table("submissions", schema=None) as batch:
        batch.alter_column("queued_at", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.create_index("ix_submissions_status_queued", ["status", "queued_at"], unique=False)

    with op.batch_alter_table("evaluations", schema=None) as batch:
        batch.add_column(sa.Column("first_order", sa.Float(), nullable=True))
        batch.add_column(sa.Column("job", sa.JSON(), nullable=True))

    op.create_table(
        "resubmissions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("submission_id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["users.id"],
            name=op.f("fk_resubmissions_owner_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["submissions.id"],
            name=op.f("fk_resubmissions_submission_id_submissions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_resubmissions")),
    )
    with op.batch_alter_table("resubmissions", schema=None) as batch:
        batch.create_index(
            "ix_resubmissions_owner_created", ["owner_id", "created_at"], unique=False
        )
        batch.create_index(
            batch.f("ix_resubmissions_submission_id"), ["submission_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("resubmissions", schema=None) as batch:
        batch.drop_index(batch.f("ix_resubmissions_submission_id"))
        batch.drop_index("ix_resubmissions_owner_created")
    op.drop_table("resubmissions")

    with op.batch_alter_table("evaluations", schema=None) as batch:
        batch.drop_column("job")
        batch.drop_column("first_order")

    # Per-owner copies of one file would violate the old constraint: keep the oldest of each.
    op.execute(
        "DELETE FROM submissions WHERE id IN (SELECT s.id FROM submissions s JOIN submissions o "
        "ON o.file_sha256 = s.file_sha256 AND o.benchmark = s.benchmark "
        "AND (o.created_at < s.created_at OR (o.created_at = s.created_at AND o.id < s.id)))"
    )
    with op.batch_alter_table("submissions", schema=None) as batch:
        batch.drop_index("ix_submissions_status_queued")
        batch.drop_constraint("uq_submission_owner_file_benchmark", type_="unique")
        batch.create_unique_constraint("uq_submission_file_benchmark", ["file_sha256", "benchmark"])
        batch.drop_column("published_at")
        batch.drop_column("queued_at")
        batch.drop_column("claim_token")
