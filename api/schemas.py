"""The API's types: what clients send and what they get back (separate from the ORM rows)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationInfo,
    field_validator,
    model_validator,
)

from api.services.ablations import evaluation_ablations
from api.urls import submission_path
from db.models import Base, Evaluation, Submission, SubmissionStatus
from evaluator.vocabulary import MetricKey, ModelFormat, TrainingMethod

__all__ = [
    "ArchitecturePublic",
    "BenchmarkPublic",
    "EvaluationPublic",
    "LeaderboardPage",
    "LeaderboardRow",
    "MePublic",
    "Metrics",
    "SortKey",
    "SortOrder",
    "SubmissionAccepted",
    "SubmissionCreate",
    "SubmissionList",
    "SubmissionPublic",
]


class _Public(BaseModel):
    """A response validated from ORM rows: ``model_validate(row, from_attributes=True)``."""

    model_config = ConfigDict(from_attributes=True)


def _columns(row: Base, names: Iterable[str]) -> dict[str, Any]:
    """The values of ``row``'s columns that a schema has fields of the same name for."""
    table = row.__table__
    return {name: getattr(row, name) for name in names if name in table.c}


def _accuracy(details: dict[str, Any], key: str) -> float | None:
    value = details.get(key)
    return value.get("accuracy") if isinstance(value, dict) else None


# --- Submissions ----------------------------------------------------------------------------


def _floats(value: Any) -> list[float] | None:
    """``"0.5,0.5,0.5"``, ``"[0.5, 0.5, 0.5]"`` or a list; empty means not given."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list of numbers ({exc.msg})") from None
        else:
            value = text.split(",")
    if not isinstance(value, list) or not value:
        raise ValueError("give one number per channel, comma-separated or as a JSON list")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError("give one number per channel, comma-separated or as a JSON list") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("values must be finite numbers")
    return numbers


# Normalisation divides float32 images in [0, 1]: a std below MIN_STD divides by (nearly)
# zero (1e-320 is 0 in float32), and values past these bounds are typos, not statistics.
MIN_STD = 1e-6
MAX_STD = 1e3
MAX_ABS_MEAN = 1e3


class SubmissionCreate(BaseModel):
    """The metadata of an upload (the multipart form's text fields)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    display_name: str = Field(min_length=1, max_length=200)
    benchmark: str = Field(min_length=1, max_length=64)
    architecture: str | None = Field(default=None, max_length=100)
    mean: list[float] | None = None
    std: list[float] | None = None
    training_method: TrainingMethod = TrainingMethod.STANDARD
    extra_data: bool = False
    paper_url: HttpUrl | None = None
    description: str | None = Field(default=None, max_length=10_000)
    is_public: bool = True

    @field_validator("architecture", "paper_url", "description", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _parse_floats(cls, value: Any) -> list[float] | None:
        return _floats(value)

    @field_validator("mean")
    @classmethod
    def _sensible_mean(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(abs(m) > MAX_ABS_MEAN for m in value):
            raise ValueError(
                f"mean values must lie between {-MAX_ABS_MEAN:g} and {MAX_ABS_MEAN:g} (images "
                f"are in [0, 1] before normalisation); got {value}"
            )
        return value

    @field_validator("std")
    @classmethod
    def _sensible_std(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(MIN_STD <= s <= MAX_STD for s in value):
            raise ValueError(
                f"std values must be positive, between {MIN_STD:g} and {MAX_STD:g}: they divide "
                f"float32 images in [0, 1]; got {value}"
            )
        return value

    @field_validator("paper_url")
    @classmethod
    def _short_url(cls, value: HttpUrl | None) -> HttpUrl | None:
        if value is not None and len(str(value)) > 500:
            raise ValueError("at most 500 characters")
        return value

    @model_validator(mode="after")
    def _mean_and_std(self) -> SubmissionCreate:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std for input normalisation, or neither")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std):
                raise ValueError(
                    f"mean has {len(self.mean)} values and std {len(self.std)}; give one per "
                    "channel in both"
                )
        return self


class Metrics(BaseModel):
    """The headline accuracies (fractions in [0, 1]; None when not measured), one field per
    `evaluator.vocabulary.MetricKey`, in its order. ``grid_vote``
    is the vote under the ``adaptive`` attacker; ``grid_vote_per_query`` and
    ``grid_vote_transfer`` under the other two attacker models (their one-sentence
    descriptions and image counts are in `EvaluationPublic.details`)."""

    natural: float | None = None
    random: float | None = None
    worst_of_k: float | None = None
    grid: float | None = None
    vote_natural: float | None = None
    grid_vote: float | None = None
    grid_vote_per_query: float | None = None
    grid_vote_transfer: float | None = None
    first_order: float | None = None


class EvaluationPublic(_Public):
    benchmark: str
    metrics: Metrics
    # Per metric: {"accuracy", "correct", "total", "images", ...}, as the evaluator reports
    # them (the vote's "protocol" and "attacker", first-order's "gap_to_grid" or "error").
    details: dict[str, Any]
    # Per ablation ("rotation-only", ...): {"label", "grid", "fill", "canvas", "images",
    # "correct", "accuracy", "natural", ...} or {..., "error"}; empty when none was run.
    ablations: dict[str, Any] = {}
    images: int
    landscape: dict[str, Any] | None
    examples: list[Any] | None
    forward_passes: int
    wall_time_s: float
    device: str
    precision: str
    seed: int
    versions: dict[str, Any]
    config: dict[str, Any]
    cost: dict[str, Any]
    created_at: datetime

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, data: Any) -> Any:
        """An `Evaluation` row keeps the per-metric records in its ``metrics`` JSON (``details``
        here); a headline accuracy is its column where it has one, else the accuracy in that
        JSON (the vote's per-query and transfer attackers)."""
        if not isinstance(data, Evaluation):
            return data
        details = data.metrics or {}
        metrics = {
            key: getattr(data, key) if key in Evaluation.__table__.c else _accuracy(details, key)
            for key in Metrics.model_fields
        }
        return _columns(data, cls.model_fields) | {
            "metrics": metrics,
            "details": data.metrics,
            "ablations": evaluation_ablations(data),
        }


class SubmissionPublic(_Public):
    id: str
    status_url: str
    owner: str
    display_name: str
    benchmark: str
    model_format: ModelFormat
    architecture: str | None
    mean: list[float] | None
    std: list[float] | None
    training_method: TrainingMethod
    extra_data: bool
    paper_url: str | None
    description: str | None
    is_public: bool
    is_baseline: bool
    file_sha256: str
    file_size: int
    status: SubmissionStatus
    phase: str | None
    progress: float
    forward_passes: int
    eta_seconds: float | None
    message: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    evaluation: EvaluationPublic | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, data: Any, info: ValidationInfo) -> Any:
        """A `Submission` row loaded with its owner and evaluation: its columns, the owner's
        name, the evaluation only once finished (an earlier run's row stays until a new result
        replaces it), and ``status_url`` under the ``base_url`` of the validation context
        (absolute when the caller gives the request's)."""
        if not isinstance(data, Submission):
            return data
        base_url = (info.context or {}).get("base_url", "")
        finished = data.status is SubmissionStatus.FINISHED
        return _columns(data, cls.model_fields) | {
            "status_url": base_url + submission_path(data.id),
            "owner": data.owner.name,
            "evaluation": data.evaluation if finished else None,
        }


class SubmissionAccepted(SubmissionPublic):
    """The answer to an upload: the submission, and whether it already existed."""

    duplicate: bool = False


class SubmissionList(BaseModel):
    items: list[SubmissionPublic]
    total: int
    limit: int
    offset: int


# --- Benchmarks and architectures ---------------------------------------------------------


class BenchmarkPublic(BaseModel):
    name: str
    title: str
    dataset: str
    split: str
    num_classes: int
    channels: int
    image_size: list[int]
    max_rotation: float
    max_translation: list[float]
    grid: list[int]
    grid_points: int
    fill: str
    seed: int
    worst_of_k: int
    vote_samples: int
    vote_subset: int | None
    landscape_subset: int | None
    description: str
    # Registry architectures whose input fits this benchmark's images.
    architectures: list[str]
    leaderboard_url: str


class ArchitecturePublic(BaseModel):
    name: str
    description: str
    input_size: list[int]
    in_channels: int
    default_num_classes: int
    # Benchmarks whose images fit this architecture's input.
    benchmarks: list[str]


class MePublic(BaseModel):
    name: str
    is_admin: bool
    daily_limit: int | None
    concurrent_limit: int | None
    submissions_last_24h: int
    active_submissions: int


# --- Leaderboard ----------------------------------------------------------------------------


class SortKey(StrEnum):
    """What the leaderboard can be sorted by: one of its metric columns
    (`evaluator.vocabulary.BOARD_METRICS`, whose keys these are), the submission time or the
    name."""

    NATURAL = MetricKey.NATURAL.value
    RANDOM = MetricKey.RANDOM.value
    WORST_OF_K = MetricKey.WORST_OF_K.value
    GRID = MetricKey.GRID.value
    VOTE_NATURAL = MetricKey.VOTE_NATURAL.value
    GRID_VOTE = MetricKey.GRID_VOTE.value
    FIRST_ORDER = MetricKey.FIRST_ORDER.value
    CREATED_AT = "created_at"
    NAME = "name"


class SortOrder(StrEnum):
    ASC = "asc"
    DESC = "desc"


class LeaderboardRow(BaseModel):
    rank: int
    submission_id: str
    display_name: str
    owner: str
    architecture: str | None
    model_format: ModelFormat
    training_method: TrainingMethod
    extra_data: bool
    paper_url: str | None
    is_baseline: bool
    natural: float | None
    random: float | None
    worst_of_k: float | None
    grid: float | None
    vote_natural: float | None
    grid_vote: float | None
    first_order: float | None = None
    images: int
    created_at: datetime
    finished_at: datetime | None


class LeaderboardPage(BaseModel):
    benchmark: str
    sort: SortKey
    order: SortOrder
    page: int
    per_page: int
    total: int
    rows: list[LeaderboardRow]

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))
