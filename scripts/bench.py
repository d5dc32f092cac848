"""Speed of the grid attack against the physical floor: the model's own inference throughput.

For each model, side by side in one run:
  (a) wall time of the grid attack (natural pass + grid search with early exit, as the service
      runs it, no landscape subset),
  (b) wall time of plain batched inference over the same number of forward passes (the same
      images, already on the device, in batches of the same size, no transform); (a) and (b)
      alternate --rounds times and the medians are compared,
  (c) forward passes used against the 775 x N of a full grid,
and the same attack without early exit for reference.

    make bench                     # the digits baselines on the CPU
    python scripts/bench.py --device cuda --bf16 --repeat 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluator.attacks import Classifier
from evaluator.benchmarks import get_benchmark
from evaluator.data import load_dataset
from evaluator.evaluate import EvalOptions, Metric, evaluate
from evaluator.models import get_architecture
from evaluator.models.loading import load_safetensors_model

ROOT = Path(__file__).resolve().parent.parent
GRID_ONLY = frozenset({Metric.NATURAL, Metric.GRID})


class InMemory:
    """The benchmark's images decoded once and held in memory, ``repeat`` times over (so a GPU
    has enough work to time); as for (b), reading and decoding files is not part of (a)."""

    def __init__(self, dataset, repeat: int) -> None:  # type: ignore[no-untyped-def]
        self.images, self.labels = dataset.load(torch.arange(len(dataset)))
        self.repeat = repeat
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return len(self.labels) * self.repeat

    def load(self, indices: torch.Tensor):  # type: ignore[no-untyped-def]
        rows = indices % len(self.labels)
        return self.images[rows], self.labels[rows]


@dataclass
class Row:
    model: str
    images: int
    grid_accuracy: float
    attack_s: float
    inference_s: float
    passes: int
    full_grid_passes: int
    no_exit_s: float

    def cells(self) -> list[str]:
        return [
            self.model,
            f"{self.images}",
            f"{100 * self.grid_accuracy:.1f}%",
            f"{self.attack_s:.2f}",
            f"{self.inference_s:.2f}",
            f"{self.attack_s / self.inference_s:.3f}",
            f"{self.passes:,}",
            f"{self.passes / self.full_grid_passes:.1%}",
            "-" if self.no_exit_s != self.no_exit_s else f"{self.no_exit_s:.2f}",
        ]


def plain_inference_seconds(classifier: Classifier, images: torch.Tensor, passes: int) -> float:
    """Time ``passes`` forward passes over ``images`` in full batches, nothing else."""
    batch = classifier.batch_size
    x = images[torch.arange(batch) % len(images)].contiguous()
    classifier.logits(x)  # warm-up
    _sync(classifier.device)
    start = time.perf_counter()
    done = 0
    while done < passes:
        size = min(batch, passes - done)
        classifier.logits(x[:size])
        done += size
    _sync(classifier.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, model: torch.nn.Module, args: argparse.Namespace) -> Row:
    spec = get_benchmark("digits")
    dataset = InMemory(load_dataset(spec, None), args.repeat)
    classifier = Classifier(
        model, 10, device=args.device, batch_size=args.batch_size, bf16=args.bf16
    )
    warm = EvalOptions(metrics=GRID_ONLY, limit=classifier.batch_size, landscape_subset=0)
    evaluate(classifier, dataset, spec, warm)
    _sync(classifier.device)

    # This machine's speed drifts (shared cores), so (a) and (b) are measured alternately,
    # `rounds` times each, and the medians compared.
    options = EvalOptions(metrics=GRID_ONLY, landscape_subset=0)
    images, _ = dataset.load(torch.arange(min(len(dataset), 4096)))
    images = images.to(classifier.device)
    attack_times, inference_times = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        result = evaluate(classifier, dataset, spec, options)
        _sync(classifier.device)
        attack_times.append(time.perf_counter() - start)
        passes = result.forward_passes["total"]
        inference_times.append(plain_inference_seconds(classifier, images, passes))
    attack_s, inference_s = statistics.median(attack_times), statistics.median(inference_times)

    no_exit_s = float("nan")
    if args.full_grid:
        start = time.perf_counter()
        evaluate(classifier, dataset, spec, EvalOptions(metrics=GRID_ONLY, early_exit=False))
        _sync(classifier.device)
        no_exit_s = time.perf_counter() - start
    return Row(
        model=name,
        images=len(dataset),
        grid_accuracy=result.accuracy("grid") or 0.0,
        attack_s=attack_s,
        inference_s=inference_s,
        passes=passes,
        full_grid_passes=result.cost["full_grid_forward_passes"],
        no_exit_s=no_exit_s,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=1, help="evaluate the 540 digits N times over"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternate (a) and (b) this often")
    parser.add_argument(
        "--full-grid", action="store_true", help="also time the grid without early exit"
    )
    parser.add_argument(
        "--resnet", action="store_true", help="add an untrained ResNet-32 (slow on a CPU)"
    )
    args = parser.parse_args()

    models: list[tuple[str, torch.nn.Module]] = []
    for method in ("standard", "augmentation", "worst-of-10"):
        path = ROOT / "baselines" / f"digits-{method}.safetensors"
        if path.exists():
            models.append((f"small_cnn {method}", load_safetensors_model(path, "small_cnn", 10)))
    if args.resnet:
        torch.manual_seed(0)
        resnet = get_architecture("resnet32").build(10).eval()
        models.append(("resnet32 (untrained)", resnet))

    header = ["model", "images", "grid acc", "(a) attack s", "(b) inference s", "(a)/(b)",
              "(c) grid passes", "of 775 x N", "no early exit s"]  # fmt: skip
    rows = [bench_model(name, model, args).cells() for name, model in models]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"device {args.device}, batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
