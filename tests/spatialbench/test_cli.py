"""The ``spatialbench`` command merges every package's commands."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from api.cli import app as api_app
from evaluator.cli import app as evaluator_app
from evaluator.train_cli import app as train_app
from spatialbench.cli import app
from spatialbench.client import app as client_app
from spatialbench.demo import app as demo_app
from spatialbench.serve import app as serve_app
from worker.cli import app as worker_app

PARTS = {
    "evaluator.cli": evaluator_app,
    "evaluator.train_cli": train_app,
    "api.cli": api_app,
    "worker.cli": worker_app,
    "spatialbench.serve": serve_app,
    "spatialbench.demo": demo_app,
    "spatialbench.client": client_app,
}


def _names(sub: typer.Typer) -> list[str]:
    commands = [c.name or c.callback.__name__ for c in sub.registered_commands if c.callback]
    return commands + [g.name for g in sub.registered_groups if g.name]


@pytest.mark.parametrize("module", PARTS)
def test_every_part_is_merged_at_the_top_level(module: str) -> None:
    merged, part = _names(app), _names(PARTS[module])
    assert part and all(name in merged for name in part)


def test_help_lists_commands_of_every_package() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("evaluate", "train", "users", "worker", "serve", "demo", "submit", "data"):
        assert command in result.output
