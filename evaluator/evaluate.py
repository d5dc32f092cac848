"""One evaluation: every metric of DESIGN.md over a benchmark's images, as a plain function.

`evaluate` takes a `Classifier` and an `ImageDataset`, runs the phases (natural, random and
worst-of-k, grid with landscape, vote and grid + vote) chunk by chunk, reports progress through
a callback, and returns an `EvaluationResult`. It prints nothing and writes nothing.

Images are evaluated in a fixed order: a permutation of the dataset seeded by the benchmark's
seed. ``--limit N`` takes the first N of that order, and the subsets of the expensive metrics
(vote, landscape) are its first ``vote_subset`` / ``landscape_subset`` positions, so a limited
or sharded run measures a well-defined sample.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import torch
from torch import Tensor

from evaluator.attacks import (
    STREAM_VOTE_NATURAL,
    STREAM_WORST_OF_K,
    CandidateOrder,
    Classifier,
    check_cancel,
    draw_pair_predictor,
    grid_pair_predictor,
    grid_vote_pair_predictor,
    search_candidates,
    vote_predict,
)
from evaluator.benchmarks import BenchmarkSpec
from evaluator.transforms import uniform_transforms

__all__ = [
    "Metric",
    "EvalOptions",
    "Progress",
    "EvaluationResult",
    "evaluation_order",
    "evaluate",
]


class Metric(StrEnum):
    """What can be asked for. ``vote`` means both vote metrics (natural and grid + vote)."""

    NATURAL = "natural"
    RANDOM = "random"
    WORST_OF_K = "worst-of-k"
    GRID = "grid"
    VOTE = "vote"


ALL_METRICS = frozenset(Metric)


class ImageDataset(Protocol):
    num_classes: int

    def __len__(self) -> int: ...

    def load(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class EvalOptions:
    """How to run an evaluation. None means "the benchmark's default"."""

    metrics: frozenset[Metric] = ALL_METRICS
    seed: int | None = None
    limit: int | None = None
    early_exit: bool = True
    vote_subset: int | None = None
    landscape_subset: int | None = None
    shard: range | None = None
    chunk_bytes: int = 256 * 2**20


@dataclass(frozen=True)
class Progress:
    phase: str
    fraction: float
    forward_passes: int
    elapsed_s: float
    eta_s: float | None


@dataclass
class MetricValue:
    correct: int
    total: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


# Result keys of the metrics, in display order.
METRIC_KEYS = ("natural", "random", "worst_of_k", "grid", "vote_natural", "grid_vote")


@dataclass
class EvaluationResult:
    """Everything an evaluation measured. ``per_image`` holds one list per field, aligned with
    ``per_image["position"]``; -1 marks "not measured" (outside a subset or metric off)."""

    benchmark: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, MetricValue]
    landscape: dict[str, Any] | None
    per_image: dict[str, list[int]]
    forward_passes: dict[str, int]
    cost: dict[str, Any]

    def accuracy(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return value.accuracy if value else None

    def to_dict(self, include_per_image: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "benchmark": self.benchmark,
            "config": self.config,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
            "landscape": self.landscape,
            "forward_passes": self.forward_passes,
            "cost": self.cost,
        }
        if include_per_image:
            out["per_image"] = self.per_image
        return out


def evaluation_order(n_images: int, seed: int, limit: int | None = None) -> Tensor:
    """The dataset indices in evaluation order: a permutation fixed by ``seed``, cut to
    ``limit``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_images, generator=generator)
    return order if limit is None else order[:limit]


def software_versions() -> dict[str, str]:
    import torchvision

    from evaluator import __version__

    return {
        "spatialbench": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
    }


class _Tracker:
    """Turns phase progress into an overall fraction and an ETA for the callback."""

    def __init__(
        self,
        classifier: Classifier,
        n_chunks: int,
        phases: list[str],
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

    def reporter(self, phase: str, images: int) -> Callable[[int, int], None]:
        """An ``on_batch`` callback for a search over ``images`` images."""

        def on_batch(done: int, _pairs: int) -> None:
            self.report(phase, done / max(images, 1))

        return on_batch

    def report(self, phase: str, phase_fraction: float) -> None:
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
                phase=phase,
                fraction=fraction,
                forward_passes=self.classifier.forward_passes - self.passes_at_start,
                elapsed_s=elapsed,
                eta_s=eta,
            )
        )


def _phases(metrics: frozenset[Metric]) -> list[str]:
    phases = ["natural"]
    if metrics & {Metric.RANDOM, Metric.WORST_OF_K}:
        phases.append("worst-of-k")
    if Metric.GRID in metrics:
        phases.append("grid")
    if Metric.VOTE in metrics:
        phases += ["vote", "grid+vote"]
    return phases


def _chunks(positions: Tensor, size: int) -> Iterable[Tensor]:
    for start in range(0, positions.numel(), size):
        yield positions[start : start + size]


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
    metrics = frozenset(Metric(m) for m in options.metrics) | {Metric.NATURAL}
    seed = benchmark.seed if options.seed is None else options.seed
    grid = benchmark.grid
    fill = benchmark.fill
    vote_subset = options.vote_subset if options.vote_subset is not None else benchmark.vote_subset
    landscape_subset = (
        options.landscape_subset
        if options.landscape_subset is not None
        else benchmark.landscape_subset
    )
    order = evaluation_order(len(dataset), benchmark.seed, options.limit)
    all_positions = torch.arange(order.numel())
    if options.shard is not None:
        all_positions = all_positions[options.shard.start : options.shard.stop]
    n = all_positions.numel()
    device = classifier.device
    k = benchmark.worst_of_k if Metric.WORST_OF_K in metrics else 1
    samples = benchmark.vote_samples
    c, h, w = benchmark.channels, *benchmark.image_size
    chunk_size = max(classifier.batch_size, options.chunk_bytes // (c * h * w * 4))
    chunk_list = list(_chunks(all_positions, chunk_size))
    phases = _phases(metrics)
    tracker = _Tracker(classifier, max(len(chunk_list), 1), phases, progress, should_stop)
    grid_order = CandidateOrder(grid.prior_order())
    vote_order = CandidateOrder(grid.prior_order())
    identity = grid.identity_index()
    points = grid.points()

    unset = torch.full((n,), -1, dtype=torch.long)
    record: dict[str, Tensor] = {
        "position": all_positions.clone(),
        "index": order[all_positions],
        "label": unset.clone(),
        "natural_pred": unset.clone(),
        "random_correct": unset.clone(),
        "worst_of_k_correct": unset.clone(),
        "grid_robust": unset.clone(),
        "grid_fool_point": unset.clone(),
        "grid_fool_pred": unset.clone(),
        "grid_fool_count": unset.clone(),
        "vote_natural_correct": unset.clone(),
        "grid_vote_robust": unset.clone(),
    }
    landscape_correct = torch.zeros(grid.size, dtype=torch.long)
    landscape_images = 0
    passes = dict.fromkeys(phases, 0)

    def count(phase: str, before: int) -> None:
        passes[phase] += classifier.forward_passes - before

    start_time = time.perf_counter()
    done = 0
    for chunk_index, chunk_positions in enumerate(chunk_list):
        tracker.chunk = chunk_index
        rows = slice(done, done + chunk_positions.numel())
        done += chunk_positions.numel()
        ids = order[chunk_positions]
        images, labels = dataset.load(ids)
        images, labels = images.to(device), labels.to(device)
        m = images.shape[0]

        before = classifier.forward_passes
        natural_pred = classifier.logits(images).argmax(dim=1)
        natural_correct = natural_pred == labels
        count("natural", before)
        record["label"][rows] = labels.cpu()
        record["natural_pred"][rows] = natural_pred.cpu()
        tracker.report("natural", 1.0)

        if "worst-of-k" in phases:
            before = classifier.forward_passes
            draws = uniform_transforms(grid.box, seed, STREAM_WORST_OF_K, ids, k).to(device)
            outcome = search_candidates(
                draw_pair_predictor(classifier, images, draws, fill),
                labels,
                k,
                pairs_per_batch=classifier.batch_size,
                exhaustive=None if options.early_exit else torch.ones(m, dtype=torch.bool),
                on_batch=tracker.reporter("worst-of-k", m),
            )
            # Draw 0 is tried first for every image, so it is the random attack's draw.
            record["random_correct"][rows] = outcome.correct[:, 0].long().cpu()
            if Metric.WORST_OF_K in metrics:
                record["worst_of_k_correct"][rows] = outcome.robust.long().cpu()
            count("worst-of-k", before)

        if "grid" in phases:
            before = classifier.forward_passes
            if not options.early_exit or landscape_subset is None:
                in_landscape = torch.ones(m, dtype=torch.bool)
            else:
                in_landscape = chunk_positions < landscape_subset
            known = (identity, natural_correct, natural_pred) if identity is not None else None
            outcome = search_candidates(
                grid_pair_predictor(classifier, images, points, fill),
                labels,
                grid.size,
                pairs_per_batch=classifier.batch_size,
                order=grid_order,
                exhaustive=in_landscape.to(device),
                known=known,
                on_batch=tracker.reporter("grid", m),
            )
            record["grid_robust"][rows] = outcome.robust.long().cpu()
            record["grid_fool_point"][rows] = outcome.first_fool.cpu()
            record["grid_fool_pred"][rows] = outcome.fool_prediction.cpu()
            exh = in_landscape.to(device)
            fool_counts = (~outcome.correct).sum(dim=1)
            record["grid_fool_count"][rows] = torch.where(exh, fool_counts, -1).cpu()
            landscape_correct += outcome.correct[exh].sum(dim=0).cpu()
            landscape_images += int(exh.sum())
            count("grid", before)

        if "vote" in phases:
            in_vote = torch.ones(m, dtype=torch.bool)
            if vote_subset is not None:
                in_vote = chunk_positions < vote_subset
            in_vote = in_vote.to(device)
            vote_rows = in_vote.nonzero().squeeze(1)
            if vote_rows.numel():
                before = classifier.forward_passes
                v_images, v_labels, v_ids = (
                    images[vote_rows],
                    labels[vote_rows],
                    ids[vote_rows.cpu()],
                )
                per_batch = max(1, classifier.batch_size // samples)
                defended = torch.cat(
                    [
                        vote_predict(
                            classifier,
                            v_images[s : s + per_batch],
                            v_ids[s : s + per_batch].to(device),
                            0,
                            box=grid.box,
                            seed=seed,
                            stream=STREAM_VOTE_NATURAL,
                            samples=samples,
                            fill=fill,
                        )
                        for s in range(0, v_images.shape[0], per_batch)
                    ]
                )
                vote_correct = (defended == v_labels).long().cpu()
                record["vote_natural_correct"][rows][vote_rows.cpu()] = vote_correct
                count("vote", before)
                tracker.report("vote", 1.0)

                before = classifier.forward_passes
                outcome = search_candidates(
                    grid_vote_pair_predictor(
                        classifier, v_images, v_ids, grid, seed=seed, samples=samples, fill=fill
                    ),
                    v_labels,
                    grid.size,
                    pairs_per_batch=per_batch,
                    order=vote_order,
                    exhaustive=None
                    if options.early_exit
                    else torch.ones(len(v_labels), dtype=torch.bool),
                    on_batch=tracker.reporter("grid+vote", len(v_labels)),
                )
                record["grid_vote_robust"][rows][vote_rows.cpu()] = outcome.robust.long().cpu()
                count("grid+vote", before)
    wall = time.perf_counter() - start_time

    def metric(field_name: str) -> MetricValue:
        values = record[field_name]
        measured = values >= 0
        return MetricValue(int((values[measured] == 1).sum()), int(measured.sum()))

    natural_correct_all = (record["natural_pred"] == record["label"]).long()
    record["natural_correct"] = natural_correct_all
    results: dict[str, MetricValue] = {"natural": metric("natural_correct")}
    if Metric.RANDOM in metrics:
        results["random"] = metric("random_correct")
    if Metric.WORST_OF_K in metrics:
        results["worst_of_k"] = metric("worst_of_k_correct")
    if Metric.GRID in metrics:
        results["grid"] = metric("grid_robust")
    if Metric.VOTE in metrics:
        results["vote_natural"] = metric("vote_natural_correct")
        results["grid_vote"] = metric("grid_vote_robust")

    landscape = None
    if Metric.GRID in metrics and landscape_images:
        thetas, dxs, dys = grid.axes()
        landscape = {
            "shape": list(grid.shape),
            "thetas": thetas.tolist(),
            "dxs": dxs.tolist(),
            "dys": dys.tolist(),
            "images": landscape_images,
            "correct": landscape_correct.tolist(),
            "accuracy": (landscape_correct.double() / landscape_images).view(grid.shape).tolist(),
        }

    config = {
        "metrics": sorted(m.value for m in metrics),
        "seed": seed,
        "limit": options.limit,
        "images": n,
        "positions": [int(all_positions[0]), int(all_positions[-1]) + 1] if n else [0, 0],
        "early_exit": options.early_exit,
        "worst_of_k": benchmark.worst_of_k,
        "vote_samples": samples,
        "vote_subset": vote_subset,
        "landscape_subset": landscape_subset,
        "fill": fill.value,
        "grid": list(grid.shape),
        "batch_size": classifier.batch_size,
    }
    passes["total"] = sum(passes.values())
    full_grid = 0
    if Metric.GRID in metrics:
        full_grid = n * grid.size
    cost = {
        "forward_passes": passes["total"],
        "full_grid_forward_passes": full_grid,
        "wall_time_s": wall,
        "device": _device_name(classifier.device),
        "precision": classifier.precision,
        "versions": software_versions(),
        "seed": seed,
    }
    return EvaluationResult(
        benchmark=benchmark.to_dict(),
        config=config,
        metrics=results,
        landscape=landscape,
        per_image={key: value.tolist() for key, value in record.items()},
        forward_passes=passes,
        cost=cost,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
