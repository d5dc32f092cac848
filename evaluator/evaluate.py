"""One evaluation: every metric of DESIGN.md over a benchmark's images, as a plain function.

`evaluate` takes a `Classifier` and an `ImageDataset`, runs the phases (`Phase`: natural,
random and worst-of-k, grid with landscape, vote, grid + vote under each attacker model,
first-order, ablations) chunk by chunk, reports progress through a callback, and returns an
`EvaluationResult`. It prints nothing and writes nothing.

Images are evaluated in a fixed order: a permutation of the dataset seeded by the benchmark's
seed. ``--limit N`` takes the first N of that order, and the subsets of the expensive metrics
(vote, landscape, first-order, ablations) are the first positions of that order, so a limited
or sharded run measures a well-defined sample.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from evaluator.ablations import Ablation, ablation_variant
from evaluator.attacks import (
    STREAM_VOTE_NATURAL,
    STREAM_WORST_OF_K,
    CandidateOrder,
    Classifier,
    VoteProtocol,
    check_cancel,
    draw_pair_predictor,
    fixed_vote_draws,
    fixed_vote_pair_predictor,
    grid_pair_predictor,
    grid_vote_pair_predictor,
    search_candidates,
    undefended_worst_points,
    vote_predict,
    vote_with_draws,
)
from evaluator.benchmarks import BenchmarkSpec
from evaluator.errors import ModelFormatError, ModelNotDifferentiableError, ModelOutputError
from evaluator.first_order import FirstOrderConfig, first_order_attack
from evaluator.transforms import spatial_transform, uniform_transforms
from evaluator.vocabulary import MetricKey

E = TypeVar("E", bound=StrEnum)

__all__ = [
    "Metric",
    "Phase",
    "EvalOptions",
    "Progress",
    "EvaluationResult",
    "evaluation_order",
    "evaluate",
]


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


class ImageDataset(Protocol):
    num_classes: int

    def __len__(self) -> int: ...

    def load(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...


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
    ``ablations`` maps each requested `Ablation` to its record (see `_ablation_records`)."""

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


# --- What runs: options and benchmark defaults resolved once ------------------------------------


@dataclass(frozen=True)
class _Settings:
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


def _settings(options: EvalOptions, benchmark: BenchmarkSpec) -> _Settings:
    protocols = frozenset(_default(options.vote_protocols, benchmark.vote_protocols))
    ablations = frozenset(_default(options.ablations, benchmark.ablations))
    run_first_order = _default(options.first_order, benchmark.first_order)
    return _Settings(
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


def ablation_fields(ablation: Ablation) -> tuple[str, str]:
    """Per-image fields of an ablation: robust under its grid, correct at its identity."""
    return f"ablation_{ablation.key}_robust", f"ablation_{ablation.key}_natural"


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


@dataclass
class _Run:
    classifier: Classifier
    benchmark: BenchmarkSpec
    settings: _Settings
    options: EvalOptions
    tracker: _Tracker
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

    def write(self, name: str, chunk: _Chunk, local: Tensor, values: Tensor) -> None:
        """Store ``values`` for the chunk's images at ``local`` (indices within the chunk)."""
        self.record[name][chunk.rows][local.cpu()] = values.long().cpu()


@dataclass
class _Chunk:
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


def _chunks(positions: Tensor, size: int) -> Iterable[Tensor]:
    for start in range(0, positions.numel(), size):
        yield positions[start : start + size]


# --- The phases ---------------------------------------------------------------------------------


def _natural_phase(run: _Run, chunk: _Chunk) -> None:
    with run.counting(Phase.NATURAL):
        natural_pred = run.classifier.logits(chunk.images).argmax(dim=1)
    chunk.natural_pred = natural_pred
    chunk.natural_correct = natural_pred == chunk.labels
    run.record["label"][chunk.rows] = chunk.labels.cpu()
    run.record["natural_pred"][chunk.rows] = natural_pred.cpu()


def _worst_of_k_phase(run: _Run, chunk: _Chunk) -> None:
    s, grid, device = run.settings, run.benchmark.grid, chunk.images.device
    k = run.benchmark.worst_of_k if Metric.WORST_OF_K in s.metrics else 1
    with run.counting(Phase.WORST_OF_K):
        draws = uniform_transforms(grid.box, s.seed, STREAM_WORST_OF_K, chunk.ids, k).to(device)
        outcome = search_candidates(
            draw_pair_predictor(run.classifier, chunk.images, draws, run.benchmark.fill),
            chunk.labels,
            k,
            pairs_per_batch=run.classifier.batch_size,
            exhaustive=None if run.options.early_exit else torch.ones(chunk.size, dtype=torch.bool),
            on_batch=run.tracker.reporter(Phase.WORST_OF_K, chunk.size),
        )
    # Draw 0 is tried first for every image, so it is the random attack's draw.
    run.record["random_correct"][chunk.rows] = outcome.correct[:, 0].long().cpu()
    if Metric.WORST_OF_K in s.metrics:
        run.record["worst_of_k_correct"][chunk.rows] = outcome.robust.long().cpu()


def _identity_known(run: _Run, chunk: _Chunk) -> tuple[int, Tensor, Tensor] | None:
    identity = run.benchmark.grid.identity_index()
    if identity is None or chunk.natural_correct is None or chunk.natural_pred is None:
        return None
    return identity, chunk.natural_correct, chunk.natural_pred


def _grid_phase(run: _Run, chunk: _Chunk) -> None:
    grid, device = run.benchmark.grid, chunk.images.device
    subset = run.settings.landscape_subset
    if not run.options.early_exit or subset is None:
        in_landscape = torch.ones(chunk.size, dtype=torch.bool, device=device)
    else:
        in_landscape = (chunk.positions < subset).to(device)
    with run.counting(Phase.GRID):
        outcome = search_candidates(
            grid_pair_predictor(run.classifier, chunk.images, grid.points(), run.benchmark.fill),
            chunk.labels,
            grid.size,
            pairs_per_batch=run.classifier.batch_size,
            order=run.grid_order,
            exhaustive=in_landscape,
            known=_identity_known(run, chunk),
            on_batch=run.tracker.reporter(Phase.GRID, chunk.size),
        )
    rows = chunk.rows
    run.record["grid_robust"][rows] = outcome.robust.long().cpu()
    run.record["grid_fool_point"][rows] = outcome.first_fool.cpu()
    run.record["grid_fool_pred"][rows] = outcome.fool_prediction.cpu()
    fool_counts = (~outcome.correct).sum(dim=1)
    run.record["grid_fool_count"][rows] = torch.where(in_landscape, fool_counts, -1).cpu()
    run.landscape_correct += outcome.correct[in_landscape].sum(dim=0).cpu()
    run.landscape_images += int(in_landscape.sum())


def _vote_batch(run: _Run) -> int:
    """Images per batch for the vote: each costs ``vote_samples`` forward passes."""
    return max(1, run.classifier.batch_size // run.benchmark.vote_samples)


def _vote_natural_phase(run: _Run, chunk: _Chunk) -> None:
    """The defended model on the untransformed images of the vote subset."""
    local = chunk.in_subset(run.settings.vote_subset)
    images, ids = chunk.images[local], chunk.ids[local.cpu()].to(chunk.images.device)
    per_batch = _vote_batch(run)
    with run.counting(Phase.VOTE):
        defended = [
            vote_predict(
                run.classifier,
                images[s : s + per_batch],
                ids[s : s + per_batch],
                0,
                box=run.benchmark.grid.box,
                seed=run.settings.seed,
                stream=STREAM_VOTE_NATURAL,
                samples=run.benchmark.vote_samples,
                fill=run.benchmark.fill,
            )
            for s in range(0, images.shape[0], per_batch)
        ]
    chunk.vote_local = local
    chunk.vote_pred = torch.cat(defended) if defended else chunk.labels[local]
    chunk.vote_correct = chunk.vote_pred == chunk.labels[local]
    run.write("vote_natural_correct", chunk, local, chunk.vote_correct)


def _grid_vote_search(run: _Run, chunk: _Chunk, protocol: VoteProtocol) -> Tensor | None:
    """Whether each image of the vote subset survives a search over all grid points against
    the defended prediction under ``protocol`` (adaptive or per-query); None when the chunk
    has no image in the subset."""
    b, s = run.benchmark, run.settings
    local = chunk.vote_local
    if local is None or local.numel() == 0:
        return None
    images, labels = chunk.images[local], chunk.labels[local]
    ids = chunk.ids[local.cpu()]
    phase = PROTOCOL_PHASES[protocol]
    known = None
    if protocol is VoteProtocol.ADAPTIVE:
        draws = fixed_vote_draws(b.grid.box, ids, seed=s.seed, samples=b.vote_samples)
        predict = fixed_vote_pair_predictor(run.classifier, images, draws, b.grid.points(), b.fill)
        # At the identity the fixed draws give exactly the vote's natural pass.
        identity = b.grid.identity_index()
        if identity is not None and chunk.vote_correct is not None:
            assert chunk.vote_pred is not None
            known = (identity, chunk.vote_correct, chunk.vote_pred)
    else:
        predict = grid_vote_pair_predictor(
            run.classifier, images, ids, b.grid, seed=s.seed, samples=b.vote_samples, fill=b.fill
        )
    exhaustive = None if run.options.early_exit else torch.ones(len(labels), dtype=torch.bool)
    with run.counting(phase):
        outcome = search_candidates(
            predict,
            labels,
            b.grid.size,
            pairs_per_batch=_vote_batch(run),
            order=run.vote_orders[protocol],
            exhaustive=exhaustive,
            known=known,
            on_batch=run.tracker.reporter(phase, len(labels)),
        )
    return outcome.robust


def _grid_vote_adaptive_phase(run: _Run, chunk: _Chunk) -> None:
    robust = _grid_vote_search(run, chunk, VoteProtocol.ADAPTIVE)
    if robust is not None and chunk.vote_local is not None:
        run.write("grid_vote_robust", chunk, chunk.vote_local, robust)


def _grid_vote_per_query_phase(run: _Run, chunk: _Chunk) -> None:
    robust = _grid_vote_search(run, chunk, VoteProtocol.PER_QUERY)
    if robust is not None and chunk.vote_local is not None:
        run.write("grid_vote_per_query_robust", chunk, chunk.vote_local, robust)


def _grid_vote_transfer_phase(run: _Run, chunk: _Chunk) -> None:
    """Grid + vote under the ``transfer`` attacker: the undefended model's worst grid point,
    then the vote with the image's fixed draws, once."""
    b, s = run.benchmark, run.settings
    local = chunk.vote_local
    if local is None or local.numel() == 0:
        return
    images, labels = chunk.images[local], chunk.labels[local]
    ids = chunk.ids[local.cpu()]
    points = b.grid.points().to(images.device)
    draws = fixed_vote_draws(b.grid.box, ids, seed=s.seed, samples=b.vote_samples)
    draws = draws.to(images.device)
    per_batch = _vote_batch(run)
    with run.counting(Phase.GRID_VOTE_TRANSFER):
        worst = undefended_worst_points(run.classifier, images, labels, points, b.fill)
        attacked = spatial_transform(images, points[worst], b.fill)
        defended = torch.cat(
            [
                vote_with_draws(
                    run.classifier, attacked[i : i + per_batch], draws[i : i + per_batch], b.fill
                )
                for i in range(0, len(labels), per_batch)
            ]
        )
    run.write("grid_vote_transfer_correct", chunk, local, defended == labels)
    run.write("grid_vote_transfer_point", chunk, local, worst)


def _first_order_phase(run: _Run, chunk: _Chunk) -> None:
    config = run.settings.first_order
    local = chunk.in_subset(run.settings.first_order_subset)
    if config is None or local.numel() == 0 or run.first_order_error is not None:
        return
    assert chunk.natural_correct is not None
    images, labels = chunk.images[local], chunk.labels[local]
    report = run.tracker.report
    try:
        with run.counting(Phase.FIRST_ORDER):
            outcome = first_order_attack(
                run.classifier,
                images,
                labels,
                chunk.ids[local.cpu()],
                run.benchmark.grid.box,
                seed=run.settings.seed,
                fill=run.benchmark.fill,
                config=config,
                on_batch=lambda done: report(Phase.FIRST_ORDER, done / len(labels)),
            )
    except ModelNotDifferentiableError as exc:
        run.first_order_error = str(exc)
        return
    # An image the model gets wrong untransformed is fooled by the identity, which is inside
    # the box: first-order accuracy can never exceed natural accuracy.
    correct = outcome.correct & chunk.natural_correct[local]
    run.write("first_order_correct", chunk, local, correct)


def _ablation_phase(run: _Run, chunk: _Chunk) -> None:
    local = chunk.in_subset(run.settings.ablation_subset)
    if local.numel() == 0:
        return
    for ablation in run.settings.ablations:
        if ablation not in run.ablation_errors:
            _ablation_search(run, chunk, local, ablation)


def _ablation_search(run: _Run, chunk: _Chunk, local: Tensor, ablation: Ablation) -> None:
    """One ablation's grid attack on the chunk's images at ``local``."""
    b = run.benchmark
    assert chunk.natural_correct is not None and chunk.natural_pred is not None
    variant = ablation_variant(ablation, b.grid, b.fill)
    robust_field, natural_field = ablation_fields(ablation)
    if variant.same_as(b.grid, b.fill) and Metric.GRID in run.settings.metrics:
        # The benchmark's own grid attack, already measured on these images.
        run.write(robust_field, chunk, local, run.record["grid_robust"][chunk.rows][local.cpu()])
        run.write(natural_field, chunk, local, chunk.natural_correct[local])
        return
    images, labels = variant.prepare(chunk.images[local]), chunk.labels[local]
    identity = variant.grid.identity_index()
    known = None
    if variant.canvas == 1 and identity is not None:
        known = (identity, chunk.natural_correct[local], chunk.natural_pred[local])
    before = run.classifier.forward_passes
    try:
        with run.counting(Phase.ABLATIONS):
            outcome = search_candidates(
                grid_pair_predictor(run.classifier, images, variant.grid.points(), variant.fill),
                labels,
                variant.grid.size,
                pairs_per_batch=run.classifier.batch_size,
                order=run.ablation_orders[ablation],
                exhaustive=None
                if run.options.early_exit
                else torch.ones(len(labels), dtype=torch.bool),
                known=known,
            )
    except (ModelOutputError, ModelFormatError, RuntimeError) as exc:
        if variant.canvas == 1:
            raise
        # A model built for one input size may refuse the canvas; that is a property of the
        # model to report, not a failed evaluation.
        h, w = images.shape[-2:]
        run.ablation_errors[ablation] = f"the model does not accept {h}x{w} canvas images: {exc}"
        return
    finally:
        run.ablation_passes[ablation] += run.classifier.forward_passes - before
    run.write(robust_field, chunk, local, outcome.robust)
    if identity is not None:
        run.write(natural_field, chunk, local, outcome.correct[:, identity])


PHASE_STEPS: dict[Phase, Callable[[_Run, _Chunk], None]] = {
    Phase.NATURAL: _natural_phase,
    Phase.WORST_OF_K: _worst_of_k_phase,
    Phase.GRID: _grid_phase,
    Phase.VOTE: _vote_natural_phase,
    Phase.GRID_VOTE: _grid_vote_adaptive_phase,
    Phase.GRID_VOTE_PER_QUERY: _grid_vote_per_query_phase,
    Phase.GRID_VOTE_TRANSFER: _grid_vote_transfer_phase,
    Phase.FIRST_ORDER: _first_order_phase,
    Phase.ABLATIONS: _ablation_phase,
}


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
    settings = _settings(options, benchmark)
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
        chunk = _Chunk(
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
    return _summary(run, time.perf_counter() - start_time)


def _new_run(
    classifier: Classifier,
    benchmark: BenchmarkSpec,
    settings: _Settings,
    options: EvalOptions,
    order: Tensor,
    positions: Tensor,
    chunk_list: list[Tensor],
) -> _Run:
    n = positions.numel()
    grid = benchmark.grid
    unset = torch.full((n,), -1, dtype=torch.long)
    record = {"position": positions.clone(), "index": order[positions]}
    record |= {name: unset.clone() for name in RECORD_FIELDS}
    for ablation in settings.ablations:
        record |= {name: unset.clone() for name in ablation_fields(ablation)}
    phases = settings.phases()
    return _Run(
        classifier=classifier,
        benchmark=benchmark,
        settings=settings,
        options=options,
        tracker=_Tracker(classifier, max(len(chunk_list), 1), phases, None, None),
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


# --- The summary --------------------------------------------------------------------------------


def _measured(values: Tensor) -> MetricValue:
    measured = values >= 0
    return MetricValue(int((values[measured] == 1).sum()), int(measured.sum()))


# The per-image field behind each result metric: 1 where the image counts (correct, or robust).
METRIC_FIELDS: dict[str, str] = {
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


def _metrics(run: _Run) -> dict[str, MetricValue]:
    record, s = run.record, run.settings
    record["natural_correct"] = (record["natural_pred"] == record["label"]).long()
    results: dict[str, MetricValue] = {"natural": _measured(record["natural_correct"])}
    if Metric.RANDOM in s.metrics:
        results["random"] = _measured(record["random_correct"])
    if Metric.WORST_OF_K in s.metrics:
        results["worst_of_k"] = _measured(record["worst_of_k_correct"])
    if Metric.GRID in s.metrics:
        results["grid"] = _measured(record["grid_robust"])
    if Metric.VOTE in s.metrics:
        results["vote_natural"] = _measured(record["vote_natural_correct"])
        for protocol in s.vote_protocols:
            field_name = METRIC_FIELDS[protocol.metric_key]
            value = _measured(record[field_name])
            value.extra = {"protocol": protocol.value, "attacker": protocol.description}
            value.extra |= _grid_same_images(run, field_name)
            results[protocol.metric_key] = value
    if s.first_order is not None:
        results["first_order"] = _first_order_metric(run)
    return results


def _first_order_metric(run: _Run) -> MetricValue:
    """First-order accuracy and, on the same images, the grid's and the gap between them."""
    if run.first_order_error is not None:
        return MetricValue(0, 0, error=run.first_order_error)
    value = _measured(run.record["first_order_correct"])
    value.extra = first_order_extra(value, _grid_same_images(run, "first_order_correct"))
    return value


def first_order_extra(value: MetricValue, same_images: dict[str, float]) -> dict[str, float]:
    """The first-order metric's extras: the grid on the same images and the gap to it."""
    extra = dict(same_images)
    if extra and value.total:
        # Positive: the gradient attack leaves images standing that the grid fools.
        extra["gap_to_grid"] = value.correct / value.total - extra["grid_same_images"]
    return extra


def _grid_same_images(run: _Run, field_name: str) -> dict[str, float]:
    if Metric.GRID not in run.settings.metrics:
        return {}
    return grid_same_images(run.record["grid_robust"], run.record[field_name])


def grid_same_images(grid_robust: Tensor, values: Tensor) -> dict[str, float]:
    """Grid accuracy on the images a subset metric measured (``values`` >= 0), so the two
    compare like for like; empty when nothing was measured."""
    measured = values >= 0
    if not bool(measured.any()):
        return {}
    grid = grid_robust[measured]
    return {"grid_same_images": float((grid == 1).sum()) / int(measured.sum())}


def _ablation_records(run: _Run) -> dict[str, dict[str, Any]]:
    """Per ablation: its grid, fill and canvas, label, images, correct and accuracy under its
    grid, accuracy at its identity (``natural``; on the canvas this is the padded image) and
    the forward passes it cost (``reused_grid`` when it is the benchmark's own grid)."""
    out: dict[str, dict[str, Any]] = {}
    b = run.benchmark
    for ablation in run.settings.ablations:
        variant = ablation_variant(ablation, b.grid, b.fill)
        robust_field, natural_field = ablation_fields(ablation)
        robust, natural = _measured(run.record[robust_field]), _measured(run.record[natural_field])
        if ablation in run.ablation_errors:
            out[ablation.value] = {**variant.describe(), "error": run.ablation_errors[ablation]}
            continue
        out[ablation.value] = {
            **variant.describe(),
            "images": robust.total,
            "correct": robust.correct,
            "accuracy": robust.accuracy,
            "natural": natural.accuracy,
            "forward_passes": run.ablation_passes[ablation],
            "reused_grid": variant.same_as(b.grid, b.fill) and Metric.GRID in run.settings.metrics,
        }
    return out


def _landscape(run: _Run) -> dict[str, Any] | None:
    if Metric.GRID not in run.settings.metrics or not run.landscape_images:
        return None
    grid = run.benchmark.grid
    thetas, dxs, dys = grid.axes()
    correct = run.landscape_correct
    return {
        "shape": list(grid.shape),
        "thetas": thetas.tolist(),
        "dxs": dxs.tolist(),
        "dys": dys.tolist(),
        "images": run.landscape_images,
        "correct": correct.tolist(),
        "accuracy": (correct.double() / run.landscape_images).view(grid.shape).tolist(),
    }


def _config(run: _Run, metrics: dict[str, MetricValue]) -> dict[str, Any]:
    s, b = run.settings, run.benchmark
    positions = run.record["position"]
    n = positions.numel()
    return {
        "metrics": sorted(m.value for m in s.metrics),
        "seed": s.seed,
        "limit": run.options.limit,
        "images": n,
        # The images behind each number: a subset metric never borrows the run's count.
        "images_per_metric": {key: value.total for key, value in metrics.items()},
        "positions": [int(positions[0]), int(positions[-1]) + 1] if n else [0, 0],
        "early_exit": run.options.early_exit,
        "worst_of_k": b.worst_of_k,
        "vote_samples": b.vote_samples,
        "vote_subset": s.vote_subset,
        "vote_protocols": [p.value for p in s.vote_protocols] if Metric.VOTE in s.metrics else [],
        "landscape_subset": s.landscape_subset,
        "first_order": None if s.first_order is None else s.first_order.record(b.grid.box),
        "first_order_subset": s.first_order_subset,
        "ablations": [a.value for a in s.ablations],
        "ablation_subset": s.ablation_subset,
        "fill": b.fill.value,
        "grid": list(b.grid.shape),
        "batch_size": run.classifier.batch_size,
    }


def _summary(run: _Run, wall: float) -> EvaluationResult:
    metrics = _metrics(run)
    passes = dict(run.passes)
    passes["total"] = sum(passes.values())
    n = run.record["position"].numel()
    cost = {
        "forward_passes": passes["total"],
        "full_grid_forward_passes": n * run.benchmark.grid.size
        if Metric.GRID in run.settings.metrics
        else 0,
        "wall_time_s": wall,
        "device": _device_name(run.classifier.device),
        "precision": run.classifier.precision,
        "versions": software_versions(),
        "seed": run.settings.seed,
    }
    return EvaluationResult(
        benchmark=run.benchmark.to_dict(),
        config=_config(run, metrics),
        metrics=metrics,
        landscape=_landscape(run),
        per_image={key: value.tolist() for key, value in run.record.items()},
        forward_passes=passes,
        cost=cost,
        ablations=_ablation_records(run),
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
