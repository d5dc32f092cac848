"""The sandboxed evaluation process: ``python -m worker.sandbox_child REPORT_FD PARENT_PID``.

Started by `worker.sandbox` with an empty environment, as an unprivileged user when the worker
is root. Its first acts, before it touches anything the user uploaded, lock it down further:
resource limits, death with its parent, and (where the kernel allows) a user and network
namespace with no network. Then it reads its job as one JSON object on stdin, opens the model
(``.pt2`` archives are opened only here), runs `evaluator.evaluate.evaluate`, saves a few
example images into the job's output folder and writes JSON lines to ``REPORT_FD``:

    {"type": "hello", "pid", "device", "network_isolated"}
    {"type": "progress", "phase", "fraction", "forward_passes", "elapsed_s", "eta_s"}
    {"type": "result", "result": EvaluationResult.to_dict(), "examples": [...]}
    {"type": "error", "error": "ModelOutputError", "message": "...", "category": "model"}

Nothing here is trusted by the parent: it validates what comes back. This module imports no
database, broker or settings code, and reads no environment variables beyond what torch does.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

# Error categories the parent turns into messages.
CATEGORY_MODEL = "model"  # the user can fix it: format, weights, outputs
CATEGORY_MEMORY = "out_of_memory"
CATEGORY_DATASET = "dataset"  # the operator must fix it: files missing on the worker
CATEGORY_INTERNAL = "internal"

_PR_SET_PDEATHSIG = 1
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MAX_JOB_BYTES = 1 << 20
_PROGRESS_EVERY_S = 0.5


class Reporter:
    """JSON lines to the parent, one write per message so lines never interleave."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.last_progress = 0.0
        self.last_phase: str | None = None

    def send(self, message: dict[str, Any]) -> None:
        self.stream.write(json.dumps(message, allow_nan=False).encode() + b"\n")
        self.stream.flush()

    def progress(self, progress: Any) -> None:
        now = time.monotonic()
        if progress.phase == self.last_phase and now - self.last_progress < _PROGRESS_EVERY_S:
            return
        self.last_progress, self.last_phase = now, progress.phase
        self.send(
            {
                "type": "progress",
                "phase": progress.phase,
                "fraction": progress.fraction,
                "forward_passes": progress.forward_passes,
                "elapsed_s": progress.elapsed_s,
                "eta_s": progress.eta_s,
            }
        )


# --- Lockdown ---------------------------------------------------------------------------------


def _set_limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def lock_down(job: dict[str, Any], parent_pid: int) -> bool:
    """Limits that hold from now on, whatever the model does. Returns whether the process has
    no network. Runs while the process has one thread: unshare(CLONE_NEWUSER) needs that."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Die with the worker: a killed worker must not leave an evaluation running on the GPU.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)
    limits = job.get("limits", {})
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_NOFILE, int(limits.get("open_files", 4096)))
    _set_limit(resource.RLIMIT_FSIZE, int(limits.get("file_bytes", 1 << 30)))
    isolated = False
    if limits.get("isolate_network", True):
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
            # Map our own ids, or files we create would belong to the overflow user.
            try:
                Path("/proc/self/setgroups").write_text("deny")
                Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
                Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
                isolated = True
            except OSError:
                isolated = True  # no network either way; files just show another owner
            # Credentials changed: set the death signal again, the kernel may have cleared it.
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return isolated


def limit_memory(job: dict[str, Any], device_type: str) -> None:
    # CUDA reserves terabytes of virtual address space for unified addressing, so an
    # address-space cap would break it; on the GPU the device's memory is the limit and the
    # container's memory limit guards the host.
    memory = job.get("limits", {}).get("memory_bytes")
    if memory and device_type == "cpu":
        _set_limit(resource.RLIMIT_AS, int(memory))


# --- The work ---------------------------------------------------------------------------------


def _pick_device(requested: str) -> Any:
    import torch

    if requested in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def evaluate_job(job: dict[str, Any], reporter: Reporter, isolated: bool) -> None:
    import torch

    from evaluator.attacks import Classifier
    from evaluator.benchmarks import get_benchmark, load_benchmark_file
    from evaluator.data import load_dataset, resolve_benchmark
    from evaluator.evaluate import EvalOptions, evaluate
    from evaluator.models.loading import load_model

    threads = job.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    device = _pick_device(job.get("device", "auto"))
    limit_memory(job, device.type)
    reporter.send(
        {"type": "hello", "pid": os.getpid(), "device": str(device), "network_isolated": isolated}
    )

    extra = load_benchmark_file(job["benchmarks_file"]) if job.get("benchmarks_file") else None
    spec = get_benchmark(job["benchmark"], extra)
    dataset = load_dataset(spec, job.get("data_dir"))
    spec = resolve_benchmark(spec, dataset)
    model = load_model(
        job["model_path"],
        arch=job.get("architecture"),
        num_classes=spec.num_classes,
        mean=job.get("mean"),
        std=job.get("std"),
        device=device,
        allow_export=job.get("model_format") == "export",
    )
    classifier = Classifier(
        model,
        spec.num_classes,
        device=device,
        batch_size=int(job.get("batch_size", 512)),
        bf16=bool(job.get("bf16", False)),
    )
    options = EvalOptions(limit=job.get("limit"))
    result = evaluate(classifier, dataset, spec, options, progress=reporter.progress)
    examples: list[dict[str, Any]] = []
    if job.get("output_dir") and job.get("examples", 0) > 0:
        examples = save_examples(
            classifier, dataset, spec, result.per_image, Path(job["output_dir"]), job["examples"]
        )
    reporter.send({"type": "result", "result": result.to_dict(), "examples": examples})


def _upscaled_png(image: Any, path: Path, min_size: int = 128) -> None:
    import math

    import torch.nn.functional as F
    from PIL import Image

    h, w = image.shape[-2:]
    factor = max(1, math.ceil(min_size / max(h, w)))
    big = F.interpolate(image[None], scale_factor=factor, mode="nearest")[0]
    array = (big.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    Image.fromarray(array).save(path, format="PNG")


def save_examples(
    classifier: Any,
    dataset: Any,
    spec: Any,
    per_image: dict[str, list[int]],
    out: Path,
    count: int,
) -> list[dict[str, Any]]:
    """Up to ``count`` images the grid attack fooled and a few it did not, as PNGs (original,
    and transformed at the first fooling grid point, or at the grid's far corner for robust
    ones) upscaled for display; returns their metadata."""
    import torch

    from evaluator.transforms import spatial_transform

    robust = per_image.get("grid_robust", [])
    natural_ok = [
        p == lbl for p, lbl in zip(per_image["natural_pred"], per_image["label"], strict=True)
    ]
    fooled_rows = [i for i, r in enumerate(robust) if r == 0 and natural_ok[i]][:count]
    robust_rows = [i for i, r in enumerate(robust) if r == 1][: max(1, count // 4)]
    rows = fooled_rows + robust_rows
    if not rows:
        return []
    out.mkdir(parents=True, exist_ok=True)
    points = spec.grid.points()
    corner = points.abs().sum(dim=1).argmax()
    indices = torch.tensor([per_image["index"][i] for i in rows])
    images, _labels = dataset.load(indices)
    params = torch.stack(
        [
            points[per_image["grid_fool_point"][i]] if robust[i] == 0 else points[corner]
            for i in rows
        ]
    )
    moved = spatial_transform(images, params, spec.fill)
    predictions, _ = classifier.predict(moved.to(classifier.device))
    names = list(getattr(spec, "class_names", ()) or ())
    examples = []
    for n, row in enumerate(rows):
        index = int(per_image["index"][row])
        original, transformed = f"{n:02d}_original.png", f"{n:02d}_transformed.png"
        _upscaled_png(images[n], out / original)
        _upscaled_png(moved[n], out / transformed)
        label, pred = int(per_image["label"][row]), int(per_image["natural_pred"][row])
        theta, dx, dy = (float(v) for v in params[n])
        example = {
            "index": index,
            "label": label,
            "pred": pred,
            "fooled": robust[row] == 0,
            "point": {"theta": theta, "dx": dx, "dy": dy},
            "fool_pred": int(predictions[n]),
            "original": original,
            "transformed": transformed,
        }
        if names:
            fool_pred = int(predictions[n])
            example["label_name"] = names[label] if label < len(names) else str(label)
            example["fool_pred_name"] = names[fool_pred] if fool_pred < len(names) else ""
        examples.append(example)
    return examples


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(category, message) for an exception raised while evaluating."""
    import torch

    from evaluator.errors import DatasetMissingError, EvaluatorError

    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return CATEGORY_MEMORY, str(exc) or type(exc).__name__
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "out of memory", "std::bad_alloc")
    ):
        return CATEGORY_MEMORY, text
    if isinstance(exc, DatasetMissingError):
        return CATEGORY_DATASET, text
    if isinstance(exc, EvaluatorError):
        return CATEGORY_MODEL, text
    # Anything else raised while the user's model ran (a .pt2 graph can raise anything).
    return CATEGORY_MODEL, f"{type(exc).__name__}: {text}"


def main(argv: list[str]) -> int:
    report_fd, parent_pid = int(argv[0]), int(argv[1])
    job = json.loads(sys.stdin.buffer.read(_MAX_JOB_BYTES))
    isolated = lock_down(job, parent_pid)
    # Model code that prints must not corrupt the report channel: it is a separate fd.
    reporter = Reporter(os.fdopen(report_fd, "wb", buffering=0))
    try:
        evaluate_job(job, reporter, isolated)
    except BaseException as exc:  # report everything, including MemoryError
        try:
            category, message = classify_error(exc)
        except BaseException:  # the import in classify_error itself ran out of memory
            category, message = CATEGORY_MEMORY, repr(exc)
        traceback.print_exc(file=sys.stderr)
        reporter.send(
            {
                "type": "error",
                "error": type(exc).__name__,
                "category": category,
                "message": message[:4000],
            }
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
