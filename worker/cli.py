"""``spatialbench worker`` and ``spatialbench reap``."""

from __future__ import annotations

from enum import StrEnum

import typer

app = typer.Typer(no_args_is_help=True)


class Pool(StrEnum):
    PREFORK = "prefork"
    SOLO = "solo"


@app.command("worker")
def run_worker(
    concurrency: int = typer.Option(
        1, help="Evaluations at once. One worker per GPU, each with concurrency 1."
    ),
    pool: Pool = typer.Option(
        Pool.PREFORK,
        help="prefork runs tasks in a child process, which enforces the time limits and "
        "hands the job back if it dies; solo runs them in this process.",
    ),
    loglevel: str = typer.Option("info", help="Celery's log level."),
    hostname: str | None = typer.Option(
        None, help="The worker's node name (default: celery@host)."
    ),
) -> None:
    """Start a worker that evaluates queued submissions (queue 'gpu')."""
    from worker.app import app as celery
    from worker.queue import QUEUE

    argv = [
        "worker",
        f"--queues={QUEUE}",
        f"--concurrency={concurrency}",
        f"--pool={pool.value}",
        f"--loglevel={loglevel}",
        # Gossip, mingle and events talk to other workers over broadcast exchanges, which the
        # embedded broker lacks; jobs are coordinated through the database instead.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery.worker_main(argv)


@app.command("reap")
def run_reaper() -> None:
    """Re-queue (or fail, after too many attempts) jobs whose worker stopped responding, and
    publish again queued jobs whose message may be lost."""
    from config.settings import get_settings
    from db.session import Database
    from worker.queue import Producer
    from worker.reaper import reap_once

    settings = get_settings()
    database = Database(settings)
    producer = Producer(settings)
    try:
        ids = reap_once(database.sessions, settings, producer)
    finally:
        producer.close()
        database.dispose()
    for submission_id in ids:
        typer.echo(f"published {submission_id}")
    typer.echo(f"{len(ids)} job(s) published")
