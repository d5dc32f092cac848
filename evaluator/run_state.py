"""The state of one evaluation: its options resolved against the benchmark once
(`RunSettings`), the record and counters it carries from chunk to chunk (`Run`), the images of
the chunk at hand (`Chunk`), and the progress it reports (`Tracker`).

`evaluator.phases` fills the record one phase at a time; `evaluator.summary` turns it into the
result; `evaluator.evaluate` makes one `Run` and drives both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from evaluator.ablations import Ablation
from evaluator.attacks import Classifier, VoteProtocol, check_cancel
from evaluator.benchmarks import BenchmarkSpec
from evaluator.first_order import FirstOrderConfig
from evaluator.options import PROTOCOL_PHASES, EvalOptions, Metric, Phase, Progress
from evaluator.search import CandidateOrder

__all__ = ["Chunk", "Run", "RunSettings", "Tracker", "resolve_settings"]


# --- What runs: options and benchmark defaults resolved once ------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """The options with the benchmark's defaults filled in, resolved once per run."""

    metrics: frozenset[Metric]
    seed: int
    vote_subset: int | None
    landscape_subset: int | None
    vote_protocols: tuple[VoteProtocol, ...]
    first_order: FirstOrderConfig | None
    first_order_subset: int | None
    ablations: tuple[Ablation, ...]
    ablation_subset: int | None

    def phases(self) -> list[Phase]:
        phases = [Phase.NATURAL]
        if self.metrics & {Metric.RANDOM, Metric.WORST_OF_K}:
            phases.append(Phase.WORST_OF_K)
        if Metric.GRID in self.metrics:
            phases.append(Phase.GRID)
        if Metric.VOTE in self.metrics:
            phases.append(Phase.VOTE)
            phases += [PROTOCOL_PHASES[p] for p in self.vote_protocols]
        if self.first_order is not None:
            phases.append(Phase.FIRST_ORDER)
        if self.ablations:
            phases.append(Phase.ABLATIONS)
        return phases


def _default(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def resolve_settings(options: EvalOptions, benchmark: BenchmarkSpec) -> RunSettings:
    protocols = frozenset(_default(options.vote_protocols, benchmark.vote_protocols))
    ablations = frozenset(_default(options.ablations, benchmark.ablations))
    run_first_order = _default(options.first_order, benchmark.first_order)
    return RunSettings(
        metrics=frozenset(Metric(m) for m in options.metrics) | {Metric.NATURAL},
        seed=_default(options.seed, benchmark.seed),
        vote_subset=_default(options.vote_subset, benchmark.vote_subset),
        landscape_subset=_default(options.landscape_subset, benchmark.landscape_subset),
        # Enum order, so that results and tables list them the same way every time.
        vote_protocols=tuple(p for p in VoteProtocol if p in protocols),
        first_order=options.first_order_config if run_first_order else None,
        first_order_subset=_default(options.first_order_subset, benchmark.first_order_subset),
        ablations=tuple(a for a in Ablation if a in ablations),
        ablation_subset=_default(options.ablation_subset, benchmark.ablation_subset),
    )


# --- The state one evaluation carries from chunk to chunk ---------------------------------------


class Tracker:
    """Turns phase progress into an overall fraction and an ETA for the callback."""

    def __init__(
        self,
        classifier: Classifier,
        n_chunks: int,
        phases: list[Phase],
        callback: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.classifier = classifier
        self.n_chunks = n_chunks
        self.phases = phases
        self.callback = callback
        self.should_stop = should_stop
        self.start = time.perf_counter()
        self.chunk = 0
        self.passes_at_start = classifier.forward_passes

    def reporter(self, phase: Phase, images: int) -> Callable[[int, int], None]:
        """An ``on_batch`` callback for a search over ``images`` images."""

        def on_batch(done: int, _pairs: int) -> None:
            self.report(phase, done / max(images, 1))

        return on_batch

    def report(self, phase: Phase, phase_fraction: float) -> None:
        check_cancel(self.should_stop)
        if self.callback is None:
            return
        index = self.phases.index(phase)
        within = (index + min(max(phase_fraction, 0.0), 1.0)) / len(self.phases)
        fraction = (self.chunk + within) / self.n_chunks
        elapsed = time.perf_counter() - self.start
        eta = elapsed / fraction * (1 - fraction) if fraction > 0.01 else None
        self.callback(
            Progress(
                phase=phase.value,
                fraction=fraction,
                forward_passes=self.classifier.forward_passes - self.passes_at_start,
                elapsed_s=elapsed,
                eta_s=eta,
            )
        )


@dataclass
class Run:
    """What one evaluation carries from chunk to chunk: the per-image record, the forward
    passes of each phase, the candidate orders the searches learn across chunks, and the
    landscape's counts."""

    classifier: Classifier
    benchmark: BenchmarkSpec
    settings: RunSettings
    options: EvalOptions
    tracker: Tracker
    record: dict[str, Tensor]
    passes: dict[str, int]
    grid_order: CandidateOrder
    vote_orders: dict[VoteProtocol, CandidateOrder]
    ablation_orders: dict[Ablation, CandidateOrder]
    ablation_passes: dict[Ablation, int]
    ablation_errors: dict[Ablation, str]
    landscape_correct: Tensor
    landscape_images: int = 0
    first_order_error: str | None = None

    @contextmanager
    def counting(self, phase: Phase) -> Iterator[None]:
        """Charge the forward passes made inside the block to ``phase``."""
        before = self.classifier.forward_passes
        try:
            yield
        finally:
            self.passes[phase.value] += self.classifier.forward_passes - before

    def write(self, name: str, chunk: Chunk, local: Tensor, values: Tensor) -> None:
        """Store ``values`` for the chunk's images at ``local`` (indices within the chunk)."""
        self.record[name][chunk.rows][local.cpu()] = values.long().cpu()


@dataclass
class Chunk:
    """One chunk's images on the classifier's device, and what earlier phases leave on it for
    later ones."""

    positions: Tensor
    rows: slice
    ids: Tensor
    images: Tensor
    labels: Tensor
    natural_pred: Tensor | None = None
    natural_correct: Tensor | None = None
    # The vote's natural pass on the vote subset: its images, defended labels, correctness.
    vote_local: Tensor | None = None
    vote_pred: Tensor | None = None
    vote_correct: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    def in_subset(self, subset: int | None) -> Tensor:
        """Indices within the chunk of the images in the first ``subset`` positions."""
        inside = torch.ones(self.size, dtype=torch.bool)
        if subset is not None:
            inside = self.positions < subset
        return inside.nonzero().squeeze(1).to(self.images.device)
