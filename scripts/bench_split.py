"""The cost of running the model in its own process: side by side, in one run, the same
forward passes (a) in process, as `spatialbench evaluate` runs them, and (b) through the
channel to a model process (`worker.channel.RemoteModel`, raw float32 frames over pipes),
alternating the two and comparing medians.

    python scripts/bench_split.py [--weights baselines/digits-standard.safetensors]
        [--copies 20] [--batch-size 512] [--rounds 5] [--threads N]

The images are the `digits` test images (540) repeated ``--copies`` times. The model process
is started without bubblewrap here: the sandbox's namespaces cost nothing per batch; what the
split adds is copying each batch and its logits through the pipes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluator.attacks import Classifier  # noqa: E402
from evaluator.dataset_readers import digits_split  # noqa: E402
from evaluator.models.loading import load_model  # noqa: E402
from worker.channel import RemoteModel  # noqa: E402
from worker.messages import ModelProcessConfig  # noqa: E402
from worker.model_process import LocalModelProcess  # noqa: E402


def _time(classifier: Classifier, images: torch.Tensor) -> float:
    start = time.perf_counter()
    classifier.logits(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(ROOT / "baselines/digits-standard.safetensors"))
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    images, _ = digits_split("test")
    images = images.repeat(args.copies, 1, 1, 1).contiguous()
    local = Classifier(
        load_model(args.weights, arch="small_cnn", num_classes=10), 10, batch_size=args.batch_size
    )
    config = ModelProcessConfig(
        model_path=args.weights,
        model_format="safetensors",
        architecture="small_cnn",
        num_classes=10,
        threads=threads,
    )
    with LocalModelProcess(config) as process:
        remote = Classifier(
            RemoteModel(process.client), 10, batch_size=args.batch_size, channels_last=False
        )
        # Warm-up, and the two must agree.
        torch.testing.assert_close(local.logits(images[:1024]), remote.logits(images[:1024]))
        in_process, split = [], []
        for _ in range(args.rounds):
            in_process.append(_time(local, images))
            split.append(_time(remote, images))
    a, b = statistics.median(in_process), statistics.median(split)
    print(
        f"{len(images):,} images of {tuple(images.shape[1:])}, batch {args.batch_size}, "
        f"{threads} threads, {args.rounds} alternating rounds (medians)"
    )
    print(f"(a) in process      {a:8.3f} s   {len(images) / a:10,.0f} images/s")
    print(f"(b) model process   {b:8.3f} s   {len(images) / b:10,.0f} images/s")
    print(f"(b)/(a) = {b / a:.3f}  (target: at most 1.05)")


if __name__ == "__main__":
    main()
