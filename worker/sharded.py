"""Evaluating a run shard by shard, on as many workers as take its shards.

A claimed submission is cut into shards (`plan_run`: ranges of the fixed evaluation order, at
most ``shard_images`` each, `evaluator.shards.plan_ranges`), and one message per further shard
is published, so idle workers join. A worker evaluates the shards it takes in ONE sandbox
session (`worker.sandbox.run_sandboxed_shards`): opening the model and warming up are paid once
per worker, and after each shard it takes the next queued one of the same run.

- A shard's result is durable as soon as it finishes: its result and example images go to the
  storage (``shards/<id>/...``), then the shard is marked done. A shard whose worker stops is
  queued again by the reaper (`db.shards.reap`) and re-run alone; a shard whose stored result
  matches the job is taken as done without evaluating it again.
- Heartbeats are per shard; each also writes the run's progress, forward passes and ETA into
  the submission row. A cancel request or a lost run stops every shard's session.
- Whoever finishes the last shard merges (`evaluator.shards.merge_results`, exact), picks the
  examples a single run would have picked (`evaluator.examples.merge_examples`), stores the
  merged result and records it under the run's claim (`worker.recording`); the model page
  shows how many shards and workers took part (``config["sharding"]``).

It is one file past the usual length because planning, running, storing and merging a run's
shards are one protocol: each step relies on what the one before it made durable, and they
read best in order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db import shards as shard_states
from db.lifecycle import Claim, JobConfig, RunState
from db.models import ShardStatus, Submission, utcnow
from db.session import transaction
from db.shards import ShardClaim, run_claim
from evaluator.examples import merge_examples
from evaluator.shards import MergeError, merge_results, plan_ranges
from storage import (
    LocalStorage,
    ObjectNotFoundError,
    Storage,
    StorageError,
    example_key,
    model_key,
    shard_example_key,
    shard_result_key,
    shards_prefix,
)
from worker.recording import (
    Outcome,
    finite,
    record_cancelled,
    record_failure,
    record_stored,
    retrying,
)
from worker.results import store_result
from worker.sandbox import (
    SandboxFailure,
    SandboxJob,
    SandboxLimits,
    SandboxStopped,
    ShardOutput,
    run_sandboxed_shards,
)
from worker.sizing import count_images

log = logging.getLogger(__name__)

__all__ = [
    "images_to_evaluate",
    "plan_run",
    "run_shards",
    "sandbox_deadline",
    "sandbox_limits",
]

Publish = Callable[[str], None]


def sandbox_deadline(settings: Settings) -> float:
    """A shard's wall-clock limit: the setting, else a minute under the soft time limit (so
    the sandbox, not Celery, stops a slow evaluation and the message says why)."""
    if settings.sandbox_deadline_s is not None:
        return settings.sandbox_deadline_s
    soft = settings.task_soft_time_limit_s
    return max(soft - 60.0, soft * 0.9)


def sandbox_limits(settings: Settings) -> SandboxLimits:
    return SandboxLimits(
        deadline_s=sandbox_deadline(settings),
        memory_bytes=settings.sandbox_memory_bytes,
        threads=settings.sandbox_threads,
        user=settings.sandbox_user or None,
        tmp_dir=settings.sandbox_tmp_dir,
    )


def _job(submission: Submission, settings: Settings, model_path: Path) -> SandboxJob:
    return SandboxJob(
        model_path=model_path,
        model_format=submission.model_format.value,
        benchmark=submission.benchmark,
        architecture=submission.architecture,
        mean=submission.mean,
        std=submission.std,
        # The sandbox runs in a folder of its own: relative paths would point into it.
        data_dir=settings.data_dir.resolve(),
        benchmarks_file=settings.benchmarks_file.resolve() if settings.benchmarks_file else None,
        device=settings.device,
        batch_size=settings.batch_size,
        bf16=settings.bf16,
        limit=settings.eval_limit,
        examples=settings.example_images,
    )


@contextmanager
def _local_model(storage: Storage, sha256: str, settings: Settings) -> Iterator[Path | None]:
    """The model as a local file for the sandbox (None when the storage has no such object).

    The local backend's file is used where it lies (the sandbox copies it into its own folder
    anyway); any other backend's object is fetched into a folder only this process may enter,
    removed afterwards.
    """
    key = model_key(sha256)
    if isinstance(storage, LocalStorage):
        path = storage.path(key)
        yield path if path.is_file() else None
        return
    folder = Path(tempfile.mkdtemp(prefix="spatialbench-model-", dir=settings.sandbox_tmp_dir))
    try:
        os.chmod(folder, 0o700)
        try:
            path = storage.fetch(key, folder / "model")
        except ObjectNotFoundError:
            yield None
            return
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- Planning -----------------------------------------------------------------------------------


def images_to_evaluate(
    benchmark: str, settings: Settings, keep_going: Callable[[], bool] | None = None
) -> int:
    """How many positions the evaluation order of ``benchmark`` has under ``settings`` (its
    dataset's size, cut to ``eval_limit``), read in a process of its own (`worker.sizing`);
    ``keep_going`` is the run's heartbeat meanwhile."""
    return count_images(
        benchmark,
        settings.data_dir.resolve(),
        settings.benchmarks_file.resolve() if settings.benchmarks_file else None,
        settings.eval_limit,
        keep_going=keep_going,
        interval_s=min(1.0, settings.progress_interval_s),
    )


def plan_run(
    sessions: sessionmaker[Session],
    settings: Settings,
    claim: Claim,
    images: int,
    publish: Publish | None,
) -> int | None:
    """Cut the run of ``claim`` into shards and publish a message for each shard but the one
    this worker takes; the number of shards, or None if the run was lost meanwhile."""
    ranges = plan_ranges(images, settings.shard_images)

    def write() -> bool:
        with transaction(sessions) as session:
            return shard_states.plan(session, claim, ranges, utcnow())

    if not retrying(settings)(write):
        return None
    if publish is not None:
        for _ in ranges[1:]:
            try:
                publish(claim.submission_id)
            except Exception:
                # The reaper publishes again after republish_after_s.
                log.warning("could not publish a shard of %s", claim.submission_id, exc_info=True)
    log.info("%s: %d images in %d shard(s)", claim.submission_id, images, len(ranges))
    return len(ranges)


# --- Running shards -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What every shard of one run shares."""

    sessions: sessionmaker[Session]
    settings: Settings
    storage: Storage
    submission_id: str
    run_token: str
    worker: str
    job: JobConfig

    def claim_next(self) -> ShardClaim | None:
        def take() -> ShardClaim | None:
            with transaction(self.sessions) as session:
                return shard_states.claim_shard(
                    session, self.submission_id, self.run_token, self.worker, utcnow(),
                    self.settings,
                )  # fmt: skip

        return retrying(self.settings)(take)

    def finish(self, shard: ShardClaim, key: str, forward_passes: int) -> bool:
        def write() -> bool:
            with transaction(self.sessions) as session:
                return shard_states.finish_shard(session, shard, key, forward_passes, utcnow())

        return bool(retrying(self.settings)(write))


def _progress_values(message: dict[str, Any]) -> dict[str, Any]:
    """A shard's progress message as the shard row's columns (clamped, finite)."""
    values: dict[str, Any] = {"phase": str(message.get("phase", ""))[:32] or None}
    fraction = finite(message.get("fraction"), 0.0) or 0.0
    values["progress"] = min(max(fraction, 0.0), 0.999)
    values["eta_seconds"] = finite(message.get("eta_s"))
    passes = message.get("forward_passes")
    if isinstance(passes, int) and passes >= 0:
        values["forward_passes"] = passes
    return values


class _Session:
    """The callbacks of one sandbox session: which shard runs, its heartbeat, and storing
    each finished shard before taking the next."""

    def __init__(self, run: _Run, first: ShardClaim) -> None:
        self.run = run
        # Resolved before the sandbox starts, which spares a session with nothing to do.
        self.current = _next_to_evaluate(run, first)
        self.latest: dict[str, Any] | None = None
        self.last_write = 0.0
        self.lost = False
        self.evaluated = 0

    def next_shard(self, output: ShardOutput | None) -> range | None:
        """The session's first call (``output`` None) gets the shard already taken."""
        if output is not None:
            assert self.current is not None
            if not _store_shard(self.run, self.current, output):
                self.lost = True
                self.current = None
                return None
            self.evaluated += 1
            self.current = _next_to_evaluate(self.run, None)
        self.latest, self.last_write = None, 0.0
        return self.current.positions if self.current is not None else None

    def on_progress(self, message: dict[str, Any]) -> None:
        self.latest = message

    def tick(self) -> bool:
        """Heartbeat and progress, at most every ``progress_interval_s``; True means stop."""
        now = time.monotonic()
        if self.current is None or now - self.last_write < self.run.settings.progress_interval_s:
            return False
        self.last_write = now
        progress = _progress_values(self.latest) if self.latest is not None else None
        try:
            with transaction(self.run.sessions) as session:
                state = shard_states.shard_heartbeat(session, self.current, utcnow(), progress)
        except Exception:
            # The database is away: keep evaluating. If it stays away past the heartbeat
            # timeout, the reaper hands the shard on and the next write here finds it lost.
            log.warning("progress write for %s failed", self.run.submission_id, exc_info=True)
            return False
        self.lost = state is RunState.LOST
        return state is not RunState.CONTINUE


def _next_to_evaluate(run: _Run, claimed: ShardClaim | None) -> ShardClaim | None:
    """``claimed``, or the next shard this worker takes, skipping (marking done) those whose
    stored result already matches the job."""
    shard = claimed if claimed is not None else run.claim_next()
    while shard is not None:
        stored = _stored_shard(run.storage, shard, run.job)
        if stored is None:
            return shard
        log.info("shard %d of %s: its stored result is reused", shard.index, run.submission_id)
        run.finish(shard, shard_result_key(shard.submission_id, shard.index),
                   int(stored["result"]["cost"]["forward_passes"]))  # fmt: skip
        shard = run.claim_next()
    return None


def run_shards(
    sessions: sessionmaker[Session],
    settings: Settings,
    storage: Storage,
    first: ShardClaim,
    *,
    time_limit_errors: tuple[type[BaseException], ...] = (),
) -> Outcome:
    """Evaluate ``first`` and then every further queued shard of its run, in one sandbox
    session; then, if no shard of the run is left, merge and record the result."""
    claim = run_claim(first)
    with transaction(sessions) as session:
        submission = session.get(Submission, first.submission_id)
        if submission is None:
            return Outcome.LOST
        session.expunge(submission)
    run = _Run(
        sessions, settings, storage, first.submission_id, first.run_token, first.worker,
        JobConfig.of(submission, settings.eval_limit),
    )  # fmt: skip
    state = _Session(run, first)
    if state.current is None:
        return _finalize(run, claim)
    with _local_model(storage, submission.file_sha256, settings) as model_path:
        if model_path is None:
            return record_failure(
                sessions, claim, settings,
                "The uploaded model file is missing from the worker's storage; upload it again.",
            )  # fmt: skip
        try:
            with _released_on_error(state):
                run_sandboxed_shards(
                    _job(submission, settings, model_path),
                    sandbox_limits(settings),
                    state.next_shard,
                    on_progress=state.on_progress,
                    tick=state.tick,
                    tick_interval_s=min(1.0, settings.progress_interval_s),
                )
        except SandboxStopped:
            if state.lost:
                log.warning("lost %s to a resubmit, the reaper or a cancel", first.submission_id)
                return Outcome.LOST
            return record_cancelled(sessions, claim, settings)
        except SandboxFailure as failure:
            log.info("shard of %s failed (%s): %s", first.submission_id, failure.kind,
                     failure.detail)  # fmt: skip
            return record_failure(sessions, claim, settings, failure.message)
        except time_limit_errors:
            return record_failure(
                sessions, claim, settings,
                "The evaluation did not finish within the worker's time limit and was stopped. "
                "Make the model faster, or ask the operator for a longer limit.",
            )  # fmt: skip
    if state.lost:
        return Outcome.LOST
    log.info("%s: %d shard(s) evaluated on %s", first.submission_id, state.evaluated, run.worker)
    return _finalize(run, claim)


@contextmanager
def _released_on_error(state: _Session) -> Iterator[None]:
    """Whatever stops the session (a cancel, a failure, the time limit) gives the shard it was
    running back, so that no shard of a run that ended looks as if it still ran."""
    try:
        yield
    except BaseException:
        shard = state.current
        if shard is not None:
            with contextlib.suppress(Exception), transaction(state.run.sessions) as session:
                shard_states.release_shard(session, shard)
        raise


# --- Storing a shard ----------------------------------------------------------------------------


def _store_shard(run: _Run, shard: ShardClaim, output: ShardOutput) -> bool:
    """Put the shard's example images and result into the storage, then mark it done; False
    when the shard was lost meanwhile (its result stays stored for whoever runs it again)."""
    if list(output.shard) != list(shard.positions):
        raise SandboxFailure(
            "internal", "The evaluation process answered for another shard.",
            detail=f"asked {shard.positions}, got {output.shard}",
        )  # fmt: skip
    examples: list[dict[str, Any]] = []
    try:
        examples = _store_examples(run.storage, shard, output)
    except (OSError, StorageError):
        log.exception("could not store the example images of %s", shard.submission_id)
    key = shard_result_key(shard.submission_id, shard.index)
    blob = {
        "job": run.job.to_dict(),
        "positions": [shard.start, shard.stop],
        "claim_token": shard.token,
        "result": output.result,
        "examples": examples,
    }
    retrying(run.settings)(run.storage.put_bytes, key, json.dumps(blob).encode())
    return run.finish(shard, key, int(output.result["cost"]["forward_passes"]))


def _store_examples(
    storage: Storage, shard: ShardClaim, output: ShardOutput
) -> list[dict[str, Any]]:
    if output.examples_dir is None:
        return []
    stored = []
    for example in output.examples:
        keys = {}
        for kind in ("original", "transformed"):
            name = Path(example[kind]).stem
            keys[kind] = shard_example_key(shard.submission_id, shard.index, name)
            storage.put_file(keys[kind], output.examples_dir / example[kind])
        stored.append({**example, **keys})
    return stored


def _stored_shard(storage: Storage, shard: ShardClaim, job: JobConfig) -> dict[str, Any] | None:
    """The stored result of ``shard`` if it was computed for ``job`` over the same range."""
    try:
        return _read_shard(storage, shard.submission_id, shard.index, shard.positions, job)
    except ObjectNotFoundError:
        return None
    except (StorageError, ValueError) as exc:
        log.warning("stored shard %d of %s not reused: %s", shard.index, shard.submission_id, exc)
        return None


def _read_shard(
    storage: Storage, submission_id: str, index: int, positions: range, job: JobConfig
) -> dict[str, Any]:
    """Shard ``index``'s stored result; ValueError unless it is for ``job`` and ``positions``."""
    blob = json.loads(storage.read_bytes(shard_result_key(submission_id, index)))
    if not isinstance(blob, dict) or blob.get("job") != job.to_dict():
        raise ValueError(f"the stored result of shard {index} is for another job")
    if blob.get("positions") != [positions.start, positions.stop]:
        raise ValueError(f"the stored result of shard {index} is for another range")
    return blob


# --- The merge ----------------------------------------------------------------------------------


def _finalize(run: _Run, claim: Claim) -> Outcome:
    """Merge and record the run if every shard is done; `Outcome.SHARDS_DONE` if not."""
    with transaction(run.sessions) as session:
        rows = shard_states.run_shards(session, run.submission_id, run.run_token)
        done = [(r.index, range(r.start, r.stop), r.worker) for r in rows
                if r.status is ShardStatus.DONE]  # fmt: skip
    if not rows or len(done) < len(rows):
        return Outcome.SHARDS_DONE
    try:
        parts = [_read_shard(run.storage, run.submission_id, index, positions, run.job)
                 for index, positions, _ in done]  # fmt: skip
        merged = merge_results([p["result"] for p in parts])
    except (MergeError, StorageError, KeyError, TypeError, ValueError) as exc:
        log.error("could not merge the shards of %s: %s", run.submission_id, exc)
        return record_failure(
            run.sessions, claim, run.settings,
            "The shards of this evaluation could not be merged (the worker's log says why); "
            "resubmit it.",
        )  # fmt: skip
    chosen = merge_examples([p["examples"] for p in parts], run.settings.example_images)
    examples = _final_examples(run, chosen)
    workers = sorted({w for *_, w in done if w})
    merged["config"]["sharding"] = {
        "shards": len(done),
        "shard_images": run.settings.shard_images,
        "workers": len(workers),
        "worker_names": workers,
    }
    stored = store_result(run.storage, run.submission_id, run.run_token, run.job, merged, examples)
    outcome = record_stored(run.sessions, claim, run.settings, run.storage, stored)
    if outcome is Outcome.FINISHED:
        _forget_shards(run.storage, run.submission_id)
    return outcome


def _final_examples(run: _Run, chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy the chosen shard examples to the evaluation's example keys, numbered as a single
    run numbers them."""
    final = []
    try:
        for n, example in enumerate(chosen):
            keys = {}
            for kind in ("original", "transformed"):
                keys[kind] = example_key(run.submission_id, f"{n:02d}_{kind}")
                run.storage.put_bytes(keys[kind], run.storage.read_bytes(example[kind]))
            final.append({**example, **keys})
    except (OSError, StorageError):
        log.exception("could not copy the example images of %s", run.submission_id)
        return []
    return final


def _forget_shards(storage: Storage, submission_id: str) -> None:
    """The shards' objects, once the merged result is recorded."""
    with contextlib.suppress(StorageError):
        for key in storage.list(shards_prefix(submission_id)):
            storage.delete(key)
