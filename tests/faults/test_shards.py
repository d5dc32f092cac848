"""One evaluation sharded across three worker processes on real Redis and PostgreSQL, one of
them killed with SIGKILL mid-run: the merged result equals a single worker's, bit for bit
(issue 11)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.services.users import create_user
from config.settings import Settings
from db.models import Evaluation, Shard, ShardStatus, Submission, SubmissionStatus
from db.session import transaction
from storage import storage_from_settings
from storage.keys import example_name
from tests.faults.conftest import Api, Workers, row, wait_for_row
from tests.worker.conftest import clean_redis, redis_url  # noqa: F401  (fixtures)
from tests.worker.helpers import WorkerProcess, wait_for
from worker.recording import Outcome
from worker.runner import run_submission

# Redis and PostgreSQL, as production runs them.
pytestmark = pytest.mark.parametrize("backend", ["postgresql"])

IMAGES = 60
SHARD_IMAGES = 6  # ten shards


@pytest.fixture
def fault_settings(fault_settings: Settings, clean_redis: str) -> Settings:  # noqa: F811
    """The fault tests' short timings, on Redis, with the evaluation cut into ten shards (the
    API fixture publishes with these settings too)."""
    update = {"broker_url": clean_redis, "eval_limit": IMAGES, "shard_images": SHARD_IMAGES}
    return fault_settings.model_copy(update=update)


@pytest.fixture
def shard_settings(fault_settings: Settings) -> Settings:
    return fault_settings


def shards(sessions: sessionmaker[Session], submission_id: str) -> list[Shard]:
    with sessions() as session:
        return list(
            session.scalars(
                select(Shard).where(Shard.submission_id == submission_id).order_by(Shard.index)
            ).all()
        )


def evaluation(sessions: sessionmaker[Session], submission_id: str) -> Evaluation:
    with sessions() as session:
        found = session.scalars(
            select(Evaluation).where(Evaluation.submission_id == submission_id)
        ).one()
        session.expunge(found)
        return found


def comparable(found: Evaluation, settings: Settings) -> dict[str, Any]:
    """Everything an evaluation recorded but the wall time and who took part; example images
    by their bytes."""
    storage = storage_from_settings(settings)
    config = {k: v for k, v in found.config.items() if k != "sharding"}
    cost = {k: v for k, v in found.cost.items() if k != "wall_time_s"}
    examples = [
        {
            **{k: v for k, v in e.items() if k not in ("original", "transformed")},
            "names": [example_name(found.submission_id, e[k]) for k in ("original", "transformed")],
            "png": [storage.read_bytes(e[k]) for k in ("original", "transformed")],
        }
        for e in found.examples or []
    ]
    columns = ("natural", "random", "worst_of_k", "grid", "vote_natural", "grid_vote",
               "first_order", "images", "metrics", "landscape", "per_image", "forward_passes",
               "seed", "precision")  # fmt: skip
    return {
        **{c: getattr(found, c) for c in columns},
        "config": config,
        "cost": cost,
        "examples": examples,
    }


def pool_owner(workers: list[WorkerProcess], shard_worker: str) -> WorkerProcess:
    pid = int(shard_worker.rsplit(":", 1)[1])
    for worker in workers:
        if pid in worker.pool_pids():
            return worker
    raise AssertionError(f"no started worker runs {shard_worker}")


def test_three_workers_and_a_kill_give_the_single_worker_result(
    shard_settings: Settings,
    sessions: sessionmaker[Session],  # noqa: F811
    trained_model: Path,  # noqa: F811
    api: Api,
    workers: Workers,
) -> None:
    started = [workers.start(shard_settings) for _ in range(3)]
    submission_id = api.upload(trained_model)["id"]

    # Wait until two workers run shards at once, then kill one of them mid-shard.
    def victim() -> Shard | None:
        running = [s for s in shards(sessions, submission_id) if s.status is ShardStatus.RUNNING]
        busy = {s.worker for s in running}
        return next((s for s in running if s.progress > 0), None) if len(busy) >= 2 else None

    doomed = wait_for(victim, 240, 0.1, what="two workers to run shards of the submission")
    assert doomed.worker is not None
    killed = pool_owner(started, doomed.worker)
    killed.kill()

    finished = wait_for_row(
        sessions, submission_id, lambda r: r.status.is_final, timeout=400, what="the merge"
    )
    assert finished.status is SubmissionStatus.FINISHED, finished.message
    after = {s.index: s for s in shards(sessions, submission_id)}
    assert len(after) == IMAGES // SHARD_IMAGES
    assert all(s.status is ShardStatus.DONE for s in after.values())
    # The killed shard ran again, alone: every other shard ran once.
    assert after[doomed.index].attempts == 2
    assert after[doomed.index].worker != doomed.worker
    assert [i for i, s in after.items() if s.attempts != 1] == [doomed.index]
    sharded = evaluation(sessions, submission_id)
    took_part = sharded.config["sharding"]
    assert took_part["shards"] == len(after) and took_part["workers"] >= 2
    assert sum(s.forward_passes for s in after.values()) == sharded.forward_passes
    # The shards' objects go once the result is recorded (right after the commit).
    storage = storage_from_settings(shard_settings)
    wait_for(lambda: storage.list(f"shards/{submission_id}") == [], 30, 0.2,
             what="the shards' objects to go")  # fmt: skip

    # The same model, evaluated by one worker in this process (another owner's submission).
    for worker in started:
        worker.stop()
    with transaction(sessions) as session:
        other = create_user(session, "single")
        single = Submission(
            owner_id=other.id,
            display_name="the same model",
            benchmark=finished.benchmark,
            model_format=finished.model_format,
            architecture=finished.architecture,
            training_method=finished.training_method,
            file_sha256=finished.file_sha256,
            file_size=finished.file_size,
        )
        session.add(single)
        session.flush()
        single_id = single.id
    outcome = run_submission(sessions, single_id, shard_settings)
    assert outcome is Outcome.FINISHED
    alone = evaluation(sessions, single_id)
    assert alone.config["sharding"]["workers"] == 1
    assert comparable(sharded, shard_settings) == comparable(alone, shard_settings)
    assert row(sessions, single_id).forward_passes == sharded.forward_passes
    assert json.dumps(alone.per_image) == json.dumps(sharded.per_image)


def test_cancel_stops_every_shard(
    shard_settings: Settings,
    sessions: sessionmaker[Session],  # noqa: F811
    trained_model: Path,  # noqa: F811
    api: Api,
    workers: Workers,
) -> None:
    for _ in range(2):
        workers.start(shard_settings)
    submission_id = api.upload(trained_model)["id"]
    wait_for(
        lambda: sum(s.status is ShardStatus.RUNNING for s in shards(sessions, submission_id)) >= 2,
        240, 0.1, what="two shards to run",
    )  # fmt: skip
    api.cancel(submission_id)
    cancelled = wait_for_row(
        sessions, submission_id, lambda r: r.status.is_final, timeout=60, what="the cancel"
    )
    assert cancelled.status is SubmissionStatus.CANCELLED
    # Both sessions stop: no shard keeps running, and none starts afterwards.
    wait_for(
        lambda: not any(s.status is ShardStatus.RUNNING for s in shards(sessions, submission_id))
        or None,
        30, 0.2, what="the shards to stop",
    )  # fmt: skip
    with sessions() as session:
        recorded = select(Evaluation).where(Evaluation.submission_id == submission_id)
        assert session.scalars(recorded).first() is None
