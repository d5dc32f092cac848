"""The schema: users, API tokens, submissions, evaluations. SQLAlchemy 2.0, Postgres and SQLite.

Postgres is the source of truth for a submission's status; the broker only carries ids.
Relationships load explicitly (``lazy="raise"``): a query that needs related rows says so with
``selectinload``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.types import UtcDateTime

# The evaluator owns the vocabulary of model formats and training methods; the database stores
# their values.
from evaluator.vocabulary import ModelFormat, TrainingMethod


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


# Every constraint and index gets a predictable name, so later migrations can alter or drop it
# (on SQLite, batch mode rebuilds tables and needs the names).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: UtcDateTime()}


class SubmissionStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (
            SubmissionStatus.FINISHED,
            SubmissionStatus.FAILED,
            SubmissionStatus.CANCELLED,
        )


def _enum(cls: type[StrEnum], name: str) -> Enum:
    # Stored as the values ("queued"), checked by a constraint rather than a native enum type,
    # so adding a member needs no ALTER TYPE on Postgres.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    daily_limit: Mapped[int | None] = mapped_column(Integer, default=None)
    concurrent_limit: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", lazy="raise")
    submissions: Mapped[list[Submission]] = relationship(back_populates="owner", lazy="raise")


class ApiToken(Base):
    """A bearer token, stored as its sha256; the plain token is shown once at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64), default="default")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[User] = relationship(back_populates="tokens", lazy="raise")


class Submission(Base):
    __tablename__ = "submissions"
    __table_args__ = (
        # Each user's submission stands on its own: another user's private copy of the same
        # file is neither revealed nor shared (the stored file is still shared by hash).
        UniqueConstraint(
            "owner_id", "file_sha256", "benchmark", name="uq_submission_owner_file_benchmark"
        ),
        Index("ix_submissions_owner_created", "owner_id", "created_at"),
        Index("ix_submissions_status_heartbeat", "status", "heartbeat_at"),
        # Workers take the oldest queued job; the reaper re-publishes the oldest first.
        Index("ix_submissions_status_queued", "status", "queued_at"),
        Index("ix_submissions_benchmark_public_status", "benchmark", "is_public", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    display_name: Mapped[str] = mapped_column(String(200))
    benchmark: Mapped[str] = mapped_column(String(64))
    model_format: Mapped[ModelFormat] = mapped_column(_enum(ModelFormat, "model_format"))
    architecture: Mapped[str | None] = mapped_column(String(100), default=None)
    mean: Mapped[list[float] | None] = mapped_column(JSON, default=None)
    std: Mapped[list[float] | None] = mapped_column(JSON, default=None)
    training_method: Mapped[TrainingMethod] = mapped_column(
        _enum(TrainingMethod, "training_method"), default=TrainingMethod.STANDARD
    )
    extra_data: Mapped[bool] = mapped_column(Boolean, default=False)
    paper_url: Mapped[str | None] = mapped_column(String(500), default=None)
    description: Mapped[str | None] = mapped_column(Text, default=None)
    is_public: Mapped[bool] = mapped_column(Boolean, default=True)
    is_baseline: Mapped[bool] = mapped_column(Boolean, default=False)
    is_flagged: Mapped[bool] = mapped_column(Boolean, default=False)

    file_sha256: Mapped[str] = mapped_column(String(64))
    file_size: Mapped[int] = mapped_column(BigInteger)

    status: Mapped[SubmissionStatus] = mapped_column(
        _enum(SubmissionStatus, "submission_status"), default=SubmissionStatus.QUEUED
    )
    phase: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    forward_passes: Mapped[int] = mapped_column(BigInteger, default=0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    message: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    # A new random token per claim (see db.lifecycle): every write of a run is fenced by it, so
    # a worker that lost its claim, however it lost it, can change nothing.
    claim_token: Mapped[str | None] = mapped_column(String(32), default=None)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Its place in the queue: set when it is submitted or resubmitted, kept when its worker
    # died and it runs again.
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When its id was last handed to the broker; the reaper publishes again after a while.
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)

    owner: Mapped[User] = relationship(back_populates="submissions", lazy="raise")
    evaluation: Mapped[Evaluation | None] = relationship(
        back_populates="submission", lazy="raise", uselist=False
    )


class Resubmission(Base):
    """A failed or cancelled submission queued again by its owner: it counts towards the daily
    cap like a new one (the cap counts new submissions plus these)."""

    __tablename__ = "resubmissions"
    __table_args__ = (Index("ix_resubmissions_owner_created", "owner_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[str] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), index=True
    )
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """The result of a finished submission: one row, written in one transaction.

    Headline accuracies are columns (the leaderboard sorts on them); the landscape, per-image
    records, cost and config are JSON exactly as `evaluator.evaluate.EvaluationResult.to_dict`
    gives them.
    """

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_benchmark_grid", "benchmark", "grid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[str] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), unique=True
    )
    benchmark: Mapped[str] = mapped_column(String(64))
    natural: Mapped[float | None] = mapped_column(Float, default=None)
    random: Mapped[float | None] = mapped_column(Float, default=None)
    worst_of_k: Mapped[float | None] = mapped_column(Float, default=None)
    grid: Mapped[float | None] = mapped_column(Float, default=None)
    vote_natural: Mapped[float | None] = mapped_column(Float, default=None)
    grid_vote: Mapped[float | None] = mapped_column(Float, default=None)
    first_order: Mapped[float | None] = mapped_column(Float, default=None)
    images: Mapped[int] = mapped_column(Integer, default=0)
    # {"natural": {"accuracy", "correct", "total"}, ...}
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    landscape: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    per_image: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # Example images for the model page: [{"index", "label", "pred", "fool_pred", "point"...}]
    examples: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    forward_passes: Mapped[int] = mapped_column(BigInteger, default=0)
    wall_time_s: Mapped[float] = mapped_column(Float, default=0.0)
    device: Mapped[str] = mapped_column(String(200), default="")
    precision: Mapped[str] = mapped_column(String(16), default="fp32")
    seed: Mapped[int] = mapped_column(Integer, default=0)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cost: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Exactly what the run was computed with (model file, format, architecture, mean/std,
    # benchmark, image limit, claim token; see db.lifecycle.JobConfig): the result and the
    # submission's settings can be compared, never silently disagree.
    job: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    submission: Mapped[Submission] = relationship(back_populates="evaluation", lazy="raise")


class ShardStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


class Shard(Base):
    """One range of a running submission's evaluation order, which any worker may take.

    A run's shards are planned when its submission is claimed (``run_token`` is that claim's
    token, so the shards of an earlier run are never mistaken for this one's). A shard's
    transitions live in `db.shards`: queued -> running -> done, and running -> queued when its
    worker stops (re-run alone). A done shard's result lies in the storage under ``result_key``.
    """

    __tablename__ = "shards"
    __table_args__ = (Index("ix_shards_status_submission", "status", "submission_id"),)

    submission_id: Mapped[str] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_token: Mapped[str] = mapped_column(String(32))
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    status: Mapped[ShardStatus] = mapped_column(
        _enum(ShardStatus, "shard_status"), default=ShardStatus.QUEUED
    )
    claim_token: Mapped[str | None] = mapped_column(String(32), default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    forward_passes: Mapped[int] = mapped_column(BigInteger, default=0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    result_key: Mapped[str | None] = mapped_column(String(200), default=None)
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
