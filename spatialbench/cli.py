"""The ``spatialbench`` command: every sub-command of the project in one place.

Each package contributes a Typer app whose commands are merged here at the top level, so
``evaluator`` stays free of service imports.
"""

from __future__ import annotations

import typer

from api.cli import app as api_app
from evaluator.cli import app as evaluator_app
from evaluator.train_cli import app as train_app
from spatialbench.client import app as client_app
from spatialbench.demo import app as demo_app
from spatialbench.serve import app as serve_app
from worker.cli import app as worker_app

app = typer.Typer(
    name="spatialbench",
    help="SpatialBench: spatial robustness of image classifiers (Engstrom et al., ICML 2019).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for sub in (evaluator_app, train_app, api_app, worker_app, serve_app, demo_app, client_app):
    app.registered_commands.extend(sub.registered_commands)
    app.registered_groups.extend(sub.registered_groups)


def main() -> None:
    app()
