"""Running an untrusted model: two sandboxed processes, limits and a deadline.

`run_sandboxed_shards` makes three pipes and starts two processes once, handing each only its
ends, then has them evaluate shard after shard (ranges of the job's fixed evaluation order)
for as long as its caller hands out shards; `run_sandboxed` is one session of one shard.

- the **model process** (`worker.model_process`) opens the uploaded model and answers logits
  (and input gradients) for the batches it is sent; it sees the model file, read-only, and
  nothing of the data, the labels or the report channel. It opens (and warms up) the model
  once per session, whatever the number of shards.
- the **evaluator process** (`worker.evaluator_process`) runs the trusted evaluator (data,
  transforms, attacks, metrics, example images) against the model process: one new
  evaluation per shard it is sent on its stdin, each reported back with its result. It never
  opens the model file.

Only the evaluator's reports are read here, and each shard's result is bounded against the
benchmark (`worker.result_bounds`) before it is handed on. Both processes run under the
bubblewrap profile of `worker.bwrap` (namespaces, a read-only root of their own, a private
tmpfs, the unprivileged sandbox user when the worker is root). There is no fallback: if the
sandbox cannot start, the job fails (`SandboxFailure` "internal").

Limits and the deadline: each process caps its own open files, file sizes and (on the CPU)
address space before it reads anything; this process kills both when a shard's wall-clock
deadline passes, when ``tick`` says stop, or when the caller's callback raises. This module
imports neither torch nor the evaluator.

How a failure is worded for the user is `worker.failures`'s. This module is longer than most
of the worker's because what is left is one piece that reads best together: the job's files,
the two processes and their pipes, the session loop over shards, the report loop with its
deadline and stops, and the checks on what comes back (results and example PNGs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.bwrap import (
    SANDBOX_JOB,
    Identity,
    Role,
    SandboxSetupError,
    bwrap_command,
    child_environment,
    sandbox_identity,
    sandbox_prefix,
)
from worker.failures import (
    SandboxFailure,
    SandboxStopped,
    deadline_failure,
    died,
    reported_failure,
)
from worker.messages import (
    MAX_POSITION,
    REPORT,
    ErrorCategory,
    ErrorReport,
    EvaluatorJob,
    Example,
    Hello,
    ModelProcessConfig,
    ProgressReport,
    ResultReport,
    ShardRequest,
)
from worker.result_bounds import ResultRejected, check_result

__all__ = [
    "SANDBOX_JOB",
    "Role",
    "SandboxFailure",
    "SandboxJob",
    "SandboxLimits",
    "SandboxOutput",
    "SandboxStopped",
    "ShardOutput",
    "bwrap_command",
    "child_environment",
    "remove_abandoned_job_dirs",
    "run_sandboxed",
    "run_sandboxed_shards",
    "sandbox_identity",
    "sandbox_prefix",
]

log = logging.getLogger(__name__)

# The result of a 50,000-image ImageNet run is a few MB of JSON; anything far above is abuse.
MAX_LINE_BYTES = 256 * 2**20
MAX_EXAMPLE_BYTES = 4 * 2**20
STDERR_TAIL_BYTES = 4000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JOB_DIR_PREFIX = "spatialbench-job-"
# How long the model process may take to exit once the evaluator said it died.
_MODEL_EXIT_WAIT_S = 10.0


@dataclass(frozen=True)
class SandboxJob:
    """What to evaluate; becomes the two processes' configurations (with paths inside their
    sandboxes)."""

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
    # `evaluator.evaluate.EvalOptions(**options)` in the evaluator process; unknown keys fail
    # the job ("internal"). JSON values: ``metrics`` a list of names; ``shard`` [start, stop]
    # for `run_sandboxed` only (a session's shards come from its caller).
    options: dict[str, Any] | None = None


@dataclass(frozen=True)
class SandboxLimits:
    deadline_s: float
    memory_bytes: int | None = 16 * 2**30
    threads: int | None = None
    # When the worker runs as root, the sandboxes run as this user; None or "" means
    # ``nobody`` (uid 65534): never as root. A worker that is not root keeps its own user,
    # which is already unprivileged.
    user: str | None = "nobody"
    # Kept for callers; the sandbox user is always required now (no fallback).
    require_user: bool = True
    # Kept for callers; the sandboxes always have a network namespace of their own now.
    isolate_network: bool = True
    open_files: int = 4096
    file_bytes: int = 2**30
    tmp_dir: Path | None = None
    # Size of each sandbox's private /tmp (memory-backed).
    tmpfs_bytes: int = 256 * 2**20


@dataclass
class SandboxOutput:
    result: dict[str, Any]
    examples: list[dict[str, Any]]
    # The example PNGs, checked, in a folder the caller owns and must remove.
    examples_dir: Path | None
    hello: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class ShardOutput(SandboxOutput):
    """One shard's output in a session of `run_sandboxed_shards`: the checked result of the
    positions ``shard`` of the evaluation order, and that shard's examples."""

    shard: range


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


# --- Examples ----------------------------------------------------------------------------------


def _collect_examples(
    examples: Any, source: Path, owner_uid: int
) -> tuple[list[dict[str, Any]], Path | None]:
    """Copy the example PNGs the evaluator wrote into a folder only we can write, keeping only
    plain, single-link, size-capped PNG files owned by the sandbox user (a symlink or hard
    link could point at a file the sandbox may not read)."""
    if not isinstance(examples, list) or not examples:
        return [], None
    target: Path | None = None
    kept: list[dict[str, Any]] = []
    for raw in examples[:64]:
        try:
            example = raw if isinstance(raw, Example) else Example.model_validate(raw)
        except ValidationError:
            continue
        names = [example.original, example.transformed]
        contents = [_read_png(source / name, owner_uid) for name in names]
        if any(data is None for data in contents):
            continue
        if target is None:
            target = Path(tempfile.mkdtemp(prefix="spatialbench-examples-"))
        for name, data in zip(names, contents, strict=True):
            assert data is not None
            (target / name).write_bytes(data)
        kept.append(example.model_dump(exclude_none=True))
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


# --- Running -----------------------------------------------------------------------------------


class _Process:
    """One sandboxed process: its Popen, its stdin and its captured output."""

    def __init__(self, role: Role, cmd: list[str], pass_fds: tuple[int, ...], env: dict[str, str]):
        self.role = role
        self.output = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=self.output,
                stderr=self.output,
                pass_fds=pass_fds,
                env=env,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            self.output.close()
            raise SandboxFailure(
                "internal",
                "The worker cannot start its sandbox; the operator has to fix this.",
                detail=f"{cmd[0]}: {exc}",
            ) from exc

    def send(self, data: bytes) -> None:
        """Write ``data`` as the process's whole input."""
        self.write_line(data)
        self.close_stdin()

    def write_line(self, line: bytes) -> None:
        """One line of input; a process that exited reads nothing, and says why elsewhere."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    def tail(self, limit: int = STDERR_TAIL_BYTES) -> str:
        self.output.flush()
        size = self.output.seek(0, os.SEEK_END)
        self.output.seek(max(0, size - limit))
        return self.output.read().decode("utf-8", "replace")

    def close(self) -> None:
        self.kill()
        self.output.close()


def _job_files(
    job: SandboxJob, identity: Identity, limits: SandboxLimits
) -> tuple[Path, Path, Path]:
    """The job's private folder (only this process may enter it), the model's copy there
    (read-only to the sandbox) and the evaluator's output folder (writable by the sandbox)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{JOB_DIR_PREFIX}{os.getpid()}-", dir=limits.tmp_dir))
    os.chmod(tmp, 0o700)
    model = tmp / ("model.pt2" if job.model_format == "export" else "model.safetensors")
    shutil.copyfile(job.model_path, model)
    os.chmod(model, 0o444)
    out = tmp / "out"
    out.mkdir(mode=0o700)
    if identity.drop:
        os.chown(out, identity.uid, identity.gid)
    return tmp, model, out


def run_sandboxed_shards(
    job: SandboxJob,
    limits: SandboxLimits,
    next_shard: Callable[[ShardOutput | None], range | None],
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    tick: Callable[[], bool] | None = None,
    tick_interval_s: float = 1.0,
) -> None:
    """Evaluate shards of ``job`` in one session of the two sandboxed processes (see the
    module doc), so that opening the model, loading the data and warming up are paid once.

    ``next_shard(None)`` gives the first shard (a range of positions of the evaluation
    order), ``next_shard(output)`` the one after the shard ``output`` holds; None ends the
    session. Each shard is a new evaluation with the deadline ``limits.deadline_s`` of its
    own. The driver removes ``output.examples_dir`` once ``next_shard`` returns, so the
    callback copies the PNGs it keeps, or takes the folder by setting the field to None.
    ``job.options`` must not hold a ``shard``.

    ``on_progress`` gets each progress message of the current shard (dicts with phase,
    fraction within the shard, forward_passes, elapsed_s, eta_s). ``tick`` is called about
    every ``tick_interval_s`` seconds while a shard runs; when it returns True both processes
    are killed and `SandboxStopped` raised. Raises `SandboxFailure` with a user-facing
    message when a shard fails, for whatever reason; whatever ``next_shard`` raises is raised
    again once both processes are killed.
    """
    if job.options and "shard" in job.options:
        raise ValueError("a session's shards come from next_shard, not from job.options")
    identity = _identity(limits.user)
    tmp, model_copy, output_dir = _job_files(job, identity, limits)
    processes: list[_Process] = []
    report_fd: int | None = None
    try:
        report_fd = _start(job, limits, identity, model_copy, output_dir, processes)
        model, evaluator = processes
        evaluator.write_line(_evaluator_job(job, limits, output_dir).model_dump_json().encode())
        driver = _Driver(job, limits, model, evaluator, SANDBOX_JOB / model_copy.name, on_progress)
        shard = next_shard(None)
        while shard is not None:
            request = _request(shard)
            evaluator.write_line(request.model_dump_json().encode())
            report = driver.run(report_fd, request, tick, tick_interval_s)
            examples, examples_dir = _collect_examples(report.examples, output_dir, identity.uid)
            output = ShardOutput(
                result=_checked(report.result, job.benchmark),
                examples=examples,
                examples_dir=examples_dir,
                hello=driver.hello.model_dump() if driver.hello else {},
                shard=shard,
            )
            try:
                shard = next_shard(output)
            finally:
                if output.examples_dir is not None:
                    shutil.rmtree(output.examples_dir, ignore_errors=True)
    finally:
        for process in processes:
            process.close()
        if report_fd is not None:
            os.close(report_fd)
        shutil.rmtree(tmp, ignore_errors=True)


def run_sandboxed(
    job: SandboxJob,
    limits: SandboxLimits,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    tick: Callable[[], bool] | None = None,
    tick_interval_s: float = 1.0,
) -> SandboxOutput:
    """Evaluate ``job`` in a session of one shard: ``job.options["shard"]`` (``[start,
    stop]``) when it has one, the whole evaluation order otherwise. ``on_progress``,
    ``tick`` and the failures are those of `run_sandboxed_shards`; the caller owns the
    returned ``examples_dir`` and must remove it."""
    options = dict(job.options or {})
    bounds = options.pop("shard", None)
    try:
        # The whole order: `evaluate` cuts a range to the order's length.
        whole = range(0, MAX_POSITION) if bounds is None else range(*_bounds(bounds))
        _request(whole)
    except (TypeError, ValueError) as exc:
        raise SandboxFailure(
            "internal", f"The evaluation failed: invalid evaluation options: shard {bounds!r}"
        ) from exc
    outputs: list[SandboxOutput] = []

    def one(output: ShardOutput | None) -> range | None:
        if output is None:
            return whole
        outputs.append(
            SandboxOutput(output.result, output.examples, output.examples_dir, output.hello)
        )
        output.examples_dir = None  # the caller's now
        return None

    run_sandboxed_shards(
        dataclasses.replace(job, options=options or None),
        limits,
        one,
        on_progress=on_progress,
        tick=tick,
        tick_interval_s=tick_interval_s,
    )
    (output,) = outputs
    return output


def _bounds(value: Any) -> tuple[int, int]:
    start, stop = value
    return int(start), int(stop)


def _request(shard: range) -> ShardRequest:
    if shard.step != 1:
        raise ValueError(f"a shard is a range of consecutive positions, not {shard!r}")
    try:
        return ShardRequest(start=shard.start, stop=shard.stop)
    except ValidationError as exc:
        raise ValueError(f"not a shard of an evaluation order: {shard!r}") from exc


def _identity(user: str | None) -> Identity:
    try:
        return sandbox_identity(user)
    except SandboxSetupError as exc:
        raise SandboxFailure("internal", exc.message, detail=exc.detail) from None


def _start(
    job: SandboxJob,
    limits: SandboxLimits,
    identity: Identity,
    model_copy: Path,
    output_dir: Path,
    processes: list[_Process],
) -> int:
    """Start the model and the evaluator process (appended to ``processes``, so the caller
    closes whichever started); returns our end of the evaluator's report pipe, the only pipe
    end this process keeps."""
    request_r, request_w = os.pipe()  # evaluator -> model
    answer_r, answer_w = os.pipe()  # model -> evaluator
    report_r, report_w = os.pipe()  # evaluator -> this process
    theirs = [request_r, request_w, answer_r, answer_w, report_w]
    try:
        # The NVIDIA device files (and /sys, which CUDA reads) only where a GPU may be used.
        gpu = job.device != "cpu" and Path("/dev/nvidiactl").exists()
        env = child_environment(limits.threads)
        model_binds = [("--ro-bind", model_copy, SANDBOX_JOB / model_copy.name)]
        evaluator_binds: list[tuple[str, Path, Path]] = [
            ("--bind", output_dir, SANDBOX_JOB / "out")
        ]
        if job.data_dir is not None:
            evaluator_binds.append(("--ro-bind-try", job.data_dir, job.data_dir))
        if job.benchmarks_file is not None:
            evaluator_binds.append(("--ro-bind", job.benchmarks_file, job.benchmarks_file))
        for role, argv, binds in (
            (Role.MODEL, (request_r, answer_w), model_binds),
            (Role.EVALUATOR, (answer_r, request_w, report_w), evaluator_binds),
        ):
            try:
                command = bwrap_command(
                    role,
                    [str(fd) for fd in argv],
                    identity,
                    binds=binds,
                    tmpfs_bytes=limits.tmpfs_bytes,
                    gpu=gpu,
                )
            except SandboxSetupError as exc:
                raise SandboxFailure("internal", exc.message, detail=exc.detail) from None
            processes.append(_Process(role, command, argv, env))
    except BaseException:
        os.close(report_r)
        raise
    finally:
        # Each process holds its own ends now.
        for fd in theirs:
            os.close(fd)
    return report_r


def _evaluator_job(job: SandboxJob, limits: SandboxLimits, output_dir: Path) -> EvaluatorJob:
    return EvaluatorJob(
        benchmark=job.benchmark,
        benchmarks_file=str(job.benchmarks_file) if job.benchmarks_file else None,
        data_dir=str(job.data_dir) if job.data_dir else None,
        device=job.device,
        batch_size=job.batch_size,
        bf16=job.bf16,
        limit=job.limit,
        options=job.options,
        examples=job.examples,
        output_dir=str(SANDBOX_JOB / output_dir.name),
        threads=limits.threads,
        memory_bytes=limits.memory_bytes,
        open_files=limits.open_files,
        file_bytes=limits.file_bytes,
    )


def _checked(result: dict[str, Any], benchmark: str) -> dict[str, Any]:
    try:
        return check_result(result, benchmark)
    except ResultRejected as exc:
        raise SandboxFailure(
            "internal",
            "The evaluation returned a result outside the benchmark's bounds; it was not recorded.",
            detail=str(exc),
        ) from exc


class _Driver:
    """Reads the evaluator's reports until a shard's result or an error; enforces the
    deadline and stops; hands the model process its configuration once the evaluator said
    hello."""

    # The clock of the deadlines and ticks (a test moves it to pass a deadline).
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(
        self,
        job: SandboxJob,
        limits: SandboxLimits,
        model: _Process,
        evaluator: _Process,
        sandbox_model: Path,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.job = job
        self.limits = limits
        self.model = model
        self.evaluator = evaluator
        self.sandbox_model = sandbox_model
        self.on_progress = on_progress
        self.hello: Hello | None = None
        # What the evaluator wrote after the last complete line (kept from shard to shard).
        self.buffer = bytearray()

    def kill(self) -> None:
        self.evaluator.kill()
        self.model.kill()

    def run(
        self,
        report_fd: int,
        request: ShardRequest,
        tick: Callable[[], bool] | None,
        tick_interval_s: float,
    ) -> ResultReport:
        """The result of the shard ``request`` asked for, which the evaluator was just sent."""
        deadline = self.clock() + self.limits.deadline_s
        next_tick = self.clock() + tick_interval_s
        os.set_blocking(report_fd, False)
        while True:
            now = self.clock()
            if now >= deadline:
                self.kill()
                raise deadline_failure(self.limits.deadline_s)
            if tick is not None and now >= next_tick:
                next_tick = now + tick_interval_s
                if tick():
                    self.kill()
                    raise SandboxStopped()
            wait = max(0.0, min(deadline, next_tick) - now)
            ready, _, _ = select.select([report_fd], [], [], min(wait, 0.5))
            eof = False
            if ready:
                try:
                    chunk = os.read(report_fd, 1 << 20)
                except BlockingIOError:
                    chunk = b""
                else:
                    eof = chunk == b""
                self.buffer += chunk
            while b"\n" in self.buffer:
                line, _, rest = bytes(self.buffer).partition(b"\n")
                self.buffer = bytearray(rest)
                final = self._handle(line)
                if final is not None:
                    return self._answering(final, request)
            if len(self.buffer) > MAX_LINE_BYTES:
                self.kill()
                raise SandboxFailure(
                    "internal",
                    "The evaluation process sent an oversized report.",
                    detail=f"a line over {MAX_LINE_BYTES} bytes",
                )
            if eof or (not ready and self.evaluator.proc.poll() is not None):
                self.evaluator.proc.wait()
                raise self._evaluator_died()

    def _answering(self, report: ResultReport, request: ShardRequest) -> ResultReport:
        if report.shard != request:
            self.kill()
            raise SandboxFailure(
                "internal",
                "The evaluation process answered for another shard than it was asked.",
                detail=f"asked for {request}, answered {report.shard}",
            )
        return report

    def _handle(self, line: bytes) -> ResultReport | None:
        try:
            report = REPORT.validate_json(line)
        except ValidationError as exc:
            self.kill()
            raise SandboxFailure(
                "internal",
                "The evaluation process sent a malformed report.",
                detail=f"{exc}"[:500] + repr(line[:200]),
            ) from None
        if isinstance(report, Hello):
            if self.hello is not None:
                self.kill()
                raise SandboxFailure(
                    "internal", "The evaluation process said hello twice.", detail=repr(report)
                )
            self.hello = report
            log.info("sandbox on %s, network isolated: %s", report.device, report.network_isolated)
            self.model.send(self._model_config(report).model_dump_json().encode())
        elif isinstance(report, ProgressReport):
            if self.on_progress is not None:
                self.on_progress(report.model_dump())
        elif isinstance(report, ErrorReport):
            raise self._error(report)
        elif isinstance(report, ResultReport):
            return report
        return None

    def _model_config(self, hello: Hello) -> ModelProcessConfig:
        return ModelProcessConfig(
            model_path=str(self.sandbox_model),
            model_format="export" if self.job.model_format == "export" else "safetensors",
            architecture=self.job.architecture,
            num_classes=hello.num_classes,
            mean=self.job.mean,
            std=self.job.std,
            device=hello.device,
            bf16=self.job.bf16,
            threads=self.limits.threads,
            memory_bytes=self.limits.memory_bytes,
            open_files=self.limits.open_files,
            file_bytes=self.limits.file_bytes,
        )

    def _error(self, report: ErrorReport) -> SandboxFailure:
        if report.category is ErrorCategory.MODEL_DIED:
            try:
                self.model.proc.wait(_MODEL_EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                self.model.kill()
            return died(self.model.proc.returncode, self.limits.memory_bytes, self.model.tail())
        return reported_failure(
            report, self.limits.memory_bytes, self.job.batch_size, self.model.tail()
        )

    def _evaluator_died(self) -> SandboxFailure:
        return died(self.evaluator.proc.returncode, self.limits.memory_bytes, self.evaluator.tail())
