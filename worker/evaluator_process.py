"""The evaluator process: ``python -m worker.evaluator_process ANSWER_FD REQUEST_FD REPORT_FD``.

Trusted code only: the benchmark's data, the transforms, the attacks, the votes, the metrics
and the example images. It never opens the model file; the model is a `RemoteModel` whose
logits (and gradients) come from the model process over ``REQUEST_FD``/``ANSWER_FD``.

Started by `worker.sandbox` under bubblewrap, it reads JSON lines on stdin: its job
(`worker.messages.EvaluatorJob`), then one `worker.messages.ShardRequest` per shard, and
end of input when there are no more. It writes `worker.messages.Report` JSON lines to
``REPORT_FD``: a hello (with the number of classes, which the worker passes on to the model
process), then for each shard progress and one result (naming the shard, with that shard's
example images in the output folder), or one error, after which it exits. The benchmark and
the model are opened once for all the shards; each shard is a new `evaluate` call. Only this
process's reports reach the leaderboard.
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
    Hello,
    ProgressReport,
    ResultReport,
    ShardRequest,
)

__all__ = ["Reporter", "eval_options", "main", "read_line", "run_session"]

# The job's line and each shard's: a few hundred bytes.
_MAX_LINE_BYTES = 1 << 20
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

    def start_shard(self) -> None:
        """A shard's progress starts afresh: its first message is never held back."""
        self.last_phase = None

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
    """`EvalOptions(**job.options)`, with ``job.limit`` as the default limit. JSON has no sets:
    ``metrics`` is a list of names. ``shard`` is refused: each `ShardRequest` sets it."""
    from evaluator.evaluate import EvalOptions

    raw = dict(job.options or {})
    known = {f.name for f in dataclasses.fields(EvalOptions)} - {"shard"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidOptions(f"unknown evaluation options: {', '.join(unknown)}")
    if job.limit is not None:
        raw.setdefault("limit", job.limit)
    try:
        return EvalOptions(**raw)
    except (TypeError, ValueError) as exc:
        raise InvalidOptions(f"invalid evaluation options: {exc}") from exc


def run_session(
    job: EvaluatorJob, reporter: Reporter, client_channel: Any, requests: IO[bytes]
) -> None:
    """Open the benchmark and the remote model once, then evaluate each shard read from
    ``requests`` (one `ShardRequest` line each, until end of input) as an evaluation of its
    own, reporting its result and its example images before reading the next."""
    import torch

    from evaluator.attacks import Classifier
    from evaluator.benchmarks import get_benchmark, load_benchmark_file
    from evaluator.data import load_dataset, resolve_benchmark
    from evaluator.evaluate import evaluate
    from evaluator.examples import save_examples
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
    written: list[Path] = []
    try:
        while (line := read_line(requests)) is not None:
            request = ShardRequest.model_validate_json(line)
            shard = range(request.start, request.stop)
            reporter.start_shard()
            result = evaluate(
                classifier,
                dataset,
                spec,
                dataclasses.replace(options, shard=shard),
                progress=reporter.progress,
            )
            # The worker copied the last shard's images before it asked for this one; the
            # names start at 00 again.
            for path in written:
                path.unlink(missing_ok=True)
            examples: list[Example] = []
            if job.output_dir and job.examples > 0:
                out = Path(job.output_dir)
                saved = save_examples(
                    classifier, dataset, spec, result.per_image, out, job.examples
                )
                written = [out / name for e in saved for name in (e.original, e.transformed)]
                examples = [Example.model_validate(e.to_dict()) for e in saved]
            reporter.send(ResultReport(shard=request, result=result.to_dict(), examples=examples))
    finally:
        client.shutdown()


def read_line(stream: IO[bytes], limit: int = _MAX_LINE_BYTES) -> bytes | None:
    """The next line of ``stream``, or None at its end; a line over ``limit`` is refused."""
    line = stream.readline(limit + 1)
    if len(line) > limit:
        raise ValueError(f"a line over {limit} bytes on stdin")
    return line or None


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
    requests = sys.stdin.buffer
    job = EvaluatorJob.model_validate_json(read_line(requests) or b"")
    apply_limits(open_files=job.open_files, file_bytes=job.file_bytes)
    reporter = Reporter(os.fdopen(report_fd, "wb", buffering=0))
    from worker.channel import FrameChannel

    channel = FrameChannel(answer_fd, request_fd)
    try:
        run_session(job, reporter, channel, requests)
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
