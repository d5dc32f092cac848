"""``spatialbench serve``: the embedded default, driven the way the README drives it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve_helpers import ServeProcess
from tests.worker.helpers import QUICK_BENCHMARK, ROOT, wait_for

pytestmark = pytest.mark.timeout(600)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout
    return [int(p) for p, g in (line.split() for line in out.splitlines()) if int(g) == pid]


def test_serve_runs_the_api_and_a_worker_until_interrupted(
    trained_model: Path, tmp_path: Path
) -> None:
    service = ServeProcess(
        tmp_path / "var", tmp_path, cwd=tmp_path, eval_limit="40", batch_size="256",
        sandbox_deadline_s="120", example_images="4",
    )  # fmt: skip
    try:
        token = service.wait_ready()
        assert f"{service.url}/api/v1/submissions" in service.out_path.read_text()
        assert "curl" in service.out_path.read_text()
        with service.client(token) as client:
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
        assert (service.state_dir / "local-token").stat().st_mode & 0o077 == 0
        workers = _descendants(_worker_pgid(service.proc.pid))
        assert workers
    finally:
        service.stop()
    # Not killed: an interrupt ends serve and everything it started.
    assert service.proc.returncode == 0, service.err_path.read_text()[-3000:]
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


def test_serve_is_a_command() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from spatialbench.cli import main; main()", "serve", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "--no-worker" in out and "--state-dir" in out
