"""The ``spatialbench`` client commands against a real server: ``serve`` with its worker
(the worker tests' trained small CNN and quick benchmark)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spatialbench.client import app
from tests.serve_helpers import ServeProcess
from tests.worker.helpers import QUICK_BENCHMARK, free_port

pytestmark = pytest.mark.timeout(600)
runner = CliRunner()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A serve in its embedded default (SQLite), its url and the local user's token."""
    service = ServeProcess(
        tmp_path / "var", tmp_path, cwd=tmp_path, eval_limit="30", batch_size="256",
        sandbox_deadline_s="120", heartbeat_timeout_s="30", example_images="4",
    )  # fmt: skip
    try:
        yield service.url, service.wait_ready()
    finally:
        service.stop()


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
