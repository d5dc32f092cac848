"""The service behind the task: claiming, running, recording (no broker needed)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.lifecycle import claim as claim_submission
from db.models import Evaluation, Submission, SubmissionStatus, utcnow
from evaluator.models.loading import ModelFormat
from storage import storage_from_settings
from tests.worker.helpers import (
    QUICK_BENCHMARK,
    create_model_submission,
    export_file,
    quick_accuracies,
    small_cnn_file,
)
from worker.recording import record_failure
from worker.results import find_stored, results_prefix, store_result
from worker.runner import Outcome, run_next, run_submission


def _new(sessions: sessionmaker[Session], settings: Settings, model: Path, **kw: object) -> str:
    with sessions.begin() as session:
        return create_model_submission(session, settings, model, **kw).id


def _row(sessions: sessionmaker[Session], submission_id: str) -> Submission:
    with sessions() as session:
        row = session.get(Submission, submission_id)
        assert row is not None
        return row


def test_claim_takes_a_queued_job_once(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    sid = _new(sessions, settings, small_cnn_file(tmp_path / "m.safetensors"))
    now = utcnow()
    with sessions.begin() as session:
        first = claim_submission(session, sid, "w1", now, settings)
    with sessions.begin() as session:
        second = claim_submission(session, sid, "w2", now, settings)
    assert first is not None and (first.attempt, first.worker) == (1, "w1")
    assert second is None
    row = _row(sessions, sid)
    assert (row.status, row.attempts, row.worker) == (SubmissionStatus.RUNNING, 1, "w1")


def test_claim_takes_over_a_stale_running_job_and_gives_up_after_max_attempts(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    sid = _new(sessions, settings, small_cnn_file(tmp_path / "m.safetensors"))
    now = utcnow()
    later = timedelta(seconds=settings.heartbeat_timeout_s + 1)
    claims = []
    for attempt in range(settings.max_attempts + 1):
        with sessions.begin() as session:
            claims.append(claim_submission(session, sid, "w", now + attempt * later, settings))
    assert [c.attempt if c else None for c in claims] == [1, 2, 3, None]
    row = _row(sessions, sid)
    assert row.status is SubmissionStatus.FAILED
    assert "stopped responding" in (row.message or "")


def test_claim_leaves_final_jobs_and_cancels_a_queued_cancel_request(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    done = _new(
        sessions,
        settings,
        small_cnn_file(tmp_path / "a.safetensors", seed=1),
        status=SubmissionStatus.FINISHED,
    )
    asked = _new(
        sessions,
        settings,
        small_cnn_file(tmp_path / "b.safetensors", seed=2),
        cancel_requested=True,
    )
    with sessions.begin() as session:
        assert claim_submission(session, done, "w", utcnow(), settings) is None
        assert claim_submission(session, asked, "w", utcnow(), settings) is None
    assert _row(sessions, done).status is SubmissionStatus.FINISHED
    assert _row(sessions, done).attempts == 0
    assert _row(sessions, asked).status is SubmissionStatus.CANCELLED


def test_a_write_from_a_lost_claim_changes_nothing(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    sid = _new(sessions, settings, small_cnn_file(tmp_path / "m.safetensors"))
    with sessions.begin() as session:
        old = claim_submission(session, sid, "w1", utcnow(), settings)
    later = utcnow() + timedelta(seconds=settings.heartbeat_timeout_s + 1)
    with sessions.begin() as session:
        new = claim_submission(session, sid, "w2", later, settings)
    assert old is not None and new is not None
    assert old.token != new.token
    assert record_failure(sessions, old, settings, "too late") is Outcome.LOST
    row = _row(sessions, sid)
    assert (row.status, row.worker, row.message) == (SubmissionStatus.RUNNING, "w2", None)


# The sandbox runs the same on both; the serve test records a result on SQLite.
@pytest.mark.parametrize("backend", ["postgresql"])
def test_run_submission_records_the_evaluators_result(
    sessions: sessionmaker[Session], settings: Settings, trained_model: Path
) -> None:
    settings.eval_limit = 40
    model = trained_model
    sid = _new(sessions, settings, model)

    assert run_submission(sessions, sid, settings, worker="w1") is Outcome.FINISHED
    row = _row(sessions, sid)
    assert (row.status, row.progress, row.phase) == (SubmissionStatus.FINISHED, 1.0, "done")
    assert row.finished_at is not None and row.forward_passes > 0
    with sessions() as session:
        evaluation = session.scalars(select(Evaluation)).one()
    expected = quick_accuracies(settings, model, limit=40)
    got = {key: value["accuracy"] for key, value in evaluation.metrics.items()}
    assert got == expected
    assert (evaluation.natural, evaluation.grid) == (expected["natural"], expected["grid"])
    assert evaluation.images == 40
    assert evaluation.landscape is not None and evaluation.landscape["shape"] == [5, 3, 3]
    assert evaluation.per_image is not None and len(evaluation.per_image["index"]) == 40
    assert evaluation.examples
    assert settings.storage_dir is not None
    for example in evaluation.examples:
        for key in ("original", "transformed"):
            png = settings.storage_dir / example[key]
            assert png.read_bytes().startswith(b"\x89PNG")
        assert set(example["point"]) == {"theta", "dx", "dy"}
    fooled = [e for e in evaluation.examples if e["fooled"]]
    assert fooled
    assert all(e["fool_pred"] != e["label"] == e["pred"] for e in fooled)
    # Stored with the exact configuration it was computed with; the stored copy is gone once
    # the result is in the database.
    assert evaluation.job is not None
    assert evaluation.job["file_sha256"] == row.file_sha256
    assert (evaluation.job["mean"], evaluation.job["limit"]) == (None, 40)
    assert evaluation.job["claim_token"] == evaluation.job["computed_under"] == row.claim_token
    assert storage_from_settings(settings).list(results_prefix(sid)) == []

    # A second run of a finished job changes nothing.
    assert run_submission(sessions, sid, settings, worker="w2") is Outcome.SKIPPED
    assert _row(sessions, sid).worker == "w1"


@pytest.mark.parametrize("backend", ["postgresql"])
def test_run_submission_fails_with_the_models_problem(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    model = export_file(tmp_path / "nan.pt2", "nan")
    sid = _new(sessions, settings, model, model_format=ModelFormat.EXPORT, architecture=None)
    assert run_submission(sessions, sid, settings) is Outcome.FAILED
    row = _row(sessions, sid)
    assert row.status is SubmissionStatus.FAILED
    assert "NaN" in (row.message or "")
    assert row.finished_at is not None


def test_the_oldest_queued_job_runs_first_whichever_message_arrives(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    now = utcnow()
    ids = [
        _new(
            sessions,
            settings,
            small_cnn_file(tmp_path / f"m{i}.safetensors", seed=i),
            queued_at=now - timedelta(seconds=10 - i),
        )
        for i in range(3)
    ]
    from db.lifecycle import claim_next

    with sessions.begin() as session:
        taken = claim_next(session, "w", now, settings)
    assert taken is not None and taken.submission_id == ids[0]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_stored_result_is_recorded_instead_of_evaluating_again(
    sessions: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    """A result stored by a run whose recording never happened (its worker died while the
    database was away) is recorded by the next claim with the same configuration."""
    from db.lifecycle import JobConfig

    sid = _new(sessions, settings, small_cnn_file(tmp_path / "m.safetensors"))
    with sessions.begin() as session:
        row = session.get(Submission, sid)
        assert row is not None
        job = JobConfig.of(row, settings.eval_limit)
        other = JobConfig(**{**job.to_dict(), "mean": [0.5], "std": [0.5]})
    result = {
        "benchmark": QUICK_BENCHMARK,
        "metrics": {"natural": {"accuracy": 0.25}, "first_order": {"accuracy": 0.125}},
        "cost": {"forward_passes": 7, "wall_time_s": 1.0, "device": "cpu", "precision": "fp32",
                 "seed": 0},
        "config": {"images": 8},
    }  # fmt: skip
    storage = storage_from_settings(settings)
    store_result(storage, sid, "a" * 32, other, {**result, "metrics": {}}, [])
    store_result(storage, sid, "b" * 32, job, result, [])
    assert find_stored(storage, sid, job) is not None
    # The model file is gone: had it evaluated, it would have failed.
    settings.model_path(_row(sessions, sid).file_sha256).unlink()
    assert run_next(sessions, settings, worker="w2") is Outcome.FINISHED
    with sessions() as session:
        evaluation = session.scalars(select(Evaluation)).one()
    assert (evaluation.natural, evaluation.first_order) == (0.25, 0.125)
    assert evaluation.job is not None and evaluation.job["computed_under"] == "b" * 32
    assert evaluation.job["claim_token"] == _row(sessions, sid).claim_token != "b" * 32
    assert storage_from_settings(settings).list(results_prefix(sid)) == []
