"""A real ``spatialbench serve`` in a subprocess, and the process tree it starts: the one way
the tests (faults, security, the worker's own) start the embedded service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.worker.helpers import QUICK_BENCHMARK_TOML, ROOT, free_port, wait_for

SERVE_START_TIMEOUT_S = 120


def serve_env(state_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of an embedded serve under ``state_dir``: no SPATIALBENCH_ setting
    inherited from the test process (so the embedded defaults), fast intervals, one thread, the
    coarse test benchmark, and the sandbox as the test's own user."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPATIALBENCH_")}
    benchmarks = state_dir.parent / f"{state_dir.name}-benchmarks.toml"
    benchmarks.write_text(QUICK_BENCHMARK_TOML)
    env.update(
        PYTHONUNBUFFERED="1",
        SPATIALBENCH_ENV="test",
        SPATIALBENCH_BENCHMARKS_FILE=str(benchmarks),
        SPATIALBENCH_SANDBOX_USER="",
        SPATIALBENCH_SANDBOX_THREADS="1",
        SPATIALBENCH_PROGRESS_INTERVAL_S="0.5",
        SPATIALBENCH_REAPER_INTERVAL_S="1",
    )
    env.update({f"SPATIALBENCH_{k.upper()}": v for k, v in overrides.items()})
    return env


class ServeProcess:
    """``spatialbench serve --state-dir=STATE`` on a free port, its output in files."""

    def __init__(
        self,
        state_dir: Path,
        log_dir: Path,
        name: str = "serve",
        options: tuple[str, ...] = (),
        *,
        cwd: Path = ROOT,
        **settings: str,
    ) -> None:
        """``settings`` override `serve_env`'s, by setting name (``eval_limit="20"``); ``cwd``
        is where it runs (a ``.env`` file there would be read)."""
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out_path = log_dir / f"{name}.out"
        self.err_path = log_dir / f"{name}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from spatialbench.cli import main; main()", "serve",
                 f"--port={self.port}", f"--state-dir={state_dir}", *options],
                cwd=cwd, env=serve_env(state_dir, **settings), stdout=out, stderr=err,
            )  # fmt: skip

    def wait_ready(self, timeout: float = SERVE_START_TIMEOUT_S) -> str:
        """Wait for the instructions; returns the local user's token."""
        wait_for(
            lambda: "Press Ctrl-C" in self.out_path.read_text() or self.proc.poll() is not None,
            timeout,
            what="serve to start",
        )
        assert self.proc.poll() is None, self.err_path.read_text()
        text = self.out_path.read_text()
        return (
            next(line for line in text.splitlines() if "export TOKEN=" in line)
            .split("=")[1]
            .strip()
        )

    def wait_listening(self) -> None:
        """Wait until the API answers (for a serve started with ``--no-local-user``)."""

        def answers() -> bool:
            assert self.proc.poll() is None, self.err_path.read_text()
            try:
                httpx.get(f"{self.url}/api/v1/benchmarks", timeout=5)
            except httpx.TransportError:
                return False
            return True

        wait_for(answers, SERVE_START_TIMEOUT_S, what="the API to answer")

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def process_tree(root: int) -> list[int]:
    """``root``'s descendants (children, grandchildren, ...), not ``root`` itself."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = (int(x) for x in line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (a zombie has ended: it only waits to be reaped)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def kill_all(pids: list[int]) -> None:
    """SIGKILL what is left of ``pids`` (a test's clean-up after a failure)."""
    for pid in alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Services:
    """The serve processes of one test and every process they were seen to start; `close`
    stops the services and kills whatever of those processes is left (after a failure, say)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ServeProcess] = []
        self.seen: list[int] = []

    def start(self, state_dir: Path, name: str, **kwargs: Any) -> ServeProcess:
        service = ServeProcess(state_dir, self.log_dir, name, **kwargs)
        self.started.append(service)
        return service

    def tree(self, service: ServeProcess) -> list[int]:
        """The processes ``service`` runs now, remembered for the clean-up."""
        pids = process_tree(service.proc.pid)
        self.seen += pids
        return pids

    def close(self) -> None:
        for service in self.started:
            self.tree(service)
            service.stop()
        kill_all(self.seen)
