"""Running an untrusted model: a child process with an empty environment, limits and a deadline.

`run_sandboxed` starts ``python -m worker.sandbox_child`` (see there for the protocol) and
drives it until it reports a result or an error, dies, overruns its deadline or is stopped:

- **environment**: empty but for the few variables listed in `child_environment` (no
  database or broker URLs, no secrets); ``HOME`` and ``TMPDIR`` are a private folder that
  is removed afterwards.
- **user**: when the worker runs as root, the child runs as ``sandbox_user`` (``nobody``)
  with no supplementary groups; the model file is copied into the private folder for it.
- **limits**: the child sets them on itself before it reads the model: no core dumps, open
  files and file sizes capped, address space capped on the CPU; and no network where the
  kernel allows a user namespace. (Not ``preexec_fn``: it is unsafe in a process with threads,
  and the worker has some.)
- **deadline and stop**: the parent kills the child's process group when the wall-clock
  deadline passes or ``tick`` says stop; the child also dies with its parent.

The parent never trusts what comes back: lines are size-capped JSON, example images are
copied only if they are plain PNG files the child wrote itself. This module imports neither
torch nor the evaluator, so the worker process never loads a model.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The result of a 50,000-image ImageNet run is a few MB of JSON; anything far above is abuse.
MAX_LINE_BYTES = 256 * 2**20
MAX_EXAMPLE_BYTES = 4 * 2**20
STDERR_TAIL_BYTES = 4000
_EXAMPLE_NAME = re.compile(r"^[0-9]{2}_(original|transformed)\.png$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Variables passed through from the worker's environment: device selection and library paths
# of the CUDA images. Nothing else crosses.
JOB_DIR_PREFIX = "spatialbench-job-"
PASSTHROUGH_ENV = ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES", "TZ")


@dataclass(frozen=True)
class SandboxJob:
    """What to evaluate; becomes the child's job JSON (paths are rewritten for the child)."""

    model_path: Path
    model_format: str
    benchmark: str
    architecture: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    data_dir: Path | None = None
    benchmarks_file: Path | None = None
    device: str = "auto"
    batch_size: int = 512
    bf16: bool = False
    limit: int | None = None
    examples: int = 8


@dataclass(frozen=True)
class SandboxLimits:
    deadline_s: float
    memory_bytes: int | None = 16 * 2**30
    threads: int | None = None
    # Run as this user when the worker is root; None or "" keeps the worker's user.
    user: str | None = "nobody"
    # In production a user that cannot run the interpreter is a configuration error; elsewhere
    # (the embedded mode, run as root from a home directory closed to others) the child then
    # keeps the worker's user, with everything else of the sandbox, and a warning is logged.
    require_user: bool = False
    isolate_network: bool = True
    open_files: int = 4096
    file_bytes: int = 2**30
    tmp_dir: Path | None = None


@dataclass
class SandboxOutput:
    result: dict[str, Any]
    examples: list[dict[str, Any]]
    # The example PNGs, checked, in a folder the caller owns and must remove.
    examples_dir: Path | None
    hello: dict[str, Any] = field(default_factory=dict)


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


def remove_abandoned_job_dirs(tmp_dir: Path | None = None) -> list[Path]:
    """Delete the private folders of sandboxes whose worker process died (a killed worker
    cannot clean up after itself); folders of live processes are left alone."""
    removed = []
    root = Path(tmp_dir or tempfile.gettempdir())
    for path in root.glob(f"{JOB_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(JOB_DIR_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def child_environment(tmp: Path, threads: int | None) -> dict[str, str]:
    """The child's whole environment."""
    n = str(threads or os.cpu_count() or 1)
    env = {
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "HOME": str(tmp),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
    }
    for name in PASSTHROUGH_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _can_run_interpreter(user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may traverse to and execute this interpreter and the project."""
    paths = [Path(sys.executable).resolve(), Path(sys.executable).absolute(), PROJECT_ROOT]
    for path in paths:
        for folder in [*path.parents, path]:
            try:
                info = folder.stat()
            except OSError:
                return False
            if info.st_uid == user.pw_uid:
                continue
            bit = stat.S_IXGRP if info.st_gid == user.pw_gid else stat.S_IXOTH
            if not info.st_mode & bit:
                return False
    return True


def _sandbox_user(name: str | None, required: bool = False) -> pwd.struct_passwd | None:
    if not name or os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        raise SandboxFailure(
            "internal",
            "The worker is misconfigured: its sandbox user does not exist.",
            detail=f"no user {name!r}; set SPATIALBENCH_SANDBOX_USER",
        ) from None
    if _can_run_interpreter(user):
        return user
    if required:
        raise SandboxFailure(
            "internal",
            "The worker is misconfigured: its sandbox user cannot run the evaluator.",
            detail=f"user {name!r} cannot reach {sys.executable} or {PROJECT_ROOT}",
        )
    log.warning(
        "sandbox user %r cannot run %s; the evaluation runs as the worker's user",
        name,
        sys.executable,
    )
    return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(f: Any, limit: int = STDERR_TAIL_BYTES) -> str:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", "replace")


def _collect_examples(
    examples: Any, source: Path, owner_uid: int
) -> tuple[list[dict[str, Any]], Path | None]:
    """Copy the example PNGs the child wrote into a folder only we can write, keeping only
    plain, single-link, size-capped PNG files owned by the child (a symlink or hard link could
    point at a file the child may not read)."""
    if not isinstance(examples, list) or not examples:
        return [], None
    target: Path | None = None
    kept: list[dict[str, Any]] = []
    for example in examples[:64]:
        if not isinstance(example, dict):
            continue
        names = [example.get("original"), example.get("transformed")]
        checked = [n for n in names if isinstance(n, str) and _EXAMPLE_NAME.match(n)]
        if len(checked) != 2:
            continue
        try:
            clean = _clean_example(example)
        except (TypeError, ValueError):
            continue
        contents = [_read_png(source / name, owner_uid) for name in checked]
        if any(data is None for data in contents):
            continue
        if target is None:
            target = Path(tempfile.mkdtemp(prefix="spatialbench-examples-"))
        for name, data in zip(checked, contents, strict=True):
            assert data is not None
            (target / name).write_bytes(data)
        kept.append(clean)
    return kept, target


def _read_png(path: Path, owner_uid: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != owner_uid:
            return None
        data = f.read(MAX_EXAMPLE_BYTES + 1)
    if len(data) > MAX_EXAMPLE_BYTES or not data.startswith(_PNG_SIGNATURE):
        return None
    return data


def _clean_example(example: dict[str, Any]) -> dict[str, Any]:
    """Only the expected keys, with the expected types."""
    given = example.get("point")
    point: dict[str, Any] = given if isinstance(given, dict) else {}
    out: dict[str, Any] = {
        "index": int(example.get("index", -1)),
        "label": int(example.get("label", -1)),
        "pred": int(example.get("pred", -1)),
        "fooled": bool(example.get("fooled", False)),
        "point": {k: float(point.get(k, 0.0)) for k in ("theta", "dx", "dy")},
        "fool_pred": int(example.get("fool_pred", -1)),
        "original": str(example["original"]),
        "transformed": str(example["transformed"]),
    }
    for key in ("label_name", "fool_pred_name"):
        if isinstance(example.get(key), str):
            out[key] = example[key][:100]
    return out


def run_sandboxed(
    job: SandboxJob,
    limits: SandboxLimits,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    tick: Callable[[], bool] | None = None,
    tick_interval_s: float = 1.0,
) -> SandboxOutput:
    """Evaluate ``job`` in a sandboxed child; see the module doc.

    ``on_progress`` gets each progress message (dicts with phase, fraction, forward_passes,
    elapsed_s, eta_s). ``tick`` is called about every ``tick_interval_s`` seconds; when it
    returns True the child is killed and `SandboxStopped` raised. Raises `SandboxFailure` with a
    user-facing message when the evaluation fails, for whatever reason.
    """
    user = _sandbox_user(limits.user, limits.require_user)
    tmp = Path(tempfile.mkdtemp(prefix=f"{JOB_DIR_PREFIX}{os.getpid()}-", dir=limits.tmp_dir))
    read_fd, write_fd = os.pipe()
    proc: subprocess.Popen[bytes] | None = None
    try:
        model_copy = tmp / ("model.pt2" if job.model_format == "export" else "model.safetensors")
        shutil.copyfile(job.model_path, model_copy)
        output_dir = tmp / "out"
        output_dir.mkdir()
        owner_uid = os.getuid()
        if user is not None:
            owner_uid = user.pw_uid
            for path in (tmp, output_dir, model_copy):
                os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(tmp, 0o700)
        os.chmod(model_copy, 0o400)
        child_job = {
            "model_path": str(model_copy),
            "model_format": job.model_format,
            "architecture": job.architecture,
            "mean": job.mean,
            "std": job.std,
            "benchmark": job.benchmark,
            "benchmarks_file": str(job.benchmarks_file) if job.benchmarks_file else None,
            "data_dir": str(job.data_dir) if job.data_dir else None,
            "device": job.device,
            "batch_size": job.batch_size,
            "bf16": job.bf16,
            "limit": job.limit,
            "examples": job.examples,
            "output_dir": str(output_dir),
            "threads": limits.threads,
            "limits": {
                "memory_bytes": limits.memory_bytes,
                "open_files": limits.open_files,
                "file_bytes": limits.file_bytes,
                "isolate_network": limits.isolate_network,
            },
        }
        # An unnamed file: the child writes its stdout and stderr there, and cannot swap it
        # for a link to something it may not read.
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-s",
                        "-m",
                        "worker.sandbox_child",
                        str(write_fd),
                        str(os.getpid()),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=stderr,
                    stderr=stderr,
                    pass_fds=(write_fd,),
                    env=child_environment(tmp, limits.threads),
                    cwd=tmp,
                    start_new_session=True,
                    close_fds=True,
                    user=user.pw_uid if user else None,
                    group=user.pw_gid if user else None,
                    extra_groups=[] if user else None,
                )
            except PermissionError as exc:
                raise SandboxFailure(
                    "internal",
                    "The worker is misconfigured: it cannot start the evaluation process.",
                    detail=f"{exc} (can user {limits.user!r} run {sys.executable}?)",
                ) from exc
            os.close(write_fd)
            write_fd = -1
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(child_job).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            message = _drive(proc, read_fd, limits, on_progress, tick, tick_interval_s, stderr)
            if message["type"] == "error":
                raise _child_error(message, limits, job, _tail(stderr))
            examples, examples_dir = _collect_examples(
                message.get("examples"), output_dir, owner_uid
            )
            return SandboxOutput(
                result=message["result"],
                examples=examples,
                examples_dir=examples_dir,
                hello=message.get("hello", {}),
            )
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _drive(
    proc: subprocess.Popen[bytes],
    read_fd: int,
    limits: SandboxLimits,
    on_progress: Callable[[dict[str, Any]], None] | None,
    tick: Callable[[], bool] | None,
    tick_interval_s: float,
    stderr: Any,
) -> dict[str, Any]:
    """Read the child's lines until its result or error; enforce the deadline and stops."""
    deadline = time.monotonic() + limits.deadline_s
    next_tick = time.monotonic() + tick_interval_s
    buffer = bytearray()
    hello: dict[str, Any] = {}
    eof = False
    os.set_blocking(read_fd, False)
    while True:
        now = time.monotonic()
        if now >= deadline:
            _kill_group(proc)
            raise SandboxFailure(
                "deadline",
                f"The evaluation did not finish within its time limit of "
                f"{_duration(limits.deadline_s)} and was stopped. Make the model faster "
                "(smaller, or fewer operations per image), or ask the operator for a longer "
                "limit.",
            )
        if tick is not None and now >= next_tick:
            next_tick = now + tick_interval_s
            if tick():
                _kill_group(proc)
                raise SandboxStopped()
        got_data = False
        if not eof:
            wait = max(0.0, min(deadline, next_tick) - now)
            ready, _, _ = select.select([read_fd], [], [], min(wait, 0.5))
            if ready:
                try:
                    chunk = os.read(read_fd, 1 << 20)
                except BlockingIOError:
                    chunk = b""
                else:
                    eof = chunk == b""
                got_data = bool(chunk)
                buffer += chunk
        else:
            time.sleep(0.05)
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer = bytearray(rest)
            message = _parse(line, proc)
            kind = message.get("type")
            if kind == "hello":
                hello = message
                log.info(
                    "sandbox pid %s on %s, network isolated: %s",
                    message.get("pid"),
                    message.get("device"),
                    message.get("network_isolated"),
                )
            elif kind == "progress":
                if on_progress is not None:
                    on_progress(message)
            elif kind in ("result", "error"):
                message["hello"] = hello
                return message
        if len(buffer) > MAX_LINE_BYTES:
            _kill_group(proc)
            raise SandboxFailure(
                "internal",
                "The evaluation process sent an oversized report.",
                detail=f"a line over {MAX_LINE_BYTES} bytes",
            )
        # Done when the pipe is closed, or when the child has exited and the pipe is drained
        # (a grandchild may hold its write end open).
        if eof or (proc.poll() is not None and not got_data):
            proc.wait()
            raise _died(proc.returncode, limits, _tail(stderr))


def _parse(line: bytes, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        message = None
    if not isinstance(message, dict) or (
        message.get("type") == "result" and not isinstance(message.get("result"), dict)
    ):
        _kill_group(proc)
        raise SandboxFailure(
            "internal",
            "The evaluation process sent a malformed report.",
            detail=repr(line[:200]),
        )
    return message


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def _memory_message(limits: SandboxLimits, job: SandboxJob) -> str:
    cap = (
        f" (the limit is {limits.memory_bytes / 2**30:.1f} GiB of host memory)"
        if limits.memory_bytes
        else ""
    )
    return (
        f"The evaluation ran out of memory{cap}. Reduce the model's memory use: fewer "
        f"parameters or smaller activations per image (the worker evaluates batches of up to "
        f"{job.batch_size} images)."
    )


def _child_error(
    message: dict[str, Any], limits: SandboxLimits, job: SandboxJob, stderr: str
) -> SandboxFailure:
    category = str(message.get("category", "internal"))
    text = str(message.get("message", ""))[:2000]
    error = str(message.get("error", "Error"))[:100]
    if category == "out_of_memory":
        return SandboxFailure("out_of_memory", _memory_message(limits, job), detail=text)
    if category == "dataset":
        return SandboxFailure(
            "dataset",
            f"The benchmark's dataset is not available on the worker, which the operator has "
            f"to fix; submit again once it is installed. ({text})",
            detail=text,
        )
    if category == "model":
        return SandboxFailure("model", _model_message(error, text), detail=stderr)
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


def _died(returncode: int, limits: SandboxLimits, stderr: str) -> SandboxFailure:
    """The child exited without a report."""
    lowered = stderr.lower()
    memory_words = ("memoryerror", "bad_alloc", "cannot allocate memory", "out of memory")
    if returncode == -signal.SIGKILL or any(word in lowered for word in memory_words):
        # A SIGKILL we did not send is the kernel's OOM killer (or the container's).
        cap = (
            f" (the limit is {limits.memory_bytes / 2**30:.1f} GiB)" if limits.memory_bytes else ""
        )
        return SandboxFailure(
            "out_of_memory",
            f"The evaluation process was killed, most likely because it ran out of "
            f"memory{cap}. Reduce the model's memory use: fewer parameters or smaller "
            "activations per image.",
            detail=stderr,
        )
    how = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return SandboxFailure(
        "crashed",
        f"The evaluation process crashed ({how}) without reporting an error. If the model is "
        "a torch.export archive, check that it runs with torch 2.14 on a CPU: "
        "torch.export.load('model.pt2').module()(torch.rand(2, C, H, W)).",
        detail=stderr,
    )
