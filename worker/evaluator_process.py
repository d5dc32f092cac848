"""The evaluator process: ``python -m worker.evaluator_process ANSWER_FD REQUEST_FD REPORT_FD``.

Trusted code only: the benchmark's data, the transforms, the attacks, the votes, the metrics
and the example images. It never opens the model file; the model is a `RemoteModel` whose
logits (and gradients) come from the model process over ``REQUEST_FD``/``ANSWER_FD``. Started
by `worker.sandbox` under bubblewrap with its job (`worker.messages.EvaluatorJob`) as JSON on
stdin, it writes `worker.messages.Report` JSON lines to ``REPORT_FD``: a hello (with the
number of classes, which the worker passes on to the model process), progress, and then one
result or one error. Only this process's reports reach the leaderboard.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

from worker.limits import apply_limits, limit_memory
from worker.messages import (
    MAX_REPORT_TEXT,
    ErrorCategory,
    ErrorReport,
    EvaluatorJob,
    Example,
    ExamplePoint,
    Hello,
    ProgressReport,
    ResultReport,
)

__all__ = ["Reporter", "eval_options", "main", "save_examples"]

_MAX_JOB_BYTES = 1 << 20
_PROGRESS_EVERY_S = 0.5


class InvalidOptions(ValueError):
    """The job's evaluation options are not `EvalOptions` fields (a worker bug, not the user's)."""


class Reporter:
    """JSON lines to the worker, one write per message so lines never interleave."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.last_progress = 0.0
        self.last_phase: str | None = None

    def send(self, report: Hello | ProgressReport | ResultReport | ErrorReport) -> None:
        self.stream.write(report.model_dump_json().encode() + b"\n")
        self.stream.flush()

    def progress(self, progress: Any) -> None:
        now = time.monotonic()
        if progress.phase == self.last_phase and now - self.last_progress < _PROGRESS_EVERY_S:
            return
        self.last_progress, self.last_phase = now, progress.phase
        eta = progress.eta_s if progress.eta_s is None or math.isfinite(progress.eta_s) else None
        self.send(
            ProgressReport(
                phase=str(progress.phase)[:32],
                fraction=min(max(float(progress.fraction), 0.0), 1.0),
                forward_passes=int(progress.forward_passes),
                elapsed_s=max(float(progress.elapsed_s), 0.0),
                eta_s=eta,
            )
        )


def network_isolated() -> bool:
    """True when this process sees no network interface but loopback (a new net namespace)."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return all(line.split(":", 1)[0].strip() == "lo" for line in lines)


def pick_device(requested: str) -> Any:
    import torch

    if requested in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def eval_options(job: EvaluatorJob) -> Any:
    """`EvalOptions(**job.options)`, with ``job.limit`` as the default limit. JSON has no sets
    or ranges: ``metrics`` is a list of names, ``shard`` a ``[start, stop]`` pair."""
    from evaluator.evaluate import EvalOptions, Metric

    raw = dict(job.options or {})
    known = {f.name for f in dataclasses.fields(EvalOptions)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidOptions(f"unknown evaluation options: {', '.join(unknown)}")
    if job.limit is not None:
        raw.setdefault("limit", job.limit)
    try:
        if raw.get("metrics") is not None:
            raw["metrics"] = frozenset(Metric(m) for m in raw["metrics"])
        if raw.get("shard") is not None:
            start, stop = raw["shard"]
            raw["shard"] = range(int(start), int(stop))
        return EvalOptions(**raw)
    except (TypeError, ValueError) as exc:
        raise InvalidOptions(f"invalid evaluation options: {exc}") from exc


def evaluate_job(job: EvaluatorJob, reporter: Reporter, client_channel: Any) -> None:
    import torch

    from evaluator.attacks import Classifier
    from evaluator.benchmarks import get_benchmark, load_benchmark_file
    from evaluator.data import load_dataset, resolve_benchmark
    from evaluator.evaluate import evaluate
    from worker.channel import ModelClient, RemoteModel

    if job.threads:
        torch.set_num_threads(job.threads)
    device = pick_device(job.device)
    limit_memory(job.memory_bytes, device.type)
    options = eval_options(job)
    extra = load_benchmark_file(job.benchmarks_file) if job.benchmarks_file else None
    spec = get_benchmark(job.benchmark, extra)
    dataset = load_dataset(spec, job.data_dir)
    spec = resolve_benchmark(spec, dataset)
    reporter.send(
        Hello(
            pid=os.getpid(),
            device=str(device),
            network_isolated=network_isolated(),
            num_classes=spec.num_classes,
        )
    )
    client = ModelClient(client_channel, spec.num_classes)
    client.wait_ready()
    classifier = Classifier(
        RemoteModel(client),
        spec.num_classes,
        device=device,
        batch_size=job.batch_size,
        bf16=job.bf16,
        # The model process lays the batch out for the model; here it crosses as plain NCHW.
        channels_last=False,
    )
    try:
        result = evaluate(classifier, dataset, spec, options, progress=reporter.progress)
        examples: list[Example] = []
        if job.output_dir and job.examples > 0:
            examples = save_examples(
                classifier, dataset, spec, result.per_image, Path(job.output_dir), job.examples
            )
    finally:
        client.shutdown()
    reporter.send(ResultReport(result=result.to_dict(), examples=examples))


def _upscaled_png(image: Any, path: Path, min_size: int = 128) -> None:
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
) -> list[Example]:
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
        original, transformed = f"{n:02d}_original.png", f"{n:02d}_transformed.png"
        _upscaled_png(images[n], out / original)
        _upscaled_png(moved[n], out / transformed)
        label, fool_pred = int(per_image["label"][row]), int(predictions[n])
        theta, dx, dy = (float(v) for v in params[n])
        examples.append(
            Example(
                index=int(per_image["index"][row]),
                label=label,
                pred=int(per_image["natural_pred"][row]),
                fooled=robust[row] == 0,
                point=ExamplePoint(theta=theta, dx=dx, dy=dy),
                fool_pred=fool_pred,
                original=original,
                transformed=transformed,
                label_name=(names[label] if label < len(names) else str(label))[:100]
                if names
                else None,
                fool_pred_name=(names[fool_pred] if fool_pred < len(names) else "")[:100]
                if names
                else None,
            )
        )
    return examples


def classify_error(exc: BaseException) -> tuple[ErrorCategory, str, str]:
    """(category, error name, message) for an exception raised while evaluating."""
    import torch

    from evaluator.errors import DatasetMissingError, EvaluatorError
    from worker.channel import ModelProcessDied, RemoteModelError
    from worker.messages import ModelErrorCode

    text = str(exc)
    if isinstance(exc, ModelProcessDied):
        return ErrorCategory.MODEL_DIED, "ModelProcessDied", text
    if isinstance(exc, RemoteModelError):
        if exc.code is ModelErrorCode.OUT_OF_MEMORY:
            return ErrorCategory.OUT_OF_MEMORY, exc.error, text
        return ErrorCategory.MODEL, exc.error, text
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return ErrorCategory.OUT_OF_MEMORY, type(exc).__name__, text or type(exc).__name__
    if isinstance(exc, DatasetMissingError):
        return ErrorCategory.DATASET, type(exc).__name__, text
    if isinstance(exc, EvaluatorError):
        return ErrorCategory.MODEL, type(exc).__name__, text
    # Trusted code failed: a bug, or the operator's configuration.
    return ErrorCategory.INTERNAL, type(exc).__name__, f"{type(exc).__name__}: {text}"


def main(argv: list[str]) -> int:
    answer_fd, request_fd, report_fd = (int(a) for a in argv[:3])
    job = EvaluatorJob.model_validate_json(sys.stdin.buffer.read(_MAX_JOB_BYTES))
    apply_limits(open_files=job.open_files, file_bytes=job.file_bytes)
    reporter = Reporter(os.fdopen(report_fd, "wb", buffering=0))
    from worker.channel import FrameChannel

    channel = FrameChannel(answer_fd, request_fd)
    try:
        evaluate_job(job, reporter, channel)
    except BaseException as exc:  # report everything, including MemoryError
        try:
            category, error, message = classify_error(exc)
        except BaseException:  # the imports in classify_error themselves ran out of memory
            category, error, message = ErrorCategory.OUT_OF_MEMORY, "MemoryError", repr(exc)
        traceback.print_exc(file=sys.stderr)
        reporter.send(
            ErrorReport(
                error=error[:100],
                category=category,
                message=message[:MAX_REPORT_TEXT],
            )
        )
        return 1
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
