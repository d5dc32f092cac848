"""``spatialbench serve``: the embedded default, driven the way the README drives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from config.settings import Settings
from tests.worker.helpers import QUICK_BENCHMARK, ROOT, free_port, settings_env, wait_for

pytestmark = [pytest.mark.timeout(600), pytest.mark.parametrize("backend", ["sqlite"])]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout
    return [int(p) for p, g in (line.split() for line in out.splitlines()) if int(g) == pid]


def test_serve_runs_the_api_and_a_worker_until_interrupted(
    settings: Settings, trained_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    state = tmp_path / "var"
    env = {
        **os.environ,
        **settings_env(settings.model_copy(update={"eval_limit": 40})),
        "PYTHONUNBUFFERED": "1",
    }
    # The defaults of the embedded mode: everything under the state folder.
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE_DIR", "STATE_DIR"):
        env.pop(f"SPATIALBENCH_{name}", None)
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from spatialbench.cli import main; main()", "serve",
             f"--port={port}", f"--state-dir={state}"],
            cwd=tmp_path, env=env, stdout=out, stderr=err,
        )  # fmt: skip
    try:
        wait_for(
            lambda: "Press Ctrl-C" in out_path.read_text() or proc.poll() is not None,
            120,
            what="serve to start",
        )
        text = out_path.read_text()
        assert proc.poll() is None, err_path.read_text()
        token = next(line for line in text.splitlines() if "export TOKEN=" in line).split("=")[1]
        base = f"http://127.0.0.1:{port}"
        assert f"{base}/api/v1/submissions" in text and "curl" in text
        headers = {"Authorization": f"Bearer {token}"}

        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            with trained_model.open("rb") as f:
                response = client.post(
                    "/api/v1/submissions",
                    files={"file": ("model.safetensors", f)},
                    data={
                        "display_name": "trained small CNN",
                        "benchmark": QUICK_BENCHMARK,
                        "architecture": "small_cnn",
                    },
                )
            assert response.status_code == 202, response.text
            status_url = response.json()["status_url"]

            def finished() -> dict[str, object] | None:
                body = client.get(status_url).json()
                assert body["status"] not in ("failed", "cancelled"), body
                return body if body["status"] == "finished" else None

            body = wait_for(finished, 240, 0.5, what="the submission to finish")
        assert body["evaluation"]["images"] == 40
        assert (state / "local-token").stat().st_mode & 0o077 == 0
        workers = _descendants(_worker_pgid(proc.pid))
        assert workers
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err_path.read_text()[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def _worker_pgid(serve_pid: int) -> int:
    """The worker subprocess of serve leads its own process group."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(serve_pid)], capture_output=True, text=True
    ).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 1, pids
    return pids[0]


def test_serve_is_a_command(backend: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from spatialbench.cli import main; main()", "serve", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "--no-worker" in out and "--state-dir" in out
