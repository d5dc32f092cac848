"""A shard's transitions (db.shards), on Postgres and SQLite: plans, claims fenced by the run,
the run's progress aggregated from its shards, a stopped shard re-run alone, republishing, and
a cancelled run with nothing left running."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from db import lifecycle, shards
from db.lifecycle import Claim, RunState
from db.models import Shard, ShardStatus, Submission, SubmissionStatus, utcnow
from tests.factories import create_submission
from tests.fixtures_db import TestDatabase


@dataclass
class Rules:
    heartbeat_timeout_s: float = 30.0
    max_attempts: int = 2
    republish_after_s: float = 60.0


RULES = Rules()
RANGES = [range(0, 40), range(40, 80), range(80, 100)]


def running(session: Session) -> Claim:
    submission = create_submission(session)
    claim = lifecycle.claim(session, submission.id, "planner", utcnow(), RULES)
    assert claim is not None
    assert shards.plan(session, claim, RANGES, utcnow())
    return claim


def row(session: Session, claim: Claim) -> Submission:
    found = session.get(Submission, claim.submission_id, populate_existing=True)
    assert found is not None
    return found


def shard_rows(session: Session, claim: Claim) -> list[Shard]:
    return shards.run_shards(session, claim.submission_id, claim.token)


def test_workers_take_each_shard_once_in_order(test_db: TestDatabase) -> None:
    session = test_db.session
    claim = running(session)
    taken = [shards.claim_next_shard(session, f"w{i}", utcnow(), RULES) for i in range(4)]
    assert [t.positions if t else None for t in taken] == [*RANGES, None]
    assert {s.status for s in shard_rows(session, claim)} == {ShardStatus.RUNNING}


def test_the_run_shows_the_progress_of_its_shards(test_db: TestDatabase) -> None:
    session = test_db.session
    claim = running(session)
    first = shards.claim_shard(session, claim.submission_id, claim.token, "a", utcnow(), RULES)
    second = shards.claim_shard(session, claim.submission_id, claim.token, "b", utcnow(), RULES)
    assert first is not None and second is not None
    assert shards.finish_shard(session, first, "shards/x/000000.json", 400, utcnow())
    state = shards.shard_heartbeat(
        session, second, utcnow(), {"progress": 0.5, "forward_passes": 100, "phase": "grid"}
    )
    assert state is RunState.CONTINUE
    submission = row(session, claim)
    # 40 images done and half of 40: 60 of 100.
    assert submission.progress == 0.6
    assert submission.forward_passes == 500
    assert submission.phase == "1/3 shards done"
    assert submission.eta_seconds is not None and submission.eta_seconds >= 0


def test_a_stopped_shard_runs_again_alone(test_db: TestDatabase) -> None:
    session = test_db.session
    claim = running(session)
    taken = [shards.claim_next_shard(session, "w", utcnow(), RULES) for _ in RANGES]
    done, stopped, alive = (t for t in taken if t is not None)
    assert shards.finish_shard(session, done, "k", 1, utcnow())
    later = utcnow() + timedelta(seconds=RULES.heartbeat_timeout_s + 1)
    assert shards.shard_heartbeat(session, alive, later) is RunState.CONTINUE
    published = shards.reap(session, later, RULES)
    assert published == [claim.submission_id]  # its message may be lost: published again
    states = {s.index: s.status for s in shard_rows(session, claim)}
    assert states == {0: ShardStatus.DONE, 1: ShardStatus.QUEUED, 2: ShardStatus.RUNNING}
    # The old claim of the stopped shard writes nothing any more.
    assert shards.shard_heartbeat(session, stopped, later) is RunState.LOST
    assert not shards.finish_shard(session, stopped, "k", 1, later)
    again = shards.claim_next_shard(session, "w2", later, RULES)
    assert again is not None and again.index == stopped.index and again.attempt == 2
    # The run as a whole is never reaped while its shards are.
    assert lifecycle.reap(session, later + timedelta(hours=1), RULES) == []
    assert row(session, claim).status is SubmissionStatus.RUNNING


def test_a_shard_out_of_attempts_fails_the_run(test_db: TestDatabase) -> None:
    session = test_db.session
    claim = running(session)
    now = utcnow()
    for _ in range(RULES.max_attempts):
        assert shards.claim_shard(session, claim.submission_id, claim.token, "w", now, RULES)
        now += timedelta(seconds=RULES.heartbeat_timeout_s + 1)
        shards.reap(session, now, RULES)
    submission = row(session, claim)
    assert submission.status is SubmissionStatus.FAILED
    assert submission.message == lifecycle.give_up_message(RULES.max_attempts)


def test_a_cancelled_or_replaced_run_gives_no_shard_out(test_db: TestDatabase) -> None:
    session = test_db.session
    claim = running(session)
    held = shards.claim_next_shard(session, "w", utcnow(), RULES)
    assert held is not None
    assert lifecycle.request_cancel(session, claim.submission_id, utcnow())
    assert shards.claim_next_shard(session, "w2", utcnow(), RULES) is None
    assert shards.shard_heartbeat(session, held, utcnow()) is RunState.CANCEL
    # The holder stops and gives its shard back; nobody is left to notice the request.
    assert shards.release_shard(session, held)
    shards.reap(session, utcnow(), RULES)
    assert row(session, claim).status is SubmissionStatus.CANCELLED


def test_a_new_plan_replaces_the_shards_of_an_earlier_run(test_db: TestDatabase) -> None:
    session = test_db.session
    claim = running(session)
    old = shards.claim_next_shard(session, "w", utcnow(), RULES)
    assert old is not None
    assert lifecycle.request_cancel(session, claim.submission_id, utcnow())
    assert lifecycle.cancel_run(session, claim, utcnow())
    assert lifecycle.requeue(session, claim.submission_id, row(session, claim).owner_id, utcnow())
    new = lifecycle.claim(session, claim.submission_id, "planner2", utcnow(), RULES)
    assert new is not None
    assert shards.plan(session, new, [range(0, 100)], utcnow())
    assert shards.shard_heartbeat(session, old, utcnow()) is RunState.LOST
    assert [s.run_token for s in shard_rows(session, new)] == [new.token]
    assert not shards.plan(session, claim, RANGES, utcnow())  # the old claim plans nothing
