"""Running an untrusted model: two processes under bubblewrap, limits and a deadline.

`run_sandboxed` makes three pipes and starts two processes, handing each only its ends:

- the **model process** (`worker.model_process`) opens the uploaded model and answers logits
  (and input gradients) for the batches it is sent; it sees the model file, read-only, and
  nothing of the data, the labels or the report channel;
- the **evaluator process** (`worker.evaluator_process`) runs the trusted evaluator (data,
  transforms, attacks, metrics, example images) against the model process and reports
  progress and the result to this process. It never opens the model file.

Only the evaluator's reports are read here, and its result is bounded against the benchmark
(`worker.result_bounds`) before it is returned. Both processes run under bubblewrap (`bwrap`):
new PID, network, IPC, UTS and mount namespaces and a user namespace; a root of their own
with the interpreter, its site-packages and the project's ``evaluator`` and ``worker``
packages read-only at their own paths; a private size-capped tmpfs for ``/tmp`` (their
``HOME``); no view of the state directory, database, broker, storage, other jobs or
secrets; ``--die-with-parent``, and the PID namespace takes any process they leave behind
with it. When the worker runs as root they run as the unprivileged sandbox user (``nobody``):
bubblewrap mounts as root, then ``setpriv`` drops to that user (no capabilities, no new
privileges) before ``unshare --user`` and the interpreter start. There is no fallback to
the worker's user: if the sandbox cannot start, the job fails (`SandboxFailure` "internal").

Limits and the deadline: each process caps its own open files, file sizes and (on the CPU)
address space before it reads anything; this process kills both when the wall-clock deadline
passes or ``tick`` says stop. This module imports neither torch nor the evaluator.
"""

from __future__ import annotations

import logging
import os
import pwd
import select
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.messages import (
    REPORT,
    ErrorCategory,
    ErrorReport,
    EvaluatorJob,
    Example,
    Hello,
    ModelProcessConfig,
    ProgressReport,
    ResultReport,
)
from worker.result_bounds import ResultRejected, check_result

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The result of a 50,000-image ImageNet run is a few MB of JSON; anything far above is abuse.
MAX_LINE_BYTES = 256 * 2**20
MAX_EXAMPLE_BYTES = 4 * 2**20
STDERR_TAIL_BYTES = 4000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JOB_DIR_PREFIX = "spatialbench-job-"
# Variables passed through from the worker's environment: device selection and library paths
# of the CUDA images. Nothing else crosses.
PASSTHROUGH_ENV = ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "NVIDIA_VISIBLE_DEVICES", "TZ")
# Where the sandboxes see their job's files.
SANDBOX_JOB = Path("/job")
SANDBOX_TMP = Path("/tmp")
# Host files the dynamic linker and the C library read; the rest of /etc stays out of view.
_SYSTEM_RO = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
_ETC_RO = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0",
                "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3", "/dev/nvidia4", "/dev/nvidia5",
                "/dev/nvidia6", "/dev/nvidia7")  # fmt: skip
# How long the model process may take to exit once the evaluator said it died.
_MODEL_EXIT_WAIT_S = 10.0
# What the sandbox's own tools print when they cannot set it up.
_SETUP_ERRORS = ("bwrap:", "setpriv:", "unshare:")
UNPRIVILEGED_UID = 65534


class Role(StrEnum):
    MODEL = "model"
    EVALUATOR = "evaluator"


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
    # the job ("internal"). JSON values: ``metrics`` a list of names, ``shard`` [start, stop].
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


def child_environment(threads: int | None) -> dict[str, str]:
    """The sandboxed processes' whole environment."""
    n = str(threads or os.cpu_count() or 1)
    env = {
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "HOME": str(SANDBOX_TMP),
        "TMPDIR": str(SANDBOX_TMP),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
    }
    for name in PASSTHROUGH_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


# --- The bubblewrap profile -------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who the sandboxed processes run as. ``drop``: the worker is root, so the sandbox
    switches to ``uid``/``gid`` itself."""

    uid: int
    gid: int
    drop: bool


def sandbox_identity(user: str | None) -> Identity:
    if os.geteuid() != 0:
        return Identity(os.getuid(), os.getgid(), drop=False)
    name = user or "nobody"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxFailure(
            "internal",
            "The worker is misconfigured: its sandbox user does not exist.",
            detail=f"no user {name!r}; set SPATIALBENCH_SANDBOX_USER",
        ) from None
    if entry.pw_uid == 0:
        raise SandboxFailure(
            "internal",
            "The worker is misconfigured: its sandbox user is root.",
            detail=f"user {name!r} has uid 0; set SPATIALBENCH_SANDBOX_USER to an unprivileged one",
        )
    return Identity(entry.pw_uid, entry.pw_gid, drop=True)


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", os.defpath) + ":/usr/bin:/bin")
    if path is None:
        raise SandboxFailure(
            "internal",
            "The worker cannot start its sandbox; the operator has to fix this.",
            detail=f"{name} is not installed (install the Debian package bubblewrap: "
            "scripts/bwrap.sh)",
        )
    return path


def interpreter_paths() -> list[Path]:
    """What the sandboxed interpreter needs, read-only at its own path: the interpreter's
    prefix, the virtualenv and its site-packages, and the project's two packages the
    sandboxes import (not the project root, where the embedded mode keeps its state)."""
    paths = {Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).parent}
    paths.update(Path(p) for p in site.getsitepackages())
    paths.update(PROJECT_ROOT / name for name in ("evaluator", "worker"))
    resolved = {p.resolve() for p in paths if p.exists()} | {p for p in paths if p.exists()}
    return sorted(resolved, key=lambda p: (len(p.parts), str(p)))


def bwrap_command(
    role: Role,
    argv: list[str],
    identity: Identity,
    *,
    binds: list[tuple[str, Path, Path]],
    tmpfs_bytes: int,
    gpu: bool = False,
) -> list[str]:
    """The command that runs the role's module (``worker.<role>_process``) with ``argv``
    sandboxed. ``binds`` are (bwrap option, host path, sandbox path) for the role's files."""
    prefix = sandbox_prefix(role, identity, binds=binds, tmpfs_bytes=tmpfs_bytes, gpu=gpu)
    return [*prefix, sys.executable, "-s", "-B", "-m", f"worker.{role.value}_process", *argv]


def sandbox_prefix(
    role: Role,
    identity: Identity,
    *,
    binds: list[tuple[str, Path, Path]],
    tmpfs_bytes: int,
    gpu: bool = False,
) -> list[str]:
    """The sandbox profile: the command line that runs what follows it sandboxed."""
    cmd = [_tool("bwrap"), "--die-with-parent", "--new-session"]
    if identity.drop:
        # Root mounts without a user namespace (so it can read an interpreter under a home
        # closed to others), then the process drops to the sandbox user below.
        cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
                "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]  # fmt: skip
    else:
        cmd += ["--unshare-all", "--unshare-user"]
    cmd += ["--hostname", f"sandbox-{role.value}", "--proc", "/proc", "--dev", "/dev"]
    # Writable by the sandbox user only through its sticky /tmp.
    cmd += ["--perms", "1777", "--size", str(tmpfs_bytes), "--tmpfs", str(SANDBOX_TMP)]
    for system in (*_SYSTEM_RO, *_ETC_RO):
        cmd += ["--ro-bind-try", system, system]
    paths = interpreter_paths()
    targets = [*paths, *(target for _option, _source, target in binds)]
    # The folders above the mounts are made by bubblewrap; they must be traversable by the
    # sandbox user (a home closed to others on the host is an empty, open folder here).
    for folder in _ancestors(targets):
        cmd += ["--perms", "0755", "--dir", str(folder)]
    for path in paths:
        cmd += ["--ro-bind", str(path), str(path)]
    if gpu:
        for device in _GPU_DEVICES:
            cmd += ["--dev-bind-try", device, device]
        cmd += ["--ro-bind-try", "/sys", "/sys"]
    for option, source, target in binds:
        cmd += [option, str(source), str(target)]
    cmd += ["--chdir", str(SANDBOX_TMP), "--"]
    if identity.drop:
        cmd += [_tool("setpriv"), f"--reuid={identity.uid}", f"--regid={identity.gid}",
                "--clear-groups", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all",
                "--"]  # fmt: skip
        cmd += [_tool("unshare"), "--user", "--"]
    return cmd


def _ancestors(paths: list[Path]) -> list[Path]:
    found = {parent for path in paths for parent in path.parents if parent != Path("/")}
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


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
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
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


def run_sandboxed(
    job: SandboxJob,
    limits: SandboxLimits,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    tick: Callable[[], bool] | None = None,
    tick_interval_s: float = 1.0,
) -> SandboxOutput:
    """Evaluate ``job`` in the two sandboxed processes; see the module doc.

    ``on_progress`` gets each progress message (dicts with phase, fraction, forward_passes,
    elapsed_s, eta_s). ``tick`` is called about every ``tick_interval_s`` seconds; when it
    returns True both processes are killed and `SandboxStopped` raised. Raises
    `SandboxFailure` with a user-facing message when the evaluation fails, for whatever reason.
    """
    identity = sandbox_identity(limits.user)
    tmp, model_copy, output_dir = _job_files(job, identity, limits)
    fds: list[int] = []
    processes: list[_Process] = []
    try:
        request_r, request_w = os.pipe()  # evaluator -> model
        answer_r, answer_w = os.pipe()  # model -> evaluator
        report_r, report_w = os.pipe()  # evaluator -> this process
        fds += [request_r, request_w, answer_r, answer_w, report_r, report_w]
        # The NVIDIA device files (and /sys, which CUDA reads) only where a GPU may be used.
        gpu = job.device != "cpu" and Path("/dev/nvidiactl").exists()
        env = child_environment(limits.threads)
        sandbox_model = SANDBOX_JOB / model_copy.name
        model = _Process(
            Role.MODEL,
            bwrap_command(
                Role.MODEL,
                [str(request_r), str(answer_w)],
                identity,
                binds=[("--ro-bind", model_copy, sandbox_model)],
                tmpfs_bytes=limits.tmpfs_bytes,
                gpu=gpu,
            ),
            (request_r, answer_w),
            env,
        )
        processes.append(model)
        evaluator_binds: list[tuple[str, Path, Path]] = [
            ("--bind", output_dir, SANDBOX_JOB / "out")
        ]
        if job.data_dir is not None:
            evaluator_binds.append(("--ro-bind-try", job.data_dir, job.data_dir))
        if job.benchmarks_file is not None:
            evaluator_binds.append(("--ro-bind", job.benchmarks_file, job.benchmarks_file))
        evaluator = _Process(
            Role.EVALUATOR,
            bwrap_command(
                Role.EVALUATOR,
                [str(answer_r), str(request_w), str(report_w)],
                identity,
                binds=evaluator_binds,
                tmpfs_bytes=limits.tmpfs_bytes,
                gpu=gpu,
            ),
            (answer_r, request_w, report_w),
            env,
        )
        processes.append(evaluator)
        # Each process holds its own ends now; ours of the report pipe is the only one left.
        for fd in (request_r, request_w, answer_r, answer_w, report_w):
            os.close(fd)
            fds.remove(fd)
        evaluator.send(_evaluator_job(job, limits, output_dir).model_dump_json().encode())
        driver = _Driver(job, limits, model, evaluator, sandbox_model, on_progress)
        report = driver.run(report_r, tick, tick_interval_s)
        try:
            result = check_result(report.result, job.benchmark)
        except ResultRejected as exc:
            raise SandboxFailure(
                "internal",
                "The evaluation returned a result outside the benchmark's bounds; it was not "
                "recorded.",
                detail=str(exc),
            ) from exc
        examples, examples_dir = _collect_examples(report.examples, output_dir, identity.uid)
        return SandboxOutput(
            result=result,
            examples=examples,
            examples_dir=examples_dir,
            hello=driver.hello.model_dump() if driver.hello else {},
        )
    finally:
        for process in processes:
            process.close()
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


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


class _Driver:
    """Reads the evaluator's reports until its result or error; enforces the deadline and
    stops; hands the model process its configuration once the evaluator said hello."""

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

    def kill(self) -> None:
        self.evaluator.kill()
        self.model.kill()

    def run(
        self, report_fd: int, tick: Callable[[], bool] | None, tick_interval_s: float
    ) -> ResultReport:
        deadline = time.monotonic() + self.limits.deadline_s
        next_tick = time.monotonic() + tick_interval_s
        buffer = bytearray()
        os.set_blocking(report_fd, False)
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.kill()
                raise SandboxFailure(
                    "deadline",
                    f"The evaluation did not finish within its time limit of "
                    f"{_duration(self.limits.deadline_s)} and was stopped. Make the model "
                    "faster (smaller, or fewer operations per image), or ask the operator for "
                    "a longer limit.",
                )
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
                buffer += chunk
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer = bytearray(rest)
                final = self._handle(line)
                if final is not None:
                    return final
            if len(buffer) > MAX_LINE_BYTES:
                self.kill()
                raise SandboxFailure(
                    "internal",
                    "The evaluation process sent an oversized report.",
                    detail=f"a line over {MAX_LINE_BYTES} bytes",
                )
            if eof or (not ready and self.evaluator.proc.poll() is not None):
                self.evaluator.proc.wait()
                raise self._evaluator_died()

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
            return _died(self.model.proc.returncode, self.limits, self.model.tail())
        return _child_error(report, self.limits, self.job, self.model.tail())

    def _evaluator_died(self) -> SandboxFailure:
        return _died(self.evaluator.proc.returncode, self.limits, self.evaluator.tail())


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
    report: ErrorReport, limits: SandboxLimits, job: SandboxJob, stderr: str
) -> SandboxFailure:
    text = report.message[:2000]
    if report.category is ErrorCategory.OUT_OF_MEMORY:
        return SandboxFailure("out_of_memory", _memory_message(limits, job), detail=text)
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


def _died(returncode: int | None, limits: SandboxLimits, stderr: str) -> SandboxFailure:
    """A sandboxed process exited without a report."""
    if any(line.startswith(_SETUP_ERRORS) for line in stderr.splitlines()):
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
    code = returncode if returncode is not None else -1
    how = f"signal {-code}" if code < 0 else f"exit status {code}"
    return SandboxFailure(
        "crashed",
        f"The evaluation process crashed ({how}) without reporting an error. If the model is "
        "a torch.export archive, check that the exported program runs with torch 2.14 on a CPU "
        "before saving it: ep.module()(torch.rand(2, C, H, W)).",
        detail=stderr,
    )
