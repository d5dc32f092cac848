"""What an evaluation returns: one `MetricValue` per metric in an `EvaluationResult`, and the
names of the per-image fields its record holds.

The field names are shared by the evaluation that writes them and by the merge of shards
(`evaluator.shards`) that reads them back, so they are written down once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECORD_FIELDS", "EvaluationResult", "MetricValue"]


@dataclass
class MetricValue:
    """One metric: ``correct`` of ``total`` images (``images`` in the record, so that a
    subset is never read as the whole run). ``extra`` holds what is shown with the number
    (the vote's attacker model, the first-order gap to the grid); ``error`` replaces the
    number when the metric could not be measured."""

    correct: int
    total: int
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def accuracy(self) -> float | None:
        if self.error is not None:
            return None
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            # Counts of zero and no accuracy, so that readers of the counts need no special
            # case; the error says why there is no number.
            return {"accuracy": None, "correct": 0, "total": 0, "images": 0, "error": self.error}
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "images": self.total,
            **self.extra,
        }


@dataclass
class EvaluationResult:
    """Everything an evaluation measured. ``per_image`` holds one list per field, aligned with
    ``per_image["position"]``; -1 marks "not measured" (outside a subset or metric off).
    ``ablations`` maps each requested `Ablation` to its record (see `evaluator.summary`)."""

    benchmark: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, MetricValue]
    landscape: dict[str, Any] | None
    per_image: dict[str, list[int]]
    forward_passes: dict[str, int]
    cost: dict[str, Any]
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def accuracy(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return value.accuracy if value else None

    def to_dict(self, include_per_image: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "benchmark": self.benchmark,
            "config": self.config,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "landscape": self.landscape,
            "ablations": self.ablations,
            "forward_passes": self.forward_passes,
            "cost": self.cost,
        }
        if include_per_image:
            out["per_image"] = self.per_image
        return out


RECORD_FIELDS = (
    "label",
    "natural_pred",
    "random_correct",
    "worst_of_k_correct",
    "grid_robust",
    "grid_fool_point",
    "grid_fool_pred",
    "grid_fool_count",
    "vote_natural_correct",
    "grid_vote_robust",
    "grid_vote_per_query_robust",
    "grid_vote_transfer_correct",
    "grid_vote_transfer_point",
    "first_order_correct",
)
