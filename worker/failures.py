"""How a sandboxed evaluation fails, worded for the user who submitted the model.

`SandboxFailure` carries a kind (who can fix it) and a message a user can act on; the detail
(stderr, the evaluator's text) is for the operator's log. `reported_failure` words what the
evaluator process reported, `died` what an exit without a report most likely means, and
`deadline_failure` a shard that ran past its time limit. Used by `worker.sandbox`; imports
neither torch nor the evaluator.
"""

from __future__ import annotations

import signal

from worker.bwrap import SETUP_ERROR_PREFIXES
from worker.messages import ErrorCategory, ErrorReport

__all__ = [
    "SandboxFailure",
    "SandboxStopped",
    "deadline_failure",
    "died",
    "reported_failure",
]


class SandboxFailure(Exception):
    """The evaluation did not produce a result; ``message`` is meant for the user."""

    # Why: "model", "out_of_memory", "deadline", "dataset", "crashed", "internal".
    def __init__(self, kind: str, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.detail = detail


class SandboxStopped(Exception):
    """``tick`` asked to stop (the job was cancelled, or this worker lost it)."""


def deadline_failure(deadline_s: float) -> SandboxFailure:
    return SandboxFailure(
        "deadline",
        f"The evaluation did not finish within its time limit of {_duration(deadline_s)} and "
        "was stopped. Make the model faster (smaller, or fewer operations per image), or ask "
        "the operator for a longer limit.",
    )


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _memory_message(memory_bytes: int | None, batch_size: int) -> str:
    cap = f" (the limit is {memory_bytes / 2**30:.1f} GiB of host memory)" if memory_bytes else ""
    return (
        f"The evaluation ran out of memory{cap}. Reduce the model's memory use: fewer "
        f"parameters or smaller activations per image (the worker evaluates batches of up to "
        f"{batch_size} images)."
    )


def reported_failure(
    report: ErrorReport, memory_bytes: int | None, batch_size: int, stderr: str
) -> SandboxFailure:
    """The failure the evaluator reported (``stderr``: the model process's, for the
    operator)."""
    text = report.message[:2000]
    if report.category is ErrorCategory.OUT_OF_MEMORY:
        return SandboxFailure(
            "out_of_memory", _memory_message(memory_bytes, batch_size), detail=text
        )
    if report.category is ErrorCategory.DATASET:
        return SandboxFailure(
            "dataset",
            f"The benchmark's dataset is not available on the worker, which the operator has "
            f"to fix; submit again once it is installed. ({text})",
            detail=text,
        )
    if report.category is ErrorCategory.MODEL:
        return SandboxFailure("model", _model_message(report.error, text), detail=stderr)
    return SandboxFailure("internal", f"The evaluation failed: {text}", detail=stderr)


_MODEL_PREFIX = {
    "WeightsMismatchError": "The weights do not fit the architecture",
    "UnknownArchitectureError": "Unknown architecture",
    "ModelFormatError": "The model file cannot be used",
    "ModelOutputError": "The model's output is unusable",
    "UnknownBenchmarkError": "Unknown benchmark",
}


def _model_message(error: str, text: str) -> str:
    prefix = _MODEL_PREFIX.get(error)
    if prefix is not None:
        return f"{prefix}: {text}"
    return f"The model raised an error while it was evaluated: {text}"


def died(returncode: int | None, memory_bytes: int | None, stderr: str) -> SandboxFailure:
    """A sandboxed process exited without a report."""
    if any(line.startswith(SETUP_ERROR_PREFIXES) for line in stderr.splitlines()):
        # bubblewrap, setpriv or unshare could not build the sandbox: nothing ran.
        return SandboxFailure(
            "internal",
            "The worker cannot start its sandbox; the operator has to fix this (see the "
            "worker's log).",
            detail=stderr,
        )
    lowered = stderr.lower()
    memory_words = ("memoryerror", "bad_alloc", "cannot allocate memory", "out of memory")
    killed = returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
    if killed or any(word in lowered for word in memory_words):
        # A SIGKILL we did not send is the kernel's OOM killer (or the container's).
        cap = f" (the limit is {memory_bytes / 2**30:.1f} GiB)" if memory_bytes else ""
        return SandboxFailure(
            "out_of_memory",
            f"The evaluation process was killed, most likely because it ran out of "
            f"memory{cap}. Reduce the model's memory use: fewer parameters or smaller "
            "activations per image.",
            detail=stderr,
        )
    code = returncode if returncode is not None else -1
    how = f"signal {-code}" if code < 0 else f"exit status {code}"
    return SandboxFailure(
        "crashed",
        f"The evaluation process crashed ({how}) without reporting an error. If the model is "
        "a torch.export archive, check that the exported program runs with torch 2.14 on a CPU "
        "before saving it: ep.module()(torch.rand(2, C, H, W)).",
        detail=stderr,
    )
