"""Where the grid attack's time goes on a CPU, beyond the forward passes (issue 11).

For each shipped digits baseline, the grid attack (a) exactly as `scripts/bench.py` times it
(natural pass + grid search with early exit, no landscape subset, images in memory), run once
under cProfile, its wall time split into

  model       the model's own forward passes,
  classifier  what `Classifier` adds around them (channels_last copy, output check),
  transform   resampling the (image, grid point) pairs (`spatial_transform`),
  pairs       the rest of answering a batch of pairs (gathering the images, the softmax),
  ordering    ranking and updating the candidate order (`evaluator.search.CandidateOrder`),
  search      the rest of `evaluator.search.search_candidates`, its own bookkeeping (choosing
              each round's pairs, recording answers),
  rest        everything else in `evaluate` (the natural pass's bookkeeping, the summary),

and the batches sent to the model, counted by size. cProfile adds a fixed cost per Python
call, so the Python-heavy parts read somewhat larger than they are; their order is what counts.

--replay takes the search apart without cProfile's cost per call: it runs it once recording
every answer, then times each part alone on the same pairs in the same batches (see `replay`).
With --threads 1 --cpu-time the figures count this process's CPU time only, so other jobs on a
shared machine slow them much less than they slow the wall clock.

--sweep times plain inference (no transform, no search) at several batch sizes, the sizes
interleaved and repeated --rounds times, and prints the median passes per second of each: it
says which batch size this CPU runs fastest, and so how a search that sends batches of another
size compares with plain inference at 512.

    python scripts/profile_search.py --models standard augmentation
    python scripts/profile_search.py --replay --threads 1 --cpu-time
    python scripts/profile_search.py --sweep --threads 1 --cpu-time --batch-sizes 64 128 512
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import torch
from bench import ROOT, CountBatches, InMemory, grid_only, plain_inference_seconds
from torch import Tensor, nn

from evaluator.attacks import Classifier, grid_pair_predictor
from evaluator.benchmarks import get_benchmark
from evaluator.data import load_dataset
from evaluator.evaluate import evaluate
from evaluator.models.loading import load_safetensors_model
from evaluator.search import CandidateOrder, search_candidates
from evaluator.transforms import spatial_transform

# The candidate search's module: its functions are counted there, not wherever a name recurs.
SEARCH = "/evaluator/search.py"


def _cumulative(
    stats: pstats.Stats, name: str, caller: str = "", where: str = "/evaluator/"
) -> float:
    """Cumulative seconds of the functions called ``name`` defined under ``where``; with
    ``caller``, only what they spent when called from a function of that name (the pair
    predictor's closure and `Classifier.predict` are both ``predict``)."""
    table = stats.stats  # type: ignore[attr-defined]
    total = 0.0
    for (path, _, function), row in table.items():
        if function != name or where not in path:
            continue
        if not caller:
            total += row[3]
        else:
            total += sum(t[3] for key, t in row[4].items() if key[2] == caller)
    return total


def _load(method: str) -> nn.Module:
    path = ROOT / "baselines" / f"digits-{method}.safetensors"
    return load_safetensors_model(path, "small_cnn", 10)


def profile_attack(method: str, args: argparse.Namespace) -> None:
    spec = get_benchmark("digits")
    dataset = InMemory(load_dataset(spec, None), 1)
    recorder = CountBatches(_load(method))
    classifier = Classifier(recorder, 10, device="cpu", batch_size=args.batch_size)
    evaluate(classifier, dataset, spec, grid_only(limit=classifier.batch_size, landscape_subset=0))
    recorder.sizes.clear()

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    result = evaluate(classifier, dataset, spec, grid_only(landscape_subset=0))
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)

    model = _cumulative(stats, "forward", where="/scripts/bench.py")
    logits = _cumulative(stats, "logits")
    transform = _cumulative(stats, "spatial_transform")
    ordering = sum(_cumulative(stats, name, where=SEARCH) for name in ("ranking", "update"))
    pairs = _cumulative(stats, "predict", caller="search_candidates")
    total = _cumulative(stats, "evaluate")
    parts = {
        "model": model,
        "classifier": logits - model,
        "transform": transform,
        "pairs": pairs - transform - _cumulative(stats, "logits", caller="predict"),
        "ordering": ordering,
        "search": _cumulative(stats, "search_candidates", where=SEARCH) - pairs - ordering,
    }
    parts["rest"] = total - sum(parts.values())
    passes = result.forward_passes["total"]
    print(f"small_cnn {method}: {passes:,} passes, {wall:.2f} s wall under cProfile "
          f"({total:.2f} s in evaluate)")  # fmt: skip
    for name, seconds in parts.items():
        print(f"  {name:<10} {seconds:7.3f} s  {seconds / total:6.1%}")
    calls = recorder.batches
    full = recorder.sizes.get(args.batch_size, 0)
    print(f"  batches    {calls} calls, {full} of {args.batch_size}, mean "
          f"{passes / max(calls, 1):.0f} images; sizes (size x calls): "
          + ", ".join(f"{s}x{n}" for s, n in sorted(recorder.sizes.items())))  # fmt: skip
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)


def replay(method: str, args: argparse.Namespace) -> None:
    """(a)'s grid search taken apart: run once with every answer recorded, then each part
    alone on the same pairs in the same batches, timed by ``args``' clock: the search with
    the recorded answers (its bookkeeping and ordering, no model, no resampling), the
    resampling of every batch, the classifier on every resampled batch (as the search calls
    it, softmax included, and the logits alone), and plain inference over as many passes in
    full batches, (b) of `scripts/bench.py`."""
    spec, grid = get_benchmark("digits"), get_benchmark("digits").grid
    images, labels = load_dataset(spec, None).load(torch.arange(540))
    classifier = Classifier(_load(method), 10, device="cpu", batch_size=args.batch_size)
    clock = time.process_time if args.cpu_time else time.perf_counter
    points, identity = grid.points(), grid.identity_index()
    assert identity is not None
    natural = classifier.logits(images).argmax(dim=1)
    answers = torch.full((len(labels), grid.size), -1, dtype=torch.long)
    batches: list[tuple[Tensor, Tensor]] = []
    live = grid_pair_predictor(classifier, images, points, spec.fill)

    def recording(rows: Tensor, cands: Tensor) -> Tensor:
        preds = live(rows, cands)
        answers[rows, cands] = preds
        batches.append((rows, cands))
        return preds

    def search(predict: Callable[[Tensor, Tensor], Tensor]) -> int:
        outcome = search_candidates(
            predict,
            labels,
            grid.size,
            pairs_per_batch=classifier.batch_size,
            order=CandidateOrder(grid.prior_order()),
            known=(identity, natural == labels, natural),
        )
        return int(outcome.robust.sum())

    start = clock()
    robust = search(recording)
    whole = clock() - start
    passes = sum(len(rows) for rows, _ in batches)

    start = clock()
    assert search(lambda rows, cands: answers[rows, cands]) == robust
    bookkeeping = clock() - start
    transform = predict = logits = 0.0
    for rows, cands in batches:
        start = clock()
        moved = spatial_transform(images[rows], points[cands], spec.fill)
        transform += clock() - start
        start = clock()
        classifier.predict(moved)
        predict += clock() - start
        start = clock()
        classifier.logits(moved).argmax(dim=1)
        logits += clock() - start
    plain = plain_inference_seconds(classifier, images, passes, clock)
    gather = whole - bookkeeping - transform - predict

    sizes = collections.Counter(len(rows) for rows, _ in batches)
    print(f"small_cnn {method}: grid search, {passes:,} passes in {len(batches)} batches "
          f"({sizes.get(args.batch_size, 0)} full), {robust} images robust, "
          f"{'CPU' if args.cpu_time else 'wall'} seconds")  # fmt: skip
    rows_out = [
        ("whole search (a, less the natural pass)", whole),
        ("  search bookkeeping + ordering", bookkeeping),
        ("  resampling", transform),
        ("  classifier.predict (logits + softmax)", predict),
        ("  the rest (gathering images, recording)", gather),
        ("classifier.logits + argmax, same batches", logits),
        ("(b) plain inference, same passes, full batches", plain),
    ]
    for label, seconds in rows_out:
        print(f"  {label:<48} {seconds:8.2f} s  {seconds / whole:6.1%}  "
              f"{passes / seconds:8,.0f} passes/s")  # fmt: skip


def sweep(args: argparse.Namespace) -> None:
    """Median passes per second of plain inference at each batch size, sizes interleaved."""
    spec = get_benchmark("digits")
    images, _ = load_dataset(spec, None).load(torch.arange(540))
    clock = time.process_time if args.cpu_time else time.perf_counter
    for method in args.models:
        times: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
        for _ in range(args.rounds):
            for batch in args.batch_sizes:
                classifier = Classifier(_load(method), 10, device="cpu", batch_size=batch)
                times[batch].append(plain_inference_seconds(classifier, images, args.passes, clock))
        rates = {b: args.passes / statistics.median(t) for b, t in times.items()}
        best = max(rates.values())
        print(f"small_cnn {method}, plain inference, {args.passes:,} passes, "
              f"{'CPU' if args.cpu_time else 'wall'} time, median of {args.rounds}:")  # fmt: skip
        for batch, rate in rates.items():
            spread = min(times[batch]), max(times[batch])
            print(f"  batch {batch:>5}  {rate:8,.0f} passes/s  {rate / best:5.0%} of the best"
                  f"  ({spread[0]:.2f} to {spread[1]:.2f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["standard", "augmentation", "worst-of-10"],
        default=["standard", "augmentation"],
    )
    parser.add_argument("--batch-size", type=int, default=512, help="the attack's batch size")
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest functions")
    parser.add_argument("--sweep", action="store_true", help="plain inference by batch size")
    parser.add_argument(
        "--replay", action="store_true", help="the search's parts timed alone (see replay)"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 180, 256, 512, 1024]
    )
    parser.add_argument("--passes", type=int, default=20_480, help="passes per sweep timing")
    parser.add_argument("--rounds", type=int, default=5, help="sweep repeats")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time --sweep and --replay by this process's CPU time (with --threads 1, waiting "
        "for a core on a shared machine does not count)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.sweep:
        sweep(args)
    elif args.replay:
        for method in args.models:
            replay(method, args)
    else:
        for method in args.models:
            profile_attack(method, args)


if __name__ == "__main__":
    main()
