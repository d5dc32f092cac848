"""``spatialbench demo``: the embedded service with the ``digits`` leaderboard populated.

Starts what ``serve`` starts (SQLite, a server-less broker, the API and a worker), submits the
baselines shipped in ``baselines/`` through the REST API as the ``baselines`` user, marks them
as baselines, follows them to the end, prints the leaderboard, and keeps serving. Submitting
again is harmless: the same file for the same benchmark returns the existing submission.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from api.services.benchmarks import get_benchmark
from api.urls import submission_path
from config.settings import Settings
from evaluator.benchmarks import BenchmarkSpec
from evaluator.vocabulary import MetricKey, metric_texts
from spatialbench.client import Connection, check, submit_model
from spatialbench.serve import _err, apply_state_dir, local_token, start_embedded, usage

app = typer.Typer(no_args_is_help=True)

BASELINES_DIR = Path(__file__).resolve().parent.parent / "baselines"
BASELINES_USER = "baselines"
BENCHMARK = "digits"
FORM_FIELDS = (
    "display_name", "benchmark", "architecture", "training_method", "extra_data", "paper_url",
    "description",
)  # fmt: skip


def baseline_files(folder: Path = BASELINES_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """The shipped baselines: each weights file with the metadata `spatialbench train` wrote."""
    found = []
    for weights in sorted(folder.glob("*.safetensors")):
        meta_path = weights.with_suffix(".json")
        if meta_path.exists():
            found.append((weights, json.loads(meta_path.read_text())))
    return found


def baselines_token(settings: Settings) -> str:
    """A fresh token of the ``baselines`` user (created if missing; exempt from caps)."""
    from sqlalchemy import select

    from api.services.users import create_token, create_user
    from db.models import User
    from db.session import session_scope

    with session_scope(settings) as session:
        user = session.scalar(select(User).where(User.name == BASELINES_USER))
        if user is None:
            user = create_user(session, BASELINES_USER, is_admin=True)
        return create_token(session, user, name="demo")[1]


def mark_baselines(settings: Settings, ids: list[str]) -> None:
    from api.services.submissions import mark_baseline
    from db.session import session_scope

    with session_scope(settings) as session:
        for submission_id in ids:
            mark_baseline(session, submission_id)


def submit_baselines(conn: Connection, files: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    ids = []
    for weights, meta in files:
        form = {
            key: str(meta[key]).lower() if isinstance(meta[key], bool) else str(meta[key])
            for key in FORM_FIELDS
            if meta.get(key) is not None
        }
        answer = submit_model(conn, weights, form, show_progress=False)
        state = "already there" if answer.get("duplicate") else answer.get("status", "queued")
        _err(f"  {meta['display_name']}: {answer['id']} ({state})")
        ids.append(answer["id"])
    return ids


def follow(conn: Connection, ids: list[str], poll_s: float = 2.0) -> list[dict[str, Any]]:
    """Poll the submissions until all have ended, printing a line whenever one changes."""
    last: dict[str, str] = {}
    with conn.client() as client:
        while True:
            states = [check(client.get(submission_path(i))) for i in ids]
            for state in states:
                progress = float(state.get("progress") or 0)
                line = f"{state['status']} {state.get('phase') or ''} {progress:.0%}"
                if last.get(state["id"]) != line:
                    last[state["id"]] = line
                    _err(f"  {state['display_name']}: {line}")
            if all(s["status"] in ("finished", "failed", "cancelled") for s in states):
                return states
            time.sleep(poll_s)


def evaluating_line(spec: BenchmarkSpec) -> str:
    """What the demo says while the baselines are evaluated, with the benchmark's own k and
    grid size (an operator may redefine the demo benchmark)."""
    worst = metric_texts(spec.counts)[MetricKey.WORST_OF_K].short
    return f"evaluating (natural, random, {worst}, the {spec.grid.size:,}-point grid, the vote)..."


@app.command("demo")
def demo(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the embedded database and models live.")
    ] = None,
    exit_when_done: Annotated[
        bool, typer.Option(help="Stop once the baselines are evaluated (for scripts and tests).")
    ] = False,
) -> None:
    """Run the embedded service with the digits baselines evaluated and on the leaderboard."""
    from spatialbench.client import leaderboard as print_leaderboard

    started = time.monotonic()
    settings = apply_state_dir(state_dir)
    files = baseline_files()
    if not files:
        _err(f"error: no baselines in {BASELINES_DIR}; run scripts/train_baselines.sh")
        raise typer.Exit(1)
    service = start_embedded(settings, host=host, port=port, worker=True, log_level="warning")
    try:
        _err(f"SpatialBench demo at {service.url}; submitting {len(files)} digits baselines")
        conn = Connection(service.url, baselines_token(settings))
        ids = submit_baselines(conn, files)
        mark_baselines(settings, ids)
        _err(evaluating_line(get_benchmark(BENCHMARK, settings)))
        states = follow(conn, ids)
        _err(f"the demo leaderboard is ready after {time.monotonic() - started:.0f} s")
        print_leaderboard(BENCHMARK, sort="grid", csv=False, url=service.url, token=None)
        for state in states:
            if state["status"] != "finished":
                _err(f"  {state['display_name']}: {state['status']}: {state.get('message')}")
        typer.echo(f"Leaderboard page: {service.url}/leaderboard/{BENCHMARK}\n")
        typer.echo(usage(service.url, local_token(settings)))
        if not exit_when_done:
            service.wait()
    finally:
        service.stop()
