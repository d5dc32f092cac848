"""The closed vocabularies that the evaluator shares with the service: the model formats it
loads, the training methods a model is described by, and the metrics it reports. Their values
are stored with every submission and result, so they never change. A leaf module (no torch),
so the database layer, the API and the command-line client can import it without loading the
library.

The metrics' names and descriptions are written here once. Those that state a benchmark's
numbers (the k of worst-of-k, the grid's size, the vote's samples) are built from the
benchmark they describe (`BenchmarkCounts`), never from the built-in benchmarks' numbers: an
operator's benchmark may have a 5 x 3 x 3 grid and worst-of-4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "BOARD_METRICS",
    "METRIC_FIELDS",
    "METRIC_KEYS",
    "VOTE_ATTACKER_KEYS",
    "BenchmarkCounts",
    "MetricKey",
    "MetricText",
    "ModelFormat",
    "TrainingMethod",
    "ablation_fields",
    "metric_texts",
]


class ModelFormat(StrEnum):
    """The model file formats SpatialBench accepts."""

    SAFETENSORS = "safetensors"
    EXPORT = "export"  # a torch.export archive (.pt2)


class TrainingMethod(StrEnum):
    """How a model was trained: the submission API's and the database's ``training_method``.
    ``OTHER`` only describes a submission; `evaluator.train` trains with the rest."""

    STANDARD = "standard"
    AUGMENTATION = "augmentation"
    WORST_OF_K = "worst-of-k"
    OTHER = "other"


class MetricKey(StrEnum):
    """The key of each metric in a result's ``metrics``, and the name of its database column
    and API field where it has one; in the order results list them."""

    NATURAL = "natural"
    RANDOM = "random"
    WORST_OF_K = "worst_of_k"
    GRID = "grid"
    VOTE_NATURAL = "vote_natural"
    # Grid + vote under each attacker model; the unqualified one is the adaptive attacker,
    # the leaderboard's headline for the defense.
    GRID_VOTE = "grid_vote"
    GRID_VOTE_PER_QUERY = "grid_vote_per_query"
    GRID_VOTE_TRANSFER = "grid_vote_transfer"
    FIRST_ORDER = "first_order"


METRIC_KEYS: tuple[MetricKey, ...] = tuple(MetricKey)

# The grid + vote key of each attacker model, by the name results record it under (the values
# of `evaluator.attacks.VoteProtocol`), in display order.
VOTE_ATTACKER_KEYS: dict[str, MetricKey] = {
    "adaptive": MetricKey.GRID_VOTE,
    "per-query": MetricKey.GRID_VOTE_PER_QUERY,
    "transfer": MetricKey.GRID_VOTE_TRANSFER,
}

# The leaderboard's metric columns, in its order. Grid + vote is there only under the adaptive
# attacker; the other attacker models are on a submission's page.
BOARD_METRICS: tuple[MetricKey, ...] = (
    MetricKey.NATURAL,
    MetricKey.RANDOM,
    MetricKey.WORST_OF_K,
    MetricKey.GRID,
    MetricKey.FIRST_ORDER,
    MetricKey.VOTE_NATURAL,
    MetricKey.GRID_VOTE,
)

# The per-image field behind each metric: 1 where the image counts (correct, or robust), 0
# where it does not, -1 where it was not measured (outside a subset, or the metric off).
METRIC_FIELDS: dict[MetricKey, str] = {
    MetricKey.NATURAL: "natural_correct",
    MetricKey.RANDOM: "random_correct",
    MetricKey.WORST_OF_K: "worst_of_k_correct",
    MetricKey.GRID: "grid_robust",
    MetricKey.VOTE_NATURAL: "vote_natural_correct",
    MetricKey.GRID_VOTE: "grid_vote_robust",
    MetricKey.GRID_VOTE_PER_QUERY: "grid_vote_per_query_robust",
    MetricKey.GRID_VOTE_TRANSFER: "grid_vote_transfer_correct",
    MetricKey.FIRST_ORDER: "first_order_correct",
}


def ablation_fields(ablation: str) -> tuple[str, str]:
    """The per-image fields of an ablation (by its name, ``rotation-only``): robust under its
    grid, and correct at its identity."""
    key = ablation.replace("-", "_")
    return f"ablation_{key}_robust", f"ablation_{key}_natural"


def _count(value: Any) -> int | None:
    # Stored JSON is read back leniently: a missing or malformed number is "unknown".
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value != int(value) or value < 1:
        return None
    return int(value)


@dataclass(frozen=True)
class BenchmarkCounts:
    """The numbers of a benchmark that its metrics' names and descriptions state."""

    worst_of_k: int
    grid_points: int
    vote_samples: int

    @classmethod
    def of(cls, record: Mapping[str, Any] | None) -> BenchmarkCounts | None:
        """The counts in a benchmark's record (``BenchmarkSpec.to_dict()``, the API's
        benchmark) or in an evaluation's ``config`` (which has the grid's shape, not its
        size); None when any of them is missing or malformed."""
        if not isinstance(record, Mapping):
            return None
        points = _count(record.get("grid_points"))
        shape = record.get("grid")
        if points is None and isinstance(shape, list) and shape:
            sizes = [_count(n) for n in shape]
            points = None if None in sizes else math.prod(n for n in sizes if n is not None)
        k, votes = _count(record.get("worst_of_k")), _count(record.get("vote_samples"))
        if points is None or k is None or votes is None:
            return None
        return cls(worst_of_k=k, grid_points=points, vote_samples=votes)


@dataclass(frozen=True)
class MetricText:
    """What a reader is told about one metric: ``label`` heads a column or a card
    ("Worst-of-10"), ``short`` names it in running text and on the command line
    ("worst-of-10"), ``description`` says what it measures in a sentence or two."""

    key: MetricKey
    label: str
    short: str
    description: str


def metric_texts(counts: BenchmarkCounts | None) -> dict[MetricKey, MetricText]:
    """Every metric's text, in `MetricKey` order, with the numbers of the benchmark whose
    results it describes; ``counts=None`` (results of several benchmarks, or a record without
    them) words the same texts without numbers ("worst-of-k", "every grid point")."""
    k = str(counts.worst_of_k) if counts else "k"
    every_point = (
        f"every one of the {counts.grid_points:,} grid points" if counts else "every grid point"
    )
    all_points = f"all {counts.grid_points:,} grid points" if counts else "all the grid points"
    draws = f"{counts.vote_samples} random transformations" if counts else "random transformations"
    texts = (
        MetricText(
            MetricKey.NATURAL, "Natural", "natural",
            "Accuracy on the untransformed test images.",
        ),
        MetricText(
            MetricKey.RANDOM, "Random", "random",
            "Accuracy when each image is rotated and translated by one transformation drawn "
            "uniformly from the box.",
        ),
        MetricText(
            MetricKey.WORST_OF_K, f"Worst-of-{k}", f"worst-of-{k}",
            f"An image counts only if it is classified correctly under all {k} independent "
            "uniform draws: a cheap random-search attack.",
        ),
        MetricText(
            MetricKey.GRID, "Grid", "grid",
            "The headline number. An image counts only if it is classified correctly at "
            f"{every_point}: the exhaustive attack.",
        ),
        MetricText(
            MetricKey.VOTE_NATURAL, "Vote", "vote",
            f"The majority-vote defense: the model's majority label over {draws} of its "
            "input. Accuracy of the defended model on untransformed images.",
        ),
        MetricText(
            MetricKey.GRID_VOTE, "Grid + vote (adaptive)", "grid + vote (adaptive)",
            f"The defended model under the adaptive attacker: the vote's {draws} of an image "
            "are drawn once and reused at every grid point (keyed by the seed and the image); "
            f"the attacker searches {all_points} against that fixed defended classifier, and "
            "an image counts if the vote is right at every point.",
        ),
        MetricText(
            MetricKey.GRID_VOTE_PER_QUERY, "Grid + vote (per-query)", "grid + vote (per-query)",
            "Fresh vote draws at every grid point: an attacker who may query again until the "
            "defender's dice fall its way.",
        ),
        MetricText(
            MetricKey.GRID_VOTE_TRANSFER, "Grid + vote (transfer)", "grid + vote (transfer)",
            "The attacker picks the undefended model's worst grid point (a misclassified one "
            "first, then the highest cross-entropy) and the vote decides there once.",
        ),
        MetricText(
            MetricKey.FIRST_ORDER, "First-order", "first-order",
            "Projected gradient ascent on the cross-entropy over (θ, dx, dy) through the "
            "differentiable resampling, inside the same box. Optional: empty where not "
            "measured or where the model cannot be differentiated. Above grid means the "
            "gradient attack missed worst cases the grid found.",
        ),
    )  # fmt: skip
    return {text.key: text for text in texts}
