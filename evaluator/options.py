"""What an evaluation is asked to do, and what it reports while it runs.

`EvalOptions` names the metrics, subsets and attacks of one run (None: the benchmark's
default); `Metric` and `Phase` are their closed vocabularies; `Progress` is what the progress
callback of `evaluator.evaluate.evaluate` receives. These live below the evaluation's other
modules (run state, phases, summary) so that each can name them without importing `evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from evaluator.ablations import Ablation
from evaluator.attacks import VoteProtocol
from evaluator.first_order import FirstOrderConfig

E = TypeVar("E", bound=StrEnum)

__all__ = ["ALL_METRICS", "PROTOCOL_PHASES", "EvalOptions", "Metric", "Phase", "Progress"]


class Metric(StrEnum):
    """What can be asked for. ``vote`` means both vote metrics (natural and grid + vote, the
    latter under each requested `VoteProtocol`)."""

    NATURAL = "natural"
    RANDOM = "random"
    WORST_OF_K = "worst-of-k"
    GRID = "grid"
    VOTE = "vote"


ALL_METRICS = frozenset(Metric)


class Phase(StrEnum):
    """The steps of an evaluation, in the order they run on each chunk of images. Progress
    reports and the forward-pass accounting are keyed by these names."""

    NATURAL = "natural"
    WORST_OF_K = "worst-of-k"
    GRID = "grid"
    VOTE = "vote"
    GRID_VOTE = "grid+vote"  # the adaptive attacker, the headline
    GRID_VOTE_PER_QUERY = "grid+vote per-query"
    GRID_VOTE_TRANSFER = "grid+vote transfer"
    FIRST_ORDER = "first-order"
    ABLATIONS = "ablations"


PROTOCOL_PHASES = {
    VoteProtocol.ADAPTIVE: Phase.GRID_VOTE,
    VoteProtocol.PER_QUERY: Phase.GRID_VOTE_PER_QUERY,
    VoteProtocol.TRANSFER: Phase.GRID_VOTE_TRANSFER,
}


@dataclass(frozen=True)
class EvalOptions:
    """How to run an evaluation. None means "the benchmark's default".

    ``vote_protocols``: the attacker models grid + vote is measured under; ``first_order``:
    whether to run the gradient attack (with ``first_order_config``); ``ablations``: the
    variants of the grid attack to run. Each has a subset (the first positions of the fixed
    order), like ``vote_subset``.
    """

    metrics: frozenset[Metric] = ALL_METRICS
    seed: int | None = None
    limit: int | None = None
    early_exit: bool = True
    vote_subset: int | None = None
    landscape_subset: int | None = None
    shard: range | None = None
    chunk_bytes: int = 256 * 2**20
    vote_protocols: frozenset[VoteProtocol] | None = None
    first_order: bool | None = None
    first_order_subset: int | None = None
    first_order_config: FirstOrderConfig = FirstOrderConfig()
    ablations: frozenset[Ablation] | None = None
    ablation_subset: int | None = None

    def __post_init__(self) -> None:
        # Names from JSON or a command line become enum members here, so that an unknown
        # name fails when the options are made, with the names that are known.
        object.__setattr__(self, "metrics", _names(self.metrics, Metric))
        if self.vote_protocols is not None:
            object.__setattr__(self, "vote_protocols", _names(self.vote_protocols, VoteProtocol))
        if self.ablations is not None:
            object.__setattr__(self, "ablations", _names(self.ablations, Ablation))


def _names(values: Iterable[str], kind: type[E]) -> frozenset[E]:
    if isinstance(values, str):
        values = [values]
    try:
        return frozenset(kind(v) for v in values)
    except ValueError:
        known = ", ".join(e.value for e in kind)
        raise ValueError(f"unknown {kind.__name__} in {sorted(values)}; known: {known}") from None


@dataclass(frozen=True)
class Progress:
    phase: str
    fraction: float
    forward_passes: int
    elapsed_s: float
    eta_s: float | None
