"""Speed of the grid attack, in two suites.

digits (the default on a CPU): the grid attack against the physical floor, the model's own
inference throughput. For each shipped digits baseline, side by side in one run:
  (a) time of the grid attack (natural pass + grid search with early exit, as the service
      runs it, no landscape subset),
  (b) time of plain batched inference over the same number of forward passes (the same
      images, already on the device, in batches of the same size, no transform),
  (c) forward passes used against the 775 x N of a full grid,
  (r) a straightforward early-exit reference (the issue's, taken literally): the natural
      pass, then per round every standing image tries its next untried grid point in a fixed
      order (the grid's prior order less the identity, which the natural pass answered),
      batch by batch, and stops at its first fooling point,
  (r2) the same fixed order and early exit, but each round fills one batch: the standing
      images (at most a batch of them) share it equally, each trying its next points in the
      fixed order, and leave after the round in which one fooled them; where (r) runs one
      batch per grid point for the last few standing images (774 one-image batches for one
      robust image), (r2) keeps its batches full,
the ratios (r)/(a) and (r2)/(a) (the search's gain over each), the forward passes and batches
(model calls) of (a), (r) and (r2), and the same attack without early exit for reference.
Both references must find the same robust images as (a), or the run stops. (a), (b), (r)
and (r2) alternate --rounds times and the medians are compared: wall-clock seconds, or with
--cpu-time this process's CPU time (with --threads 1, waiting for a core does not count).

synthetic (the default on a GPU): the paper's two settings at full size with random weights
and random images: a CIFAR-10-shaped benchmark (the paper's ResNet-32, 10,000 images of
32 x 32) and an ImageNet-shaped one (torchvision's ResNet-50, 224 x 224, a few hundred
images), full 775-point grid without early exit (the worst case: a fully robust model). For
fp32, channels_last and bf16, eager and with torch.compile (and CUDA graphs on a GPU), it
prints images per second of plain inference and of the grid attack, and the share of the
attack's time spent resampling (the transform). --quick shrinks it to run on a CPU.

    make bench                                      # digits baselines on the CPU
    python scripts/bench.py --suite digits --device cuda --bf16 --repeat 20
    python scripts/bench.py --device cuda           # synthetic CIFAR- and ImageNet-shaped
    python scripts/bench.py --suite synthetic --device cpu --quick

It is one file past the usual length because it is a script run by path: both suites, their
references and the figures they print stay side by side, with no module of scripts/ to import.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from evaluator.attacks import Classifier, grid_pair_predictor
from evaluator.benchmarks import get_benchmark
from evaluator.data import load_dataset
from evaluator.evaluate import EvalOptions, Metric, evaluate
from evaluator.models import get_architecture
from evaluator.models.loading import load_safetensors_model
from evaluator.search import CandidateOrder, search_candidates
from evaluator.transforms import FillMode, GridSpec, spatial_transform

ROOT = Path(__file__).resolve().parent.parent
GRID_ONLY = frozenset({Metric.NATURAL, Metric.GRID})


def grid_only(**options: Any) -> EvalOptions:
    """The natural pass and the grid, nothing else: not the first-order attack or the
    ablations either, which the digits benchmark runs by default."""
    return EvalOptions(metrics=GRID_ONLY, first_order=False, ablations=frozenset(), **options)


class InMemory:
    """The benchmark's images decoded once and held in memory, ``repeat`` times over (so a GPU
    has enough work to time); as for (b), reading and decoding files is not part of (a)."""

    def __init__(self, dataset, repeat: int) -> None:
        self.images, self.labels = dataset.load(torch.arange(len(dataset)))
        self.repeat = repeat
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return len(self.labels) * self.repeat

    def load(self, indices: torch.Tensor):
        rows = indices % len(self.labels)
        return self.images[rows], self.labels[rows]


class CountBatches(torch.nn.Module):
    """The model, counting the batches it is given by size: how full the batches of the
    attack and of the references are."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: collections.Counter[int] = collections.Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes[x.shape[0]] += 1
        return self.model(x)

    @property
    def batches(self) -> int:
        return sum(self.sizes.values())


@dataclass
class Cost:
    """One way of running the grid attack: median wall time, forward passes, model calls."""

    seconds: float
    passes: int
    batches: int

    def counts(self) -> str:
        return f"{self.passes:,} / {self.batches:,}"


@dataclass
class Row:
    model: str
    images: int
    grid_accuracy: float
    attack: Cost
    inference_s: float
    reference: Cost
    filled_reference: Cost
    full_grid_passes: int
    no_exit_s: float

    def cells(self) -> list[str]:
        return [
            self.model,
            f"{self.images}",
            f"{100 * self.grid_accuracy:.1f}%",
            f"{self.attack.seconds:.2f}",
            f"{self.inference_s:.2f}",
            f"{self.attack.seconds / self.inference_s:.2f}",
            f"{self.reference.seconds:.2f}",
            f"{self.reference.seconds / self.attack.seconds:.2f}",
            f"{self.filled_reference.seconds:.2f}",
            f"{self.filled_reference.seconds / self.attack.seconds:.2f}",
            self.attack.counts(),
            self.reference.counts(),
            self.filled_reference.counts(),
            f"{self.attack.passes / self.full_grid_passes:.1%}",
            "-" if self.no_exit_s != self.no_exit_s else f"{self.no_exit_s:.2f}",
        ]


def plain_inference_seconds(
    classifier: Classifier,
    images: torch.Tensor,
    passes: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Time ``passes`` forward passes over ``images`` in full batches, nothing else."""
    batch = classifier.batch_size
    x = images[torch.arange(batch) % len(images)].contiguous()
    classifier.logits(x)  # warm-up
    _sync(classifier.device)
    start = clock()
    done = 0
    while done < passes:
        size = min(batch, passes - done)
        classifier.logits(x[:size])
        done += size
    _sync(classifier.device)
    return clock() - start


class Meter:
    """Wall time, forward passes and model calls of each run measured, by name: every round's
    time, the counts of the last (they are the same every round)."""

    def __init__(
        self, classifier: Classifier, counted: CountBatches, clock: Callable[[], float]
    ) -> None:
        self.classifier, self.counted, self.clock = classifier, counted, clock
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.counts: dict[str, tuple[int, int]] = {}

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        passes, batches = self.classifier.forward_passes, self.counted.batches
        start = self.clock()
        yield
        _sync(self.classifier.device)
        self.times[key].append(self.clock() - start)
        self.counts[key] = (
            self.classifier.forward_passes - passes,
            self.counted.batches - batches,
        )

    def cost(self, key: str) -> Cost:
        return Cost(statistics.median(self.times[key]), *self.counts[key])


def _fixed_order(grid: GridSpec, device: torch.device) -> torch.Tensor:
    """The references' order: the grid's prior order less the identity, whose answer the
    natural pass has given (as the service's search takes it from there too)."""
    prior, identity = grid.prior_order(), grid.identity_index()
    return (prior if identity is None else prior[prior != identity]).to(device)


def reference_attack(
    classifier: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    grid: GridSpec,
    fill: FillMode,
) -> int:
    """(r): the natural pass, then rounds in which every standing image tries its next grid
    point in a fixed order, in batches of the classifier's batch size, until it is fooled or
    has tried them all. Returns the number of images robust."""
    points, order = grid.points().to(images.device), _fixed_order(grid, images.device)
    standing = classifier.logits(images).argmax(dim=1) == labels
    for point in order:
        active = standing.nonzero().squeeze(1)
        if active.numel() == 0:
            break
        for batch in active.split(classifier.batch_size):
            moved = spatial_transform(images[batch], points[point.expand(batch.numel())], fill)
            standing[batch] = classifier.logits(moved).argmax(dim=1) == labels[batch]
    return int(standing.sum())


def filled_reference_attack(
    classifier: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    grid: GridSpec,
    fill: FillMode,
) -> int:
    """(r2): the natural pass, then rounds of one full batch each: the first ``batch``
    standing images share it as equally as whole numbers allow, each trying its next grid
    points in the same fixed order as (r), and an image leaves after the round in which one
    of them fooled it (so it may spend up to its share less one pass past that point).
    Returns the number of images robust."""
    device, batch = images.device, classifier.batch_size
    points, order = grid.points().to(device), _fixed_order(grid, device)
    standing = classifier.logits(images).argmax(dim=1) == labels
    tried = torch.zeros(len(labels), dtype=torch.long, device=device)
    while True:
        active = (standing & (tried < order.numel())).nonzero().squeeze(1)[:batch]
        if active.numel() == 0:
            break
        n = active.numel()
        share = batch // n + (torch.arange(n, device=device) < batch % n).long()
        take = torch.minimum(share, order.numel() - tried[active])
        rows = active.repeat_interleave(take)
        # Each image's pairs are its next `take` points: offsets 0, 1, ... within its run.
        starts = (take.cumsum(0) - take).repeat_interleave(take)
        steps = tried[rows] + torch.arange(rows.numel(), device=device) - starts
        moved = spatial_transform(images[rows], points[order[steps]], fill)
        fooled = classifier.logits(moved).argmax(dim=1) != labels[rows]
        standing[rows[fooled]] = False
        tried[active] += take
    return int(standing.sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, model: torch.nn.Module, args: argparse.Namespace) -> Row:
    spec = get_benchmark("digits")
    dataset = InMemory(load_dataset(spec, None), args.repeat)
    counted = CountBatches(model)
    classifier = Classifier(
        counted, 10, device=args.device, batch_size=args.batch_size, bf16=args.bf16
    )
    warm = grid_only(limit=classifier.batch_size, landscape_subset=0)
    evaluate(classifier, dataset, spec, warm)
    _sync(classifier.device)

    # This machine's speed drifts (shared cores), so (r), (r2), (a) and (b) are measured
    # alternately, `rounds` times each, and the medians compared.
    options = grid_only(landscape_subset=0)
    images, _ = dataset.load(torch.arange(min(len(dataset), 4096)))
    images = images.to(classifier.device)
    all_images, all_labels = (
        t.to(classifier.device) for t in dataset.load(torch.arange(len(dataset)))
    )
    references = {"r": reference_attack, "r2": filled_reference_attack}
    robust_by: dict[str, int] = {}
    clock = time.process_time if args.cpu_time else time.perf_counter
    meter = Meter(classifier, counted, clock)
    for _ in range(args.rounds):
        for key, reference in references.items():
            with meter.measure(key):
                robust_by[key] = reference(classifier, all_images, all_labels, spec.grid, spec.fill)
        with meter.measure("a"):
            result = evaluate(classifier, dataset, spec, options)
        passes = result.forward_passes["total"]
        meter.times["b"].append(plain_inference_seconds(classifier, images, passes, clock))
    # The references must agree with the service on which images survive, or they time
    # something else.
    robust = round((result.accuracy("grid") or 0.0) * len(dataset))
    assert all(n == robust for n in robust_by.values()), (robust_by, robust)

    no_exit_s = float("nan")
    if args.full_grid:
        start = clock()
        evaluate(classifier, dataset, spec, grid_only(early_exit=False))
        _sync(classifier.device)
        no_exit_s = clock() - start
    return Row(
        model=name,
        images=len(dataset),
        grid_accuracy=result.accuracy("grid") or 0.0,
        attack=meter.cost("a"),
        inference_s=statistics.median(meter.times["b"]),
        reference=meter.cost("r"),
        filled_reference=meter.cost("r2"),
        full_grid_passes=result.cost["full_grid_forward_passes"],
        no_exit_s=no_exit_s,
    )


# --- The GPU path: synthetic CIFAR- and ImageNet-shaped benchmarks, full grid ---------------


class Compile(StrEnum):
    """How the model is run: eagerly, through torch.compile, or compiled with CUDA graphs
    (``mode="reduce-overhead"``, which replays each batch's kernels as one graph)."""

    EAGER = "eager"
    COMPILE = "compile"
    CUDA_GRAPHS = "compile+cudagraphs"


@dataclass(frozen=True)
class RunConfig:
    """One way to run the model: precision, memory layout, compilation."""

    bf16: bool
    channels_last: bool
    compile: Compile = Compile.EAGER

    @property
    def name(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{'bf16' if self.bf16 else 'fp32'} {layout} {self.compile.value}"

    @property
    def key(self) -> str:
        """Short name for --configs: fp32, fp32-cl, bf16-cl, bf16-cl-compile, ..."""
        parts = ["bf16" if self.bf16 else "fp32"] + ["cl"] * self.channels_last
        if self.compile is Compile.COMPILE:
            parts.append("compile")
        elif self.compile is Compile.CUDA_GRAPHS:
            parts.append("cudagraphs")
        return "-".join(parts)


@dataclass(frozen=True)
class Shape:
    """A synthetic benchmark: random images of a real benchmark's shape and grid, and an
    untrained model of the architecture that benchmark is run with. Random weights and images
    cost the same forward passes as trained ones; with the full grid (no early exit) the
    number of passes does not depend on what the model predicts."""

    name: str
    benchmark: str
    architecture: str
    num_classes: int
    images: int
    batch_size: int
    grid: GridSpec


@dataclass
class SyntheticRow:
    shape: str
    config: str
    images: int
    grid_points: int
    batch: int
    inference_ips: float
    attack_ips: float
    attack_passes_per_s: float
    transform_share: float

    def cells(self) -> list[str]:
        return [
            self.shape,
            self.config,
            f"{self.images:,}",
            f"{self.grid_points}",
            f"{self.batch}",
            _rate(self.inference_ips),
            _rate(self.attack_passes_per_s),
            f"{self.attack_ips:,.2f}",
            f"{self.attack_passes_per_s / self.inference_ips:.2f}",
            f"{self.transform_share:.1%}",
        ]


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.1f}"


SYNTHETIC_HEADER = [
    "benchmark", "run as", "images", "grid", "batch", "inference img/s", "attack passes/s",
    "attack img/s", "attack/inference", "transform share",
]  # fmt: skip


def synthetic_shapes(args: argparse.Namespace) -> list[Shape]:
    """The paper's two settings; ``--quick`` shrinks them until a CPU runs them in minutes
    (the ImageNet-shaped one on a 3 x 3 x 3 grid: a CPU takes about a second per ResNet-50
    pass)."""
    cifar, imagenet = get_benchmark("cifar10"), get_benchmark("imagenet")
    quick = args.quick
    cifar_images = args.cifar_images or (2 if quick else 10_000)
    imagenet_images = args.imagenet_images or (1 if quick else 256)
    imagenet_grid = GridSpec(imagenet.grid.box, 3, 3, 3) if quick else imagenet.grid
    shapes = [
        Shape("cifar10-shaped", "cifar10", "resnet32", 10, cifar_images,
              256 if quick else 1024, cifar.grid),
        Shape("imagenet-shaped", "imagenet", "torchvision/resnet50", 1000, imagenet_images,
              8 if quick else 256, imagenet_grid),
    ]  # fmt: skip
    return [shape for shape in shapes if args.shapes is None or shape.name in args.shapes]


ALL_CONFIGS = (
    RunConfig(bf16=False, channels_last=False),
    RunConfig(bf16=False, channels_last=True),
    RunConfig(bf16=True, channels_last=True),
    RunConfig(bf16=True, channels_last=True, compile=Compile.COMPILE),
    RunConfig(bf16=True, channels_last=True, compile=Compile.CUDA_GRAPHS),
)


def run_configs(args: argparse.Namespace) -> list[RunConfig]:
    """fp32 as uploaded, then the layout and precision the service can choose, then compiled
    (by default on a GPU only, and CUDA graphs only there: on a CPU there is no launch
    overhead for them to remove); ``--configs`` picks by key."""
    if args.configs:
        return [c for c in ALL_CONFIGS if c.key in args.configs]
    on_gpu = torch.device(args.device).type == "cuda"
    compile_models = on_gpu if args.compile is None else args.compile
    return [
        c
        for c in ALL_CONFIGS
        if (c.compile is Compile.EAGER or compile_models)
        and (c.compile is not Compile.CUDA_GRAPHS or on_gpu)
    ]


class FullBatches(torch.nn.Module):
    """Pads every batch to ``batch`` images: a compiled model then sees one shape, so it is
    compiled (and its CUDA graph recorded) once, not again for each short last batch."""

    def __init__(self, model: torch.nn.Module, batch: int) -> None:
        super().__init__()
        self.model, self.batch = model, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < self.batch:
            x = torch.cat([x, x[:1].expand(self.batch - n, *x.shape[1:])])
        # A CUDA graph writes every replay's output into the same memory: copy it out.
        return self.model(x)[:n].clone()


def build_model(shape: Shape, config: RunConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_architecture(shape.architecture).build(shape.num_classes).eval()
    if config.compile is Compile.EAGER:
        return model
    mode = "reduce-overhead" if config.compile is Compile.CUDA_GRAPHS else None
    compiled = torch.compile(model, mode=mode, dynamic=False)
    return FullBatches(compiled, shape.batch_size)  # type: ignore[arg-type]


def grid_attack_seconds(
    classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, shape: Shape
) -> tuple[float, int]:
    """The grid attack as the service runs it without early exit: images in chunks of
    ``chunk_bytes``, a natural pass, then every grid point of every image. Returns the wall
    time and the forward passes."""
    spec = get_benchmark(shape.benchmark)
    points, identity = shape.grid.points(), shape.grid.identity_index()
    c, h, w = images.shape[1:]
    chunk = max(classifier.batch_size, EvalOptions().chunk_bytes // (c * h * w * 4))
    passes_before = classifier.forward_passes
    _sync(classifier.device)
    start = time.perf_counter()
    for first in range(0, len(images), chunk):
        x, y = images[first : first + chunk], labels[first : first + chunk]
        natural = classifier.logits(x).argmax(dim=1)
        known = None if identity is None else (identity, natural == y, natural)
        search_candidates(
            grid_pair_predictor(classifier, x, points, spec.fill),
            y,
            shape.grid.size,
            pairs_per_batch=classifier.batch_size,
            order=CandidateOrder(shape.grid.prior_order()),
            exhaustive=torch.ones(len(y), dtype=torch.bool),
            known=known,
        )
    _sync(classifier.device)
    return time.perf_counter() - start, classifier.forward_passes - passes_before


def transform_seconds(images: torch.Tensor, shape: Shape, batch: int, pairs: int) -> float:
    """Resampling alone, for ``pairs`` (image, grid point) pairs in batches as the attack
    makes them: the transform's part of the attack's time."""
    fill = get_benchmark(shape.benchmark).fill
    points = shape.grid.points().to(images.device)

    def resample(first: int, last: int) -> None:
        pair = torch.arange(first, last, device=images.device)
        rows = pair // len(points) % len(images)
        spatial_transform(images[rows], points[pair % len(points)], fill)

    resample(0, min(batch, pairs))  # warm-up
    _sync(images.device)
    start = time.perf_counter()
    for first in range(0, pairs, batch):
        resample(first, min(first + batch, pairs))
    _sync(images.device)
    return time.perf_counter() - start


def bench_synthetic(shape: Shape, config: RunConfig, args: argparse.Namespace) -> SyntheticRow:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    size = get_architecture(shape.architecture).input_size
    images = torch.rand(shape.images, 3, *size, generator=generator).to(device)
    labels = torch.randint(shape.num_classes, (shape.images,), generator=generator).to(device)
    classifier = Classifier(
        build_model(shape, config),
        shape.num_classes,
        device=device,
        batch_size=shape.batch_size,
        bf16=config.bf16,
        channels_last=config.channels_last,
    )
    # Warm-up, and compilation (one batch shape, see FullBatches), before anything is timed.
    grid_attack_seconds(classifier, images[:1], labels[:1], shape)
    plain_inference_seconds(classifier, images, classifier.batch_size)

    inference_passes = classifier.batch_size * args.inference_batches
    inference_s = plain_inference_seconds(classifier, images, inference_passes)
    attack_s, passes = grid_attack_seconds(classifier, images, labels, shape)
    transform_s = transform_seconds(images, shape, classifier.batch_size, passes)
    return SyntheticRow(
        shape=shape.name,
        config=config.name,
        images=shape.images,
        grid_points=shape.grid.size,
        batch=classifier.batch_size,
        inference_ips=inference_passes / inference_s,
        attack_ips=shape.images / attack_s,
        attack_passes_per_s=passes / attack_s,
        transform_share=transform_s / attack_s,
    )


# --- The command -------------------------------------------------------------------------------


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def run_digits(args: argparse.Namespace) -> None:
    models: list[tuple[str, torch.nn.Module]] = []
    for method in args.models:
        path = ROOT / "baselines" / f"digits-{method}.safetensors"
        if path.exists():
            models.append((f"small_cnn {method}", load_safetensors_model(path, "small_cnn", 10)))
    if args.resnet:
        torch.manual_seed(0)
        resnet = get_architecture("resnet32").build(10).eval()
        models.append(("resnet32 (untrained)", resnet))

    header = ["model", "images", "grid acc", "(a) attack s", "(b) inference s", "(a)/(b)",
              "(r) s", "(r)/(a)", "(r2) s", "(r2)/(a)", "(a) passes / batches",
              "(r) passes / batches", "(r2) passes / batches", "(a) of 775 x N",
              "no early exit s"]  # fmt: skip
    rows = [bench_model(name, model, args).cells() for name, model in models]
    print(f"device {args.device}, batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} seconds, median of {args.rounds}")  # fmt: skip
    print_table(header, rows)


def run_synthetic(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, full grid (no early exit)"
          f"{', quick sizes' if args.quick else ''}", flush=True)  # fmt: skip
    rows = []
    for shape in synthetic_shapes(args):
        for config in run_configs(args):
            start = time.perf_counter()
            row = bench_synthetic(shape, config, args)
            print(f"  {row.shape}, {row.config}: {row.attack_ips:,.2f} img/s "
                  f"({time.perf_counter() - start:.0f} s with warm-up)", flush=True)  # fmt: skip
            rows.append(row.cells())
    print_table(SYNTHETIC_HEADER, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's)")
    parser.add_argument(
        "--suite",
        choices=["digits", "synthetic"],
        help="default: synthetic on a GPU, digits on a CPU",
    )
    digits = parser.add_argument_group("digits suite")
    digits.add_argument("--batch-size", type=int, default=512)
    digits.add_argument("--bf16", action="store_true")
    digits.add_argument(
        "--repeat", type=int, default=1, help="evaluate the 540 digits N times over"
    )
    digits.add_argument("--rounds", type=int, default=3, help="alternate (a) and (b) this often")
    digits.add_argument(
        "--models",
        nargs="+",
        choices=["standard", "augmentation", "worst-of-10"],
        default=["standard", "augmentation", "worst-of-10"],
        help="which shipped digits baselines to run (default: all three)",
    )
    digits.add_argument(
        "--full-grid", action="store_true", help="also time the grid without early exit"
    )
    digits.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this process's CPU time, not the wall clock: on a CPU shared with other "
        "jobs, time spent waiting for a core then does not count (use with --threads 1: with "
        "more threads it also counts threads spinning while they wait for each other)",
    )
    digits.add_argument(
        "--resnet", action="store_true", help="add an untrained ResNet-32 (slow on a CPU)"
    )
    synthetic = parser.add_argument_group("synthetic suite")
    synthetic.add_argument(
        "--shapes",
        nargs="+",
        choices=["cifar10-shaped", "imagenet-shaped"],
        help="run only these (default: both)",
    )
    synthetic.add_argument("--quick", action="store_true", help="sizes a CPU runs in minutes")
    synthetic.add_argument("--cifar-images", type=int, help="default 10,000 (--quick: 2)")
    synthetic.add_argument("--imagenet-images", type=int, help="default 256 (--quick: 1)")
    synthetic.add_argument(
        "--inference-batches", type=int, default=50, help="batches timed for plain inference"
    )
    synthetic.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run under torch.compile (default: on a GPU only; a CPU compiles slowly)",
    )
    synthetic.add_argument(
        "--configs",
        nargs="+",
        choices=[c.key for c in ALL_CONFIGS],
        help="run only these ways (overrides --compile)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = args.suite or ("synthetic" if torch.device(args.device).type == "cuda" else "digits")
    if args.quick and args.inference_batches == parser.get_default("inference_batches"):
        args.inference_batches = 2
    if suite == "synthetic":
        run_synthetic(args)
    else:
        run_digits(args)


if __name__ == "__main__":
    main()
