"""``python -m worker.sizing BENCHMARK``: how many images an evaluation of BENCHMARK covers
(its dataset's size, cut to ``--limit``), printed as one integer.

The worker needs that number to cut a job into shards, and reading a dataset takes the
evaluator and torch, which the worker process never imports: it runs this in a short-lived
process of its own (`count_images`). Only the operator's trusted dataset is read here, never a
model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

__all__ = ["SizingError", "count_images"]

# Reading the digits or CIFAR-10 test set takes a second or two; an imagefolder of 50,000 files
# a few more. Past this the data folder is unusable (a hung network mount, say).
SIZING_TIMEOUT_S = 300.0


class SizingError(Exception):
    """The dataset could not be read; the message says why (for the operator)."""


def count_images(
    benchmark: str,
    data_dir: Path,
    benchmarks_file: Path | None = None,
    limit: int | None = None,
) -> int:
    """The number of positions in the evaluation order of ``benchmark``."""
    command = [sys.executable, "-m", "worker.sizing", benchmark, "--data-dir", str(data_dir)]
    if benchmarks_file is not None:
        command += ["--benchmarks-file", str(benchmarks_file)]
    if limit is not None:
        command += ["--limit", str(limit)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=SIZING_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SizingError(f"reading the dataset took over {SIZING_TIMEOUT_S:.0f} s") from exc
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise SizingError(lines[-1] if lines else f"exit status {done.returncode}")
    return int(done.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    from evaluator.benchmarks import get_benchmark, load_benchmark_file
    from evaluator.data import load_dataset
    from evaluator.evaluate import evaluation_order

    parser = argparse.ArgumentParser(prog="python -m worker.sizing")
    parser.add_argument("benchmark")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--benchmarks-file", type=Path)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    extra = load_benchmark_file(args.benchmarks_file) if args.benchmarks_file else None
    spec = get_benchmark(args.benchmark, extra)
    try:
        dataset = load_dataset(spec, args.data_dir)
    except Exception as exc:  # the evaluator's message says what is missing and where
        sys.stderr.write(f"{type(exc).__name__}: {exc}".replace("\n", " ") + "\n")
        return 1
    order = evaluation_order(len(dataset), spec.seed, args.limit)
    sys.stdout.write(f"{int(order.numel())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
