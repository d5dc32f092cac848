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
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["SizingError", "SizingStopped", "count_images"]

# Reading the digits or CIFAR-10 test set takes a second or two; an imagefolder of 50,000 files
# a few more. Past this the data folder is unusable (a hung network mount, say).
SIZING_TIMEOUT_S = 300.0


class SizingError(Exception):
    """The dataset could not be read; the message says why (for the operator)."""


class SizingStopped(Exception):
    """``keep_going`` said to stop: the job was cancelled or taken away meanwhile."""


def count_images(
    benchmark: str,
    data_dir: Path,
    benchmarks_file: Path | None = None,
    limit: int | None = None,
    *,
    keep_going: Callable[[], bool] | None = None,
    interval_s: float = 1.0,
) -> int:
    """The number of positions in the evaluation order of ``benchmark``. ``keep_going`` is
    called about every ``interval_s`` while the count runs (the caller's heartbeat); when it
    returns False the count is killed and `SizingStopped` raised."""
    command = [sys.executable, "-m", "worker.sizing", benchmark, "--data-dir", str(data_dir)]
    if benchmarks_file is not None:
        command += ["--benchmarks-file", str(benchmarks_file)]
    if limit is not None:
        command += ["--limit", str(limit)]
    deadline = time.monotonic() + SIZING_TIMEOUT_S
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        while True:
            try:
                out, err = proc.communicate(timeout=interval_s)
                break
            except subprocess.TimeoutExpired:
                stop = keep_going is not None and not keep_going()
                if stop or time.monotonic() > deadline:
                    proc.kill()
                    proc.communicate()
                    if stop:
                        raise SizingStopped() from None
                    raise SizingError(
                        f"reading the dataset took over {SIZING_TIMEOUT_S:.0f} s"
                    ) from None
    if proc.returncode != 0:
        lines = err.strip().splitlines()
        raise SizingError(lines[-1] if lines else f"exit status {proc.returncode}")
    return int(out.strip())


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
