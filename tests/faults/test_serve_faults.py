"""``spatialbench serve`` under faults: ``kill -9`` takes everything it started along, and two
services never share a state folder (finding 4 of issue 10)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.serve_helpers import Services, alive
from tests.worker.helpers import small_cnn_file, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    fleet = Services(tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


def _niceness(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except FileNotFoundError:  # ended meanwhile
        return 10


def _running(client: object, status_url: str) -> bool:
    body = client.get(status_url).json()  # type: ignore[attr-defined]
    assert body["status"] not in ("finished", "failed", "cancelled"), body
    return body["status"] == "running" and body.get("phase") is not None


def test_kill_9_of_serve_ends_its_worker_and_the_running_evaluation(
    tmp_path: Path, services: Services
) -> None:
    state = tmp_path / "var"
    first = services.start(state, "first")
    token = first.wait_ready()
    model = small_cnn_file(tmp_path / "model.safetensors")
    with first.client(token) as client, model.open("rb") as f:
        response = client.post(
            "/api/v1/submissions",
            files={"file": ("model.safetensors", f)},
            data={"display_name": "cnn", "benchmark": "digits", "architecture": "small_cnn"},
        )
        assert response.status_code == 202, response.text
        status_url = response.json()["status_url"]
        wait_for(lambda: _running(client, status_url), 120, what="the evaluation to run")
    # The worker, its pool process and the sandboxed evaluation (with its sandbox wrapper).
    tree = services.tree(first)
    assert len(tree) >= 3, tree
    # All of it yields the CPU to the API in serve's own process.
    assert all(_niceness(pid) >= 10 for pid in alive(tree)), {p: _niceness(p) for p in tree}

    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    wait_for(lambda: not alive(tree), 15, what=f"the processes of serve to end: {alive(tree)}")

    # The lock of the killed service went with its processes: a restart takes the folder.
    second = services.start(state, "second")
    token = second.wait_ready()
    with second.client(token) as client:
        assert client.get(urlsplit(status_url).path).status_code == 200


def test_a_second_serve_on_the_same_state_dir_refuses_to_start(
    tmp_path: Path, services: Services
) -> None:
    state = tmp_path / "var"
    first = services.start(state, "first")
    first.wait_ready()

    second = services.start(state, "second")
    assert second.proc.wait(60) == 1
    message = second.err_path.read_text()
    assert "in use by another `spatialbench serve`" in message, message
    assert f"(pid {first.proc.pid})" in message and str(state.resolve()) in message
    assert "--state-dir" in message
    # The first one is untouched, and a service on another folder starts alongside it.
    assert first.proc.poll() is None
    other = services.start(tmp_path / "other", "other")
    other.wait_ready()


def test_a_stopped_serve_frees_its_state_dir(tmp_path: Path, services: Services) -> None:
    state = tmp_path / "var"
    first = services.start(state, "first")
    first.wait_ready()
    first.stop()
    assert first.proc.returncode == 0, first.err_path.read_text()[-2000:]
    again = services.start(state, "again")
    again.wait_ready()
