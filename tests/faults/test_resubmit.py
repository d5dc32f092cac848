"""Findings 1 and 5: cancel and resubmit while a run is under way.

1. A worker frozen near the end of a run (``kill -STOP``), the job cancelled and resubmitted
   with other settings, then the worker resumed: its result must be refused, and the stored
   result is the new run's, computed with the new settings.
5. A resubmit right after a cancel must run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.models import Evaluation, SubmissionStatus
from tests.faults.conftest import Api, Workers, start_run, wait_for_row, with_cont
from tests.worker.helpers import quick_accuracies, wait_for

pytestmark = [
    pytest.mark.timeout(600),
]

RUNNING, FINISHED = SubmissionStatus.RUNNING, SubmissionStatus.FINISHED
HALF = [0.5, 0.5, 0.5]


def test_a_frozen_workers_result_is_refused_after_a_cancel_and_a_resubmit(
    fault_settings: Settings,
    sessions: sessionmaker[Session],
    api: Api,
    workers: Workers,
    trained_model: Path,
) -> None:
    settings = fault_settings.model_copy(update={"eval_limit": 120})
    run = start_run(api, workers, sessions, settings, trained_model, progress=0.5)
    first, sid, old_token = run.worker, run.submission_id, run.token
    os.killpg(first.proc.pid, signal.SIGSTOP)

    assert api.cancel(sid)["cancel_requested"] is True
    again = api.upload(trained_model, mean="0.5,0.5,0.5", std="0.5,0.5,0.5")
    assert (again["id"], again["status"], again["mean"]) == (sid, "queued", HALF)

    workers.start(settings)
    wait_for_row(
        sessions, sid, lambda r: r.status is RUNNING and r.claim_token not in (None, old_token),
        what="the second worker to claim the resubmitted job",
    )  # fmt: skip
    with_cont(first)
    done = wait_for_row(sessions, sid, lambda r: r.status.is_final, what="the job to end")
    assert done.status is FINISHED, done.message
    # The resumed worker was refused: it learnt that it had lost the job.
    wait_for(lambda: b": lost" in first.log_path.read_bytes(), 120, what="the old run to stop")

    with sessions() as session:
        evaluation = session.scalars(
            select(Evaluation).where(Evaluation.submission_id == sid)
        ).one()
    assert evaluation.job is not None
    assert evaluation.job["claim_token"] == done.claim_token != old_token
    assert (evaluation.job["mean"], evaluation.job["std"]) == (HALF, HALF)
    limit = settings.eval_limit
    half = quick_accuracies(settings, trained_model, limit, mean=HALF, std=HALF)["natural"]
    assert evaluation.natural == half
    assert quick_accuracies(settings, trained_model, limit)["natural"] != evaluation.natural


def test_a_resubmit_right_after_a_cancel_runs(
    fault_settings: Settings,
    sessions: sessionmaker[Session],
    api: Api,
    workers: Workers,
    trained_model: Path,
) -> None:
    workers.start(fault_settings)
    sid = api.upload(trained_model)["id"]
    wait_for_row(sessions, sid, lambda r: r.status is RUNNING, what="the run to start")
    api.cancel(sid)
    again = api.upload(trained_model)
    assert (again["id"], again["status"], again["cancel_requested"]) == (sid, "queued", False)
    done = wait_for_row(sessions, sid, lambda r: r.status.is_final, what="the resubmit to run")
    assert done.status is FINISHED, done.message
    with sessions() as session:
        assert session.scalars(select(Evaluation).where(Evaluation.submission_id == sid)).one()
