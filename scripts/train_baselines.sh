#!/usr/bin/env bash
# Trains the three digits demo baselines that ship in baselines/ (standard, augmentation,
# worst-of-10; small_cnn, 20 epochs each, seed 0) with `spatialbench train`.
# With --evaluate, then measures each with the evaluator (natural, random, worst-of-10, grid)
# and prints the table recorded in baselines/README.md.
#
#   scripts/train_baselines.sh [--evaluate] [OUT_DIR]     (OUT_DIR defaults to baselines/)
#
# One CPU thread: the shipped weights were made that way, and on a small shared machine it is
# also the fastest. Bit-for-bit equality with the shipped files also needs the same CPU kind
# and torch version (recorded in each .json).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EVALUATE=0
if [[ "${1:-}" == "--evaluate" ]]; then
    EVALUATE=1
    shift
fi
OUT_DIR=${1:-baselines}
SPATIALBENCH="$VENV/bin/spatialbench"

COMMON=(--benchmark digits --arch small_cnn --epochs 20 --batch-size 64 --lr 0.02
    --weight-decay 0.0005 --schedule cosine --seed 0 --device cpu --threads 1)

"$SPATIALBENCH" train "${COMMON[@]}" --method standard \
    --out "$OUT_DIR/digits-standard.safetensors"
"$SPATIALBENCH" train "${COMMON[@]}" --method augmentation \
    --out "$OUT_DIR/digits-augmentation.safetensors"
"$SPATIALBENCH" train "${COMMON[@]}" --method worst-of-k --k 10 \
    --out "$OUT_DIR/digits-worst-of-10.safetensors"

if [[ "$EVALUATE" == 1 ]]; then
    "$VENV/bin/python" - "$OUT_DIR" <<'PY'
import json
import sys
import time
from pathlib import Path

import torch

from evaluator.attacks import Classifier
from evaluator.benchmarks import get_benchmark
from evaluator.data import load_dataset
from evaluator.evaluate import EvalOptions, Metric, evaluate
from evaluator.models import load_model

torch.set_num_threads(1)
out_dir = Path(sys.argv[1])
spec = get_benchmark("digits")
dataset = load_dataset(spec, None)
# Early exit everywhere (no landscape): the grid number is the same, the run much shorter.
options = EvalOptions(
    metrics=frozenset({Metric.NATURAL, Metric.RANDOM, Metric.WORST_OF_K, Metric.GRID}),
    landscape_subset=0,
    first_order=False,
    ablations=frozenset(),
)
print("| model | natural | random | worst-of-10 | grid | eval s |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name in ("standard", "augmentation", "worst-of-10"):
    weights = out_dir / f"digits-{name}.safetensors"
    meta = json.loads(weights.with_suffix(".json").read_text())
    model = load_model(weights, arch=meta["architecture"], mean=meta["mean"], std=meta["std"])
    start = time.perf_counter()
    result = evaluate(Classifier(model, spec.num_classes), dataset, spec, options)
    seconds = time.perf_counter() - start
    cells = [
        f"{100 * result.accuracy(key):.1f}%"
        for key in ("natural", "random", "worst_of_k", "grid")
    ]
    print(f"| {name} | {' | '.join(cells)} | {seconds:.0f} |")
PY
fi
