"""The lifecycle of a submission as a state machine (hypothesis), on Postgres and SQLite.

A model of each submission (status, cancel request, current claim token, the settings a run
would see) predicts the outcome of every transition; hypothesis drives random interleavings
of submits, claims, heartbeats, cancels, resubmits with new settings, finishes and failures of
old and new claims, reaps and clock jumps, and checks the database against the model after
each step. The race of finding 1 (a frozen run finishing after a cancel and a resubmit with
new settings) is one of those interleavings, and is also spelled out as its own test.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import hypothesis.strategies as st
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import lifecycle
from db.lifecycle import CancelOutcome, Claim, FinishOutcome, JobConfig, RunState
from db.models import Evaluation, Submission, SubmissionStatus, User, utcnow
from evaluator.vocabulary import ModelFormat
from tests.fixtures_db import TestDatabase

S = SubmissionStatus


@dataclass
class Rules:
    heartbeat_timeout_s: float = 30.0
    max_attempts: int = 3
    republish_after_s: float = 60.0


RULES = Rules()


@dataclass
class Expected:
    """What the model believes about one submission."""

    status: S = S.QUEUED
    cancel_requested: bool = False
    token: str | None = None
    attempts: int = 0
    heartbeat_at: datetime | None = None
    mean: float | None = None
    # (token, mean) of the finished result.
    result: tuple[str, float | None] | None = None
    tokens_seen: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Run:
    """A claim and the settings its run computed with."""

    claim: Claim
    job: JobConfig


def _job(row: Submission) -> JobConfig:
    return JobConfig.of(row, None)


def _evaluation(row: Submission) -> Evaluation:
    return Evaluation(benchmark=row.benchmark, natural=0.5, metrics={}, forward_passes=1)


class LifecycleMachine(RuleBasedStateMachine):
    sessions: sessionmaker[Session]

    runs = Bundle("runs")

    def __init__(self) -> None:
        super().__init__()
        self.now = utcnow()
        self.ids: list[str] = []
        self.expected: dict[str, Expected] = {}
        self.all_tokens: set[str] = set()
        with self.sessions.begin() as session:
            owner = User(name=f"u-{uuid.uuid4().hex[:12]}")
            session.add(owner)
            session.flush()
            self.owner_id = owner.id
            for i in range(2):
                row = Submission(
                    owner_id=owner.id,
                    display_name=f"m{i}",
                    benchmark="digits",
                    model_format=ModelFormat.SAFETENSORS,
                    architecture="small_cnn",
                    file_sha256=uuid.uuid4().hex * 2,
                    file_size=1,
                )
                lifecycle.submit(session, row, self.now)
                self.ids.append(row.id)
                self.expected[row.id] = Expected()

    # --- helpers ------------------------------------------------------------------------------

    def _stale(self, e: Expected) -> bool:
        limit = self.now - timedelta(seconds=RULES.heartbeat_timeout_s)
        return e.status is S.RUNNING and (e.heartbeat_at is None or e.heartbeat_at < limit)

    def _current(self, run: Run) -> bool:
        e = self.expected[run.claim.submission_id]
        return e.status is S.RUNNING and e.token == run.claim.token

    # --- rules --------------------------------------------------------------------------------

    @rule(target=runs, i=st.integers(0, 1))
    def claim(self, i: int) -> Run | None:
        sid = self.ids[i]
        e = self.expected[sid]
        claimable = not e.cancel_requested and (e.status is S.QUEUED or self._stale(e))
        with self.sessions.begin() as session:
            taken = lifecycle.claim(session, sid, "w", self.now, RULES)
            row = session.get(Submission, sid)
            assert row is not None
            job = _job(row)
        if claimable and e.attempts < RULES.max_attempts:
            assert taken is not None
            assert taken.token not in self.all_tokens  # a token never repeats
            self.all_tokens.add(taken.token)
            e.status, e.token, e.heartbeat_at = S.RUNNING, taken.token, self.now
            e.attempts += 1
            assert taken.attempt == e.attempts
            return Run(taken, job)
        assert taken is None
        if claimable:
            e.status = S.FAILED
        elif e.cancel_requested and e.status is S.QUEUED:
            e.status = S.CANCELLED
        return None

    @rule(run=runs)
    def heartbeat(self, run: Run | None) -> None:
        if run is None:
            return
        e = self.expected[run.claim.submission_id]
        with self.sessions.begin() as session:
            state = lifecycle.heartbeat(session, run.claim, self.now, {"progress": 0.5})
        if not self._current(run):
            assert state is RunState.LOST
            return
        e.heartbeat_at = self.now
        assert state is (RunState.CANCEL if e.cancel_requested else RunState.CONTINUE)

    @rule(run=runs)
    def finish(self, run: Run | None) -> None:
        if run is None:
            return
        sid = run.claim.submission_id
        e = self.expected[sid]
        with self.sessions.begin() as session:
            row = session.get(Submission, sid)
            assert row is not None
            outcome = lifecycle.finish(session, run.claim, _evaluation(row), run.job, self.now)
        if not self._current(run):
            assert outcome is FinishOutcome.LOST
            return
        if e.cancel_requested:
            assert outcome is FinishOutcome.CANCELLED
            e.status = S.CANCELLED
            return
        assert outcome is FinishOutcome.FINISHED
        e.status, e.heartbeat_at = S.FINISHED, self.now
        e.result = (run.claim.token, run.job.mean[0] if run.job.mean else None)

    @rule(run=runs)
    def fail(self, run: Run | None) -> None:
        if run is None:
            return
        e = self.expected[run.claim.submission_id]
        with self.sessions.begin() as session:
            done = lifecycle.fail(session, run.claim, "broken", self.now)
        assert done == self._current(run)
        if done:
            e.status, e.heartbeat_at = S.FAILED, self.now

    @rule(i=st.integers(0, 1))
    def request_cancel(self, i: int) -> None:
        sid = self.ids[i]
        e = self.expected[sid]
        with self.sessions.begin() as session:
            outcome = lifecycle.request_cancel(session, sid, self.now)
        if e.status is S.QUEUED:
            assert outcome is CancelOutcome.CANCELLED
            e.status = S.CANCELLED
        elif e.status is S.RUNNING and not e.cancel_requested:
            assert outcome is CancelOutcome.REQUESTED
            e.cancel_requested = True
        elif e.status in (S.FINISHED, S.FAILED):
            assert outcome is CancelOutcome.FINAL
        else:
            assert outcome is CancelOutcome.ALREADY

    @rule(i=st.integers(0, 1), mean=st.sampled_from([None, 0.5, 0.25]))
    def resubmit(self, i: int, mean: float | None) -> None:
        """What the API does: requeue, and the new settings, in one transaction."""
        sid = self.ids[i]
        e = self.expected[sid]
        allowed = e.status in (S.FAILED, S.CANCELLED) or (
            e.status in (S.QUEUED, S.RUNNING) and e.cancel_requested
        )
        with self.sessions.begin() as session:
            done = lifecycle.requeue(session, sid, self.owner_id, self.now)
            if done:
                row = session.get(Submission, sid)
                assert row is not None
                row.mean = row.std = None if mean is None else [mean] * 3
        assert done == allowed
        if done:
            e.status, e.cancel_requested, e.token, e.attempts = S.QUEUED, False, None, 0
            e.heartbeat_at, e.mean = None, mean

    @rule()
    def reap(self) -> None:
        with self.sessions.begin() as session:
            lifecycle.reap(session, self.now, RULES)
        for e in self.expected.values():
            if not self._stale(e):
                continue
            if e.cancel_requested:
                e.status = S.CANCELLED
            elif e.attempts >= RULES.max_attempts:
                e.status = S.FAILED
            else:
                e.status, e.token = S.QUEUED, None

    @rule(seconds=st.sampled_from([1, 31]))
    def wait(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def database_agrees_with_the_model(self) -> None:
        with self.sessions() as session:
            for sid, e in self.expected.items():
                row = session.get(Submission, sid)
                assert row is not None
                assert (row.status, row.cancel_requested) == (e.status, e.cancel_requested)
                if e.status is S.RUNNING:
                    assert row.claim_token == e.token
                if e.status is S.QUEUED:
                    assert row.claim_token is None
                assert row.mean == (None if e.mean is None else [e.mean] * 3)
                evaluation = session.scalar(
                    select(Evaluation).where(Evaluation.submission_id == sid)
                )
                if e.status is S.FINISHED:
                    # The stored result was computed with the submission's own settings, by
                    # the claim that finished it.
                    assert evaluation is not None and evaluation.job is not None
                    assert e.result is not None
                    assert evaluation.job["claim_token"] == e.result[0] == row.claim_token
                    assert evaluation.job["mean"] == row.mean
                    assert e.result[1] == e.mean


def _run_machine(test_db: TestDatabase) -> None:
    LifecycleMachine.sessions = test_db.sessions
    run_state_machine_as_test(
        LifecycleMachine,
        settings=hypothesis_settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_the_lifecycle_as_a_state_machine(test_db: TestDatabase) -> None:
    _run_machine(test_db)


def test_a_frozen_run_cannot_record_its_result_after_a_cancel_and_a_resubmit(
    test_db: TestDatabase,
) -> None:
    """Finding 1: claim, freeze, cancel, resubmit with new settings, claim again; the old run's
    result is refused and the new run's result is the one stored."""
    sessions = test_db.sessions
    now = utcnow()
    with sessions.begin() as session:
        owner = User(name="frozen")
        session.add(owner)
        session.flush()
        submitted = Submission(
            owner_id=owner.id, display_name="m", benchmark="digits",
            model_format=ModelFormat.SAFETENSORS, architecture="small_cnn",
            file_sha256="f" * 64, file_size=1,
        )  # fmt: skip
        lifecycle.submit(session, submitted, now)
        sid, owner_id = submitted.id, owner.id
    with sessions.begin() as session:
        old = lifecycle.claim(session, sid, "w1", now, RULES)
        row = session.get(Submission, sid)
        assert old is not None and row is not None
        old_job = _job(row)
    with sessions.begin() as session:
        assert lifecycle.request_cancel(session, sid, now) is CancelOutcome.REQUESTED
    with sessions.begin() as session:
        assert lifecycle.requeue(session, sid, owner_id, now)
        row = session.get(Submission, sid)
        assert row is not None
        row.mean = row.std = [0.5] * 3
    with sessions.begin() as session:
        new = lifecycle.claim(session, sid, "w2", now, RULES)
        row = session.get(Submission, sid)
        assert new is not None and row is not None
        new_job = _job(row)
    # Same attempt number as before the resubmit; the token tells the runs apart.
    assert (old.attempt, new.attempt) == (1, 1) and old.token != new.token
    with sessions.begin() as session:
        row = session.get(Submission, sid)
        assert row is not None
        stale = lifecycle.finish(session, old, _evaluation(row), old_job, now)
        assert stale is FinishOutcome.LOST
    with sessions.begin() as session:
        row = session.get(Submission, sid)
        assert row is not None
        assert lifecycle.finish(session, new, _evaluation(row), new_job, now) is (
            FinishOutcome.FINISHED
        )
    with sessions() as session:
        evaluation = session.scalars(
            select(Evaluation).where(Evaluation.submission_id == sid)
        ).one()
        assert evaluation.job is not None
        assert (evaluation.job["mean"], evaluation.job["claim_token"]) == ([0.5] * 3, new.token)
