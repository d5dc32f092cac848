#!/usr/bin/env bash
# Reproduce the CIFAR-10 rows of Engstrom et al. (ICML 2019) on a GPU: train the paper's
# ResNet-32 with standard training, augmentation and worst-of-10, then evaluate each on the full
# 10,000-image test set (775-point grid, vote on the benchmark's 1,000-image subset) and,
# optionally, submit them to a SpatialBench server. See docs/reproduce.md.
#
#   scripts/reproduce_cifar10.sh DATA_DIR [OUT_DIR]          # DATA_DIR/cifar-10-batches-py/
#   SPATIALBENCH_URL=... SPATIALBENCH_TOKEN=... SUBMIT=1 scripts/reproduce_cifar10.sh data
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?give the data directory that holds cifar-10-batches-py/}
out=${2:-runs/cifar10}
epochs=${EPOCHS:-100}
sb=.venv/bin/spatialbench
mkdir -p "$out"

for method in standard augmentation worst-of-k; do
    name=$method; [ "$method" = worst-of-k ] && name=worst-of-10
    weights="$out/resnet32-$name.safetensors"
    if [ ! -f "$weights" ]; then
        $sb train --benchmark cifar10 --data-dir "$data" --arch resnet32 --method "$method" --k 10 \
            --epochs "$epochs" --batch-size 128 --lr 0.1 --schedule step --device cuda \
            --out "$weights"
    fi
    $sb evaluate --benchmark cifar10 --data-dir "$data" --arch resnet32 --weights "$weights" \
        --device cuda --batch-size 2048 --json "$out/resnet32-$name.result.json"
    if [ "${SUBMIT:-0}" = 1 ]; then
        $sb submit "$weights" --benchmark cifar10 --arch resnet32 --name "ResNet-32 $name (reproduction)" \
            --paper-url https://arxiv.org/abs/1712.02779
    fi
done
