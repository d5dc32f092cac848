"""``spatialbench serve``: the API and a worker together, the embedded default.

With the default settings everything lives under ``./var``: a SQLite database, a broker that
needs no server (kombu's SQLAlchemy transport on another SQLite file) and the uploaded models.
`EmbeddedService` runs the migrations, starts the API (uvicorn, in a thread of this process)
and a worker (``spatialbench worker``, a subprocess), and stops both on Ctrl-C; ``demo``
reuses it. With ``--no-worker --no-local-user`` it is the API alone, as the API container
runs it in production (it still applies the migrations first).

One embedded service per state folder: it holds an ``flock`` on ``STATE_DIR/serve.lock`` for
its life (the worker inherits it), so a second ``serve`` on the same folder refuses to start,
and a killed one frees it with its last process. Everything serve starts dies with it, even on
``kill -9``: the worker watches a pipe whose other end only serve holds.

The module is about 400 lines on purpose: locking the state folder, migrating, starting the
API and the worker, and stopping them all depend on each other's order, which reads best in
one place; ``demo`` is the only other user of these steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from api.urls import API_PREFIX
from config.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True)

LOCAL_USER = "local"
# Where serve keeps the local user's token between runs (tokens are stored hashed, so this is
# the only copy; the file is readable by its owner only).
TOKEN_FILE = "local-token"
WORKER_STOP_TIMEOUT_S = 10.0
LOCK_FILE = "serve.lock"
# A restart right after a crash may find the old worker still dying: wait this long for it.
LOCK_WAIT_S = 5.0
# The evaluation yields the CPU to the API: a page or a status poll must not wait behind it.
WORKER_NICENESS = 10


def _err(message: str) -> None:
    typer.echo(message, err=True)


class StateDirInUse(RuntimeError):
    """Another embedded service holds the state folder."""


def lock_state_dir(state_dir: Path, wait_s: float = LOCK_WAIT_S) -> int:
    """Hold ``STATE_DIR/serve.lock`` (an ``flock``, released when the last process holding the
    returned descriptor ends, however it ends) and write our pid into it; `StateDirInUse` if
    another service holds it for longer than ``wait_s``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StateDirInUse(
                    f"the state directory {state_dir.resolve()} is in use by another "
                    f"`spatialbench serve` (pid {holder}); stop that one first, or give this "
                    "one its own --state-dir"
                ) from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def prepare_state(settings: Settings) -> None:
    """Folders, permissions and the schema. The state folder is closed to other users: the
    sandboxed evaluation runs as another user and must not read the database or other models."""
    from db.migrate import upgrade

    settings.ensure_dirs()
    assert settings.storage_dir is not None
    for folder in (settings.state_dir, settings.storage_dir):
        with contextlib.suppress(OSError):  # not ours to change (a mounted volume, say)
            os.chmod(folder, 0o700)
    assert settings.database_url is not None
    upgrade(settings.database_url)


def local_token(settings: Settings, name: str = LOCAL_USER) -> str:
    """A working API token of the local user ``name``, creating the user if missing; reuses
    the token saved by an earlier run while it is valid."""
    from sqlalchemy import select

    from api.errors import ApiError
    from api.services.users import authenticate, create_token, create_user
    from db.models import User
    from db.session import session_scope

    path = settings.state_dir / TOKEN_FILE
    saved = path.read_text().strip() if path.exists() else ""
    with session_scope(settings) as session:
        if saved:
            try:
                if authenticate(session, saved).name == name:
                    return saved
            except ApiError:
                pass
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            user = create_user(session, name, is_admin=True)
        token = create_token(session, user, name="serve")[1]
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)
    path.write_text(token + "\n")
    return token


def usage(base: str, token: str, benchmark: str = "digits") -> str:
    """The curl session to print: submit a model, follow it, read the leaderboard."""
    api = base + API_PREFIX
    return f"""\
SpatialBench is running at {base}  (API docs: {base}/docs)

Your API token (user '{LOCAL_USER}'):
  export TOKEN={token}

Submit a model (safetensors weights of a registry architecture, or a torch.export .pt2):
  curl -sS -H "Authorization: Bearer $TOKEN" \\
       -F file=@model.safetensors -F display_name="My CNN" \\
       -F benchmark={benchmark} -F architecture=small_cnn \\
       {api}/submissions

Follow it (status, phase, progress, ETA; the metrics once finished):
  curl -sS {api}/submissions/ID -H "Authorization: Bearer $TOKEN"

The leaderboard:
  curl -sS {api}/leaderboard/{benchmark}

Press Ctrl-C to stop.
"""


class EmbeddedService:
    """The API in a thread and, optionally, a worker subprocess; `stop` ends both."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        worker: bool = True,
        log_level: str = "info",
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.with_worker = worker
        self.log_level = log_level
        self.server: object | None = None
        self.thread: threading.Thread | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.lock_fd: int | None = None
        # Serve's end of the worker's lifeline; closed (by the kernel, if need be) when serve ends.
        self.lifeline: int | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        import uvicorn

        from api.app import create_app

        # The embedded database and a worker are what two services must not share; an API
        # alone on a server database (production's API containers) may run many times over.
        if self.with_worker or self.settings.is_sqlite:
            self.lock_fd = lock_state_dir(self.settings.state_dir)
        prepare_state(self.settings)
        config = uvicorn.Config(
            create_app(self.settings),
            host=self.host,
            port=self.port,
            log_level=self.log_level,
        )
        server = uvicorn.Server(config)
        self.server = server
        self.thread = threading.Thread(target=server.run, name="spatialbench-api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"the API did not start on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API did not start within {timeout:.0f} s")
            time.sleep(0.05)
        if self.with_worker:
            self.worker, self.lifeline = start_worker(
                lock_fd=self.lock_fd, threads=worker_threads(self.settings)
            )

    def wait(self) -> None:
        """Block until Ctrl-C, or until the API or the worker stops by itself."""
        try:
            while True:
                if self.thread is not None and not self.thread.is_alive():
                    _err("the API stopped")
                    return
                if self.worker is not None and self.worker.poll() is not None:
                    _err(f"the worker exited with status {self.worker.returncode}")
                    return
                time.sleep(0.5)
        except KeyboardInterrupt:
            _err("stopping")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True  # type: ignore[attr-defined]
        if self.worker is not None:
            stop_worker(self.worker)
            self.worker = None
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    @contextlib.contextmanager
    def running(self) -> Iterator[EmbeddedService]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream
        return None


def worker_threads(settings: Settings) -> int:
    """CPU threads of the embedded evaluation: the operator's setting, else all cores but one,
    which stays with the API."""
    if settings.sandbox_threads is not None:
        return settings.sandbox_threads
    return max(1, (os.cpu_count() or 1) - 1)


def start_worker(
    concurrency: int = 1, *, lock_fd: int | None = None, threads: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """``spatialbench worker`` as a subprocess in its own process group, with this process's
    environment (so the same settings); its output goes to our stderr, leaving stdout to the
    instructions. Returns the process and our end of its lifeline: the worker's whole process
    group dies when that descriptor closes (`worker_main`). ``lock_fd`` (the state folder's
    lock) is shared with it, so the folder stays locked while any of it lives."""
    read_end, write_end = os.pipe()  # both ends close on exec: only what pass_fds names is passed
    env = dict(os.environ)
    if threads is not None:
        env["SPATIALBENCH_SANDBOX_THREADS"] = str(threads)
    passed = [read_end] if lock_fd is None else [read_end, lock_fd]
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from spatialbench.serve import worker_main; worker_main()",
                str(read_end),
                "worker",
                f"--concurrency={concurrency}",
            ],
            stdout=_stderr_fd(),
            start_new_session=True,
            pass_fds=passed,
            env=env,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return proc, write_end


def _kill_group_when_closed(fd: int) -> None:
    """Block until every writer of the pipe ``fd`` is gone (serve ended, even by SIGKILL), then
    SIGKILL this process group: the Celery worker and its pool (the sandboxed evaluation dies
    with its pool process by its own death signal)."""
    while os.read(fd, 1):
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


def worker_main() -> None:
    """The worker subprocess of serve: ``python -c '...worker_main()' LIFELINE_FD worker ...``.

    The watchdog thread lives in the Celery main process only (a fork copies just the forking
    thread), which is enough: killing the process group takes the pool with it."""
    fd = int(sys.argv.pop(1))
    threading.Thread(
        target=_kill_group_when_closed, args=(fd,), name="serve-lifeline", daemon=True
    ).start()
    os.nice(WORKER_NICENESS)
    from worker.cli import app as worker_app

    worker_app()


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = WORKER_STOP_TIMEOUT_S) -> None:
    """Ask the worker to stop (a running evaluation is abandoned: the reaper queues it again at
    the next start), then kill its process group if it does not."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        # Celery's cold shutdown: do not wait for the running evaluation.
        os.killpg(proc.pid, signal.SIGQUIT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def apply_state_dir(state_dir: Path | None) -> Settings:
    """The settings, with ``state_dir`` exported to the environment first so the worker
    subprocess sees the same."""
    if state_dir is not None:
        os.environ["SPATIALBENCH_STATE_DIR"] = str(state_dir)
        get_settings.cache_clear()
    return get_settings()


def start_embedded(
    settings: Settings, *, host: str, port: int, worker: bool, log_level: str = "info"
) -> EmbeddedService:
    """Start an `EmbeddedService` for a command that runs until Ctrl-C or SIGTERM; a failure
    to start ends the command with its message."""
    # `docker stop` and service managers send SIGTERM: stop as cleanly as on Ctrl-C (whose
    # handler is set explicitly, as a shell starting us in the background ignores SIGINT).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    service = EmbeddedService(settings, host=host, port=port, worker=worker, log_level=log_level)
    try:
        service.start()
    except RuntimeError as exc:  # StateDirInUse among them
        _err(f"error: {exc}")
        raise typer.Exit(1) from None
    return service


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    worker: Annotated[
        bool, typer.Option("--worker/--no-worker", help="Start a worker in the background.")
    ] = True,
    local_user: Annotated[
        bool,
        typer.Option("--local-user/--no-local-user", help="Create a local user; print its token."),
    ] = True,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the embedded database and models live.")
    ] = None,
) -> None:
    """Run the API and a worker: SQLite and a serverless broker by default, one command."""
    settings = apply_state_dir(state_dir)
    service = start_embedded(settings, host=host, port=port, worker=worker)
    try:
        if local_user:
            typer.echo(usage(service.url, local_token(settings)))
        else:
            _err(f"SpatialBench API at {service.url}")
        service.wait()
    finally:
        service.stop()
