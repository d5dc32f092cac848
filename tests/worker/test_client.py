"""The ``spatialbench`` client commands against a real server: ``serve`` with its worker.

They live beside the worker's end-to-end tests because they share the served-service fixtures
(a trained small CNN, the quick benchmark, settings on SQLite).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from config.settings import Settings
from spatialbench.client import app
from tests.worker.helpers import QUICK_BENCHMARK, free_port, settings_env, wait_for

pytestmark = pytest.mark.timeout(600)
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"])
runner = CliRunner()


@pytest.fixture
def served(settings: Settings, tmp_path: Path):
    port = free_port()
    env = {**os.environ, **settings_env(settings.model_copy(update={"eval_limit": 30}))}
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE_DIR", "STATE_DIR"):
        env.pop(f"SPATIALBENCH_{name}", None)
    out_path = tmp_path / "serve.out"
    with out_path.open("wb") as out, (tmp_path / "serve.err").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from spatialbench.cli import main; main()", "serve",
             f"--port={port}", f"--state-dir={tmp_path / 'var'}"],
            cwd=tmp_path, env=env, stdout=out, stderr=err,
        )  # fmt: skip
    try:
        wait_for(lambda: "Press Ctrl-C" in out_path.read_text() or proc.poll() is not None, 120)
        assert proc.poll() is None, (tmp_path / "serve.err").read_text()[-2000:]
        token = re.search(r"export TOKEN=(\S+)", out_path.read_text()).group(1)  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}", token
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@on_sqlite
def test_submit_wait_status_and_leaderboard(served, trained_model: Path, monkeypatch) -> None:
    url, token = served
    monkeypatch.setenv("SPATIALBENCH_URL", url)
    monkeypatch.setenv("SPATIALBENCH_TOKEN", token)
    result = runner.invoke(
        app,
        ["submit", str(trained_model), "--benchmark", QUICK_BENCHMARK, "--arch", "small_cnn",
         "--name", "client CNN", "--method", "standard", "--wait"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    submission_id = re.search(r"submitted (\w+)", result.output).group(1)  # type: ignore[union-attr]
    assert "grid" in result.output and "finished" in result.output
    # The quick benchmark's own k, as the evaluation recorded it.
    assert "worst-of-3" in result.output and "worst-of-10" not in result.output

    again = runner.invoke(
        app, ["submit", str(trained_model), "--benchmark", QUICK_BENCHMARK, "--arch", "small_cnn"]
    )
    assert again.exit_code == 0 and f"already submitted as {submission_id}" in again.output

    status = runner.invoke(app, ["status", submission_id, "--json"])
    assert status.exit_code == 0 and '"status": "finished"' in status.output

    board = runner.invoke(app, ["leaderboard", QUICK_BENCHMARK, "--csv"])
    assert board.exit_code == 0 and "client CNN" in board.output
    table = runner.invoke(app, ["leaderboard", QUICK_BENCHMARK])
    assert table.exit_code == 0 and "client" in table.output
    assert "worst-of-3" in table.output and "worst-of-10" not in table.output
    assert re.search(r"\d+\.\d\d%", table.output)  # the accuracies, not placeholders


@on_sqlite
def test_server_errors_are_shown_as_their_message(served, tmp_path: Path) -> None:
    url, token = served
    pickle_file = tmp_path / "model.pt"
    pickle_file.write_bytes(b"\x80\x04K\x01.")
    result = runner.invoke(
        app,
        ["submit", str(pickle_file), "--benchmark", QUICK_BENCHMARK, "--arch", "small_cnn",
         "--url", url, "--token", token],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "422" in result.output and "safetensors" in result.output
    assert "Traceback" not in result.output

    missing = runner.invoke(app, ["status", "nope", "--url", url, "--token", token])
    assert missing.exit_code == 1 and "404" in missing.output

    no_token = runner.invoke(app, ["cancel", "nope", "--url", url, "--token", "sb_wrong"])
    assert no_token.exit_code == 1 and "401" in no_token.output


def test_unreachable_server_is_one_line(monkeypatch) -> None:
    result = runner.invoke(app, ["status", "x", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1 and "cannot reach the server" in result.output
