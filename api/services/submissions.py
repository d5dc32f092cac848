"""Submissions: accept an upload, read one or a user's list, cancel, per-user caps.

These functions flush and never commit: the caller owns the transaction (the API's request
session, or ``db.session.session_scope`` elsewhere), and enqueues an evaluation only after it
has committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from api.errors import Conflict, Forbidden, InvalidInput, NotFound, RateLimited
from api.schemas import (
    EvaluationPublic,
    Metrics,
    SubmissionCreate,
    SubmissionPublic,
    as_utc,
)
from api.services.ablations import evaluation_ablations
from api.services.benchmarks import get_benchmark
from api.services.uploads import (
    StagedUpload,
    check_architecture_fits,
    check_model_file,
    discard,
    store_file,
)
from api.urls import api_path
from config.settings import Settings
from db import lifecycle
from db.lifecycle import CancelOutcome
from db.models import Evaluation, Resubmission, Submission, SubmissionStatus, User, utcnow
from db.session import on_rollback
from evaluator.benchmarks import BenchmarkSpec
from evaluator.models.registry import get_architecture
from evaluator.vocabulary import ModelFormat
from storage import Storage

__all__ = [
    "ACTIVE_STATUSES",
    "SubmitResult",
    "Usage",
    "cancel_submission",
    "check_caps",
    "count_by_status",
    "evaluation_public",
    "get_submission",
    "list_submissions",
    "status_url",
    "submission_public",
    "submit",
    "usage",
    "visible_to",
]

ACTIVE_STATUSES = (SubmissionStatus.QUEUED, SubmissionStatus.RUNNING)
DAY = timedelta(days=1)
# When a user waits on their own running jobs there is no exact time to give; ask them to
# come back after this long (the message says what they are waiting for).
CONCURRENT_RETRY_S = 60


# --- Caps -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    last_24h: int
    oldest_in_window: datetime | None
    active: int


def usage(session: Session, user: User, now: datetime | None = None) -> Usage:
    """How many submissions ``user`` made in the last 24 hours (new ones and resubmissions
    of failed or cancelled ones) and how many are queued or running."""
    now = now or utcnow()
    since = now - DAY
    count = 0
    firsts: list[datetime] = []
    for created_at, owner_id in (
        (Submission.created_at, Submission.owner_id),
        (Resubmission.created_at, Resubmission.owner_id),
    ):
        n, first = session.execute(
            select(func.count(), func.min(created_at)).where(
                owner_id == user.id, created_at > since
            )
        ).one()
        count += int(n)
        if (first_utc := as_utc(first)) is not None:
            firsts.append(first_utc)
    oldest = min(firsts, default=None)
    active = session.scalar(
        select(func.count()).where(
            Submission.owner_id == user.id, Submission.status.in_(ACTIVE_STATUSES)
        )
    )
    return Usage(last_24h=count, oldest_in_window=oldest, active=int(active or 0))


def limits(settings: Settings, user: User) -> tuple[int, int]:
    """(daily, concurrent) for ``user``: its own when set, else the settings' defaults."""
    daily = settings.daily_limit if user.daily_limit is None else user.daily_limit
    concurrent = (
        settings.concurrent_limit if user.concurrent_limit is None else user.concurrent_limit
    )
    return daily, concurrent


def check_caps(
    session: Session, settings: Settings, user: User, now: datetime | None = None
) -> None:
    """``RateLimited`` (429, with Retry-After) when ``user`` may not submit now. Admins may."""
    if user.is_admin:
        return
    now = now or utcnow()
    daily, concurrent = limits(settings, user)
    used = usage(session, user, now)
    if used.last_24h >= daily:
        if used.oldest_in_window is not None:
            free_at = used.oldest_in_window + DAY
            retry = max(1.0, (free_at - now).total_seconds())
            when = f"at {free_at.strftime('%Y-%m-%d %H:%M:%S')} UTC"
        else:  # a limit of 0
            retry, when = DAY.total_seconds(), "never under the current limit"
        raise RateLimited(
            f"You have made {used.last_24h} submissions in the last 24 hours, the daily limit "
            f"is {daily}. The next one is possible {when} (in {retry / 3600:.1f} h).",
            retry_after_s=retry,
        )
    if used.active >= concurrent:
        raise RateLimited(
            f"You have {used.active} submissions queued or running, the limit is {concurrent}. "
            "Submit again when one of them has finished "
            f"(GET {api_path('/submissions?status=queued')} "
            "lists them), or cancel one.",
            retry_after_s=CONCURRENT_RETRY_S,
        )


# --- Submit -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitResult:
    submission: Submission
    # The same file was already submitted to this benchmark: ``submission`` is that one.
    duplicate: bool
    # The submission is (again) queued and its id must be enqueued after the commit.
    enqueue: bool


def _check_metadata(meta: SubmissionCreate, benchmark: BenchmarkSpec) -> None:
    """What can be checked before looking at the file."""
    if meta.architecture:
        check_architecture_fits(get_architecture(meta.architecture), benchmark)
    if meta.mean is not None and len(meta.mean) != benchmark.channels:
        raise InvalidInput(
            f"mean and std need one value per channel: benchmark {benchmark.name!r} has "
            f"{benchmark.channels} channel(s), you gave {len(meta.mean)}."
        )


def check_metadata(meta: SubmissionCreate, settings: Settings) -> BenchmarkSpec:
    """The benchmark of ``meta``, after checking that the metadata fits it (unknown benchmark or
    architecture, an architecture for other images, mean/std per channel). Raises 422s."""
    benchmark = get_benchmark(meta.benchmark, settings)
    _check_metadata(meta, benchmark)
    return benchmark


def _apply_metadata(submission: Submission, meta: SubmissionCreate) -> None:
    submission.display_name = meta.display_name
    submission.architecture = meta.architecture
    submission.mean = meta.mean
    submission.std = meta.std
    submission.training_method = meta.training_method
    submission.extra_data = meta.extra_data
    submission.paper_url = str(meta.paper_url) if meta.paper_url else None
    submission.description = meta.description
    submission.is_public = meta.is_public


def _find(session: Session, owner: User, sha256: str, benchmark: str) -> Submission | None:
    """``owner``'s own submission of this file to this benchmark; else a public one by
    someone else (the oldest), which answers for the file. Others' private ones are never
    seen: each user's submission stands on its own."""
    found = session.scalars(
        select(Submission)
        .options(selectinload(Submission.owner), selectinload(Submission.evaluation))
        .where(
            Submission.file_sha256 == sha256,
            Submission.benchmark == benchmark,
            (Submission.owner_id == owner.id) | Submission.is_public.is_(True),
        )
        .order_by(Submission.created_at, Submission.id)
    ).all()
    own = [s for s in found if s.owner_id == owner.id]
    return own[0] if own else (found[0] if found else None)


def submit(
    session: Session,
    settings: Settings,
    owner: User,
    meta: SubmissionCreate,
    upload: StagedUpload,
    storage: Storage,
) -> SubmitResult:
    """Accept ``upload`` (a received, not yet checked file) as a submission of ``owner``.

    In order: the metadata fits the benchmark; the same file for the same benchmark returns
    the existing submission (``duplicate``): the owner's own, or a public one of someone
    else (another user's private one is not seen: this user gets a submission of their
    own). The owner's own failed or cancelled one, or one whose cancel was requested, is
    queued again with the new metadata (a resubmit: it counts towards the daily cap); the
    caps; the file checks (``check_model_file``); the file moves into the store; the row is
    added.
    The staged file is gone afterwards whatever happens; a file newly stored is deleted again
    if the caller's transaction rolls back. CPU-bound (the file checks): call it from a
    worker thread.
    """
    try:
        if upload.path is None:
            raise InvalidInput("Attach the model file as the form field 'file'.")
        benchmark = check_metadata(meta, settings)
        existing = _find(session, owner, upload.sha256, benchmark.name)
        if existing is not None and not _resubmittable(existing, owner):
            return SubmitResult(existing, duplicate=True, enqueue=False)
        check_caps(session, settings, owner)
        model_format = check_model_file(
            upload.path, benchmark, meta.architecture, 2 * settings.max_upload_bytes
        )
        size, sha256 = upload.size, upload.sha256
        key, created = store_file(upload, storage)
        if created:
            on_rollback(session, lambda: storage.delete(key))
        if existing is not None and existing.owner_id == owner.id:
            return _resubmit(session, existing, owner, meta, model_format)
        submission = Submission(
            owner_id=owner.id,
            benchmark=benchmark.name,
            model_format=model_format,
            file_sha256=sha256,
            file_size=size,
        )
        _apply_metadata(submission, meta)
        try:
            lifecycle.submit(session, submission, utcnow())
        except IntegrityError as exc:
            raise Conflict(
                "The same file was submitted to this benchmark at the same moment by another "
                "request; send it again to get that submission."
            ) from exc
        # The relationships are lazy="raise"; their values are known, so set them (as loaded,
        # not as changes) for the response.
        set_committed_value(submission, "owner", owner)
        set_committed_value(submission, "evaluation", None)
        return SubmitResult(submission, duplicate=False, enqueue=True)
    finally:
        discard(upload)


def _resubmittable(submission: Submission, owner: User) -> bool:
    if submission.owner_id != owner.id:
        return False
    if submission.status in (SubmissionStatus.FAILED, SubmissionStatus.CANCELLED):
        return True
    # Cancelled and at once submitted again: the resubmit wins over the pending cancel.
    return submission.cancel_requested and not submission.status.is_final


def _resubmit(
    session: Session,
    submission: Submission,
    owner: User,
    meta: SubmissionCreate,
    model_format: ModelFormat,
) -> SubmitResult:
    """Queue ``owner``'s own failed or cancelled ``submission`` again with ``meta``."""
    if not lifecycle.requeue(session, submission.id, owner.id, utcnow()):
        # Its state changed since it was read (it finished, say): answer what it is now.
        _refresh_columns(session, submission)
        return SubmitResult(submission, duplicate=True, enqueue=False)
    # The metadata changes in the same transaction as the requeue, which cleared the claim
    # token: no run of the old settings can record a result for the new ones.
    _apply_metadata(submission, meta)
    submission.model_format = model_format
    session.flush()
    _refresh_columns(session, submission)
    return SubmitResult(submission, duplicate=True, enqueue=True)


# --- Read -------------------------------------------------------------------------------------


def visible_to(submission: Submission, viewer: User | None) -> bool:
    if submission.is_public:
        return True
    return viewer is not None and (viewer.is_admin or viewer.id == submission.owner_id)


def get_submission(session: Session, submission_id: str, viewer: User | None) -> Submission:
    """The submission with its owner and evaluation loaded; ``NotFound`` also when it is
    private and ``viewer`` is neither its owner nor an admin."""
    # One query (joins), not three: this is what every status poll runs.
    submission = session.scalar(
        select(Submission)
        .options(joinedload(Submission.owner), joinedload(Submission.evaluation))
        .where(Submission.id == submission_id)
    )
    if submission is None or not visible_to(submission, viewer):
        raise NotFound(f"No submission {submission_id!r} (or it is private).")
    return submission


def list_submissions(
    session: Session,
    owner: User,
    *,
    status: SubmissionStatus | None = None,
    benchmark: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Submission], int]:
    """``owner``'s submissions, newest first, and how many match in all."""
    where = [Submission.owner_id == owner.id]
    if status is not None:
        where.append(Submission.status == status)
    if benchmark is not None:
        where.append(Submission.benchmark == benchmark)
    total = session.scalar(select(func.count()).select_from(Submission).where(*where)) or 0
    items = session.scalars(
        select(Submission)
        .options(selectinload(Submission.owner), selectinload(Submission.evaluation))
        .where(*where)
        .order_by(Submission.created_at.desc(), Submission.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(items), int(total)


def count_by_status(session: Session) -> dict[SubmissionStatus, int]:
    """How many submissions are in each status (every status present, zeros included)."""
    counts = dict.fromkeys(SubmissionStatus, 0)
    for status, count in session.execute(
        select(Submission.status, func.count()).group_by(Submission.status)
    ):
        counts[SubmissionStatus(status)] = int(count)
    return counts


# --- Cancel -----------------------------------------------------------------------------------


def cancel_submission(session: Session, submission: Submission, user: User) -> Submission:
    """Cancel ``submission`` on behalf of ``user`` (its owner or an admin).

    Queued: cancelled at once. Running: ``cancel_requested`` is set and the worker stops it
    within seconds. Already cancelled, or cancel already requested: nothing changes. Finished
    or failed: ``Conflict``. See `db.lifecycle.request_cancel`.
    """
    if submission.owner_id != user.id and not user.is_admin:
        raise Forbidden("Only the owner of a submission can cancel it.")
    outcome = lifecycle.request_cancel(session, submission.id, utcnow())
    _refresh_columns(session, submission)
    if outcome is CancelOutcome.FINAL:
        raise Conflict(
            f"The submission has already {submission.status.value}; there is nothing to cancel."
        )
    return submission


def _refresh_columns(session: Session, submission: Submission) -> None:
    # Columns only: a plain refresh would expire the loaded (lazy="raise") relationships.
    session.refresh(submission, [attr.key for attr in Submission.__mapper__.column_attrs])


# --- Rendering --------------------------------------------------------------------------------


def status_url(submission_id: str, base_url: str = "") -> str:
    return base_url + api_path(f"/submissions/{submission_id}")


def _accuracy(evaluation: Evaluation, key: str) -> float | None:
    value = (evaluation.metrics or {}).get(key)
    return value.get("accuracy") if isinstance(value, dict) else None


def evaluation_public(evaluation: Evaluation) -> EvaluationPublic:
    return EvaluationPublic(
        benchmark=evaluation.benchmark,
        metrics=Metrics(
            natural=evaluation.natural,
            random=evaluation.random,
            worst_of_k=evaluation.worst_of_k,
            grid=evaluation.grid,
            vote_natural=evaluation.vote_natural,
            grid_vote=evaluation.grid_vote,
            grid_vote_per_query=_accuracy(evaluation, "grid_vote_per_query"),
            grid_vote_transfer=_accuracy(evaluation, "grid_vote_transfer"),
            first_order=evaluation.first_order,
        ),
        details=evaluation.metrics,
        ablations=evaluation_ablations(evaluation),
        images=evaluation.images,
        landscape=evaluation.landscape,
        examples=evaluation.examples,
        forward_passes=evaluation.forward_passes,
        wall_time_s=evaluation.wall_time_s,
        device=evaluation.device,
        precision=evaluation.precision,
        seed=evaluation.seed,
        versions=evaluation.versions,
        config=evaluation.config,
        cost=evaluation.cost,
        created_at=evaluation.created_at,
    )


def submission_public(submission: Submission, base_url: str = "") -> SubmissionPublic:
    """The API view of a submission loaded with its owner and evaluation (``get_submission``,
    ``list_submissions`` and ``submit`` load both)."""
    evaluation = submission.evaluation
    return SubmissionPublic(
        id=submission.id,
        status_url=status_url(submission.id, base_url),
        owner=submission.owner.name,
        display_name=submission.display_name,
        benchmark=submission.benchmark,
        model_format=submission.model_format,
        architecture=submission.architecture,
        mean=submission.mean,
        std=submission.std,
        training_method=submission.training_method,
        extra_data=submission.extra_data,
        paper_url=submission.paper_url,
        description=submission.description,
        is_public=submission.is_public,
        is_baseline=submission.is_baseline,
        file_sha256=submission.file_sha256,
        file_size=submission.file_size,
        status=submission.status,
        phase=submission.phase,
        progress=submission.progress,
        forward_passes=submission.forward_passes,
        eta_seconds=submission.eta_seconds,
        message=submission.message,
        attempts=submission.attempts,
        cancel_requested=submission.cancel_requested,
        created_at=submission.created_at,
        started_at=submission.started_at,
        finished_at=submission.finished_at,
        heartbeat_at=submission.heartbeat_at,
        evaluation=evaluation_public(evaluation)
        if evaluation is not None and submission.status is SubmissionStatus.FINISHED
        else None,
    )


# --- Operator markers -------------------------------------------------------------------------


def mark_baseline(session: Session, submission_id: str, value: bool = True) -> Submission:
    """Mark a submission as a reference model trained by the operators (or unmark it)."""
    submission = session.get(Submission, submission_id)
    if submission is None:
        raise NotFound(f"No submission {submission_id!r}.")
    submission.is_baseline = value
    session.flush()
    return submission
