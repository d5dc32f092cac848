"""The ``spatialbench`` command: every sub-command of the project in one place.

Each package contributes a Typer app; they are imported here, so ``evaluator`` stays free of
service imports.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="spatialbench",
    help="SpatialBench: spatial robustness of image classifiers (Engstrom et al., ICML 2019).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# (module, attribute, name or None to merge its commands at top level)
_SUBAPPS: list[tuple[str, str, str | None]] = [
    ("evaluator.cli", "app", None),
    ("evaluator.train_cli", "app", None),
    ("api.cli", "app", None),
    ("worker.cli", "app", None),
    ("spatialbench.serve", "app", None),
    ("spatialbench.demo", "app", None),
    ("spatialbench.client", "app", None),
]


def _register() -> None:
    for module_name, attribute, name in _SUBAPPS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that part of the project is not written yet
                continue
            raise
        sub = getattr(module, attribute)
        if name is None:
            for command in sub.registered_commands:
                app.registered_commands.append(command)
            for group in sub.registered_groups:
                app.registered_groups.append(group)
        else:
            app.add_typer(sub, name=name)


_register()


def main() -> None:
    app()
