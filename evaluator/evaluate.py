"""One evaluation: every metric of DESIGN.md over a benchmark's images, as a plain function.

`evaluate` takes a `Classifier` and an `ImageDataset`, runs the phases (`Phase`: natural,
random and worst-of-k, grid with landscape, vote, grid + vote under each attacker model,
first-order, ablations) chunk by chunk, reports progress through a callback, and returns an
`EvaluationResult`. It prints nothing and writes nothing.

Images are evaluated in a fixed order: a permutation of the dataset seeded by the benchmark's
seed. ``--limit N`` takes the first N of that order, and the subsets of the expensive metrics
(vote, landscape, first-order, ablations) are the first positions of that order, so a limited
or sharded run measures a well-defined sample.

This module is the entry point and drives the others: `evaluator.options` (what is asked:
`EvalOptions`, `Metric`, `Phase`, `Progress`), `evaluator.results` (what comes back:
`EvaluationResult`), `evaluator.run_state` (what one run carries), `evaluator.phases` (one
function per phase) and `evaluator.summary` (the record turned into the result). The names of
``__all__`` are importable from here, so callers need only this module to run an evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import Tensor

from evaluator.ablations import ablation_variant
from evaluator.attacks import Classifier
from evaluator.benchmarks import BenchmarkSpec
from evaluator.options import EvalOptions, Metric, Phase, Progress
from evaluator.phases import PHASE_STEPS
from evaluator.results import RECORD_FIELDS, EvaluationResult
from evaluator.run_state import Chunk, Run, RunSettings, Tracker, resolve_settings
from evaluator.search import CandidateOrder
from evaluator.summary import summarise
from evaluator.vocabulary import ablation_fields

__all__ = [
    "Metric",
    "Phase",
    "EvalOptions",
    "Progress",
    "EvaluationResult",
    "evaluation_order",
    "evaluate",
]


class ImageDataset(Protocol):
    num_classes: int

    def __len__(self) -> int: ...

    def load(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...


def evaluation_order(n_images: int, seed: int, limit: int | None = None) -> Tensor:
    """The dataset indices in evaluation order: a permutation fixed by ``seed``, cut to
    ``limit``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_images, generator=generator)
    return order if limit is None else order[:limit]


def _chunks(positions: Tensor, size: int) -> Iterable[Tensor]:
    for start in range(0, positions.numel(), size):
        yield positions[start : start + size]


# --- The whole evaluation -----------------------------------------------------------------------


def evaluate(
    classifier: Classifier,
    dataset: ImageDataset,
    benchmark: BenchmarkSpec,
    options: EvalOptions = EvalOptions(),
    *,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EvaluationResult:
    """Evaluate ``classifier`` on ``benchmark``.

    ``options.shard`` restricts the run to a range of positions in the evaluation order, so
    several workers can split one evaluation; their ``per_image`` records concatenate.
    ``progress`` is called after every batch; ``should_stop`` is polled as often, and a true
    answer raises `EvaluationCancelled`.
    """
    settings = resolve_settings(options, benchmark)
    order = evaluation_order(len(dataset), benchmark.seed, options.limit)
    positions = torch.arange(order.numel())
    if options.shard is not None:
        positions = positions[options.shard.start : options.shard.stop]
    c, h, w = benchmark.channels, *benchmark.image_size
    chunk_size = max(classifier.batch_size, options.chunk_bytes // (c * h * w * 4))
    chunk_list = list(_chunks(positions, chunk_size))
    run = _new_run(classifier, benchmark, settings, options, order, positions, chunk_list)
    run.tracker.callback, run.tracker.should_stop = progress, should_stop
    phases = settings.phases()
    start_time = time.perf_counter()
    done = 0
    for chunk_index, chunk_positions in enumerate(chunk_list):
        run.tracker.chunk = chunk_index
        ids = order[chunk_positions]
        images, labels = dataset.load(ids)
        chunk = Chunk(
            positions=chunk_positions,
            rows=slice(done, done + chunk_positions.numel()),
            ids=ids,
            images=images.to(classifier.device),
            labels=labels.to(classifier.device),
        )
        done += chunk_positions.numel()
        for phase in phases:
            PHASE_STEPS[phase](run, chunk)
            run.tracker.report(phase, 1.0)
    return summarise(run, time.perf_counter() - start_time)


def _new_run(
    classifier: Classifier,
    benchmark: BenchmarkSpec,
    settings: RunSettings,
    options: EvalOptions,
    order: Tensor,
    positions: Tensor,
    chunk_list: list[Tensor],
) -> Run:
    n = positions.numel()
    grid = benchmark.grid
    unset = torch.full((n,), -1, dtype=torch.long)
    record = {"position": positions.clone(), "index": order[positions]}
    record |= {name: unset.clone() for name in RECORD_FIELDS}
    for ablation in settings.ablations:
        record |= {name: unset.clone() for name in ablation_fields(ablation)}
    phases = settings.phases()
    return Run(
        classifier=classifier,
        benchmark=benchmark,
        settings=settings,
        options=options,
        tracker=Tracker(classifier, max(len(chunk_list), 1), phases, None, None),
        record=record,
        passes=dict.fromkeys((p.value for p in phases), 0),
        grid_order=CandidateOrder(grid.prior_order()),
        vote_orders={p: CandidateOrder(grid.prior_order()) for p in settings.vote_protocols},
        ablation_orders={
            a: CandidateOrder(ablation_variant(a, grid, benchmark.fill).grid.prior_order())
            for a in settings.ablations
        },
        ablation_passes=dict.fromkeys(settings.ablations, 0),
        ablation_errors={},
        landscape_correct=torch.zeros(grid.size, dtype=torch.long),
    )
