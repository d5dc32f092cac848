"""Accepting an upload as a submission: check the metadata against the benchmark, answer a
duplicate with the existing submission, queue the owner's own failed or cancelled one again,
check the caps and the file, store it, add the row.

These functions flush and never commit: the caller owns the transaction (the API's request
session), and enqueues an evaluation only after it has committed.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from api.errors import Conflict, InvalidInput
from api.schemas import SubmissionCreate
from api.services.benchmarks import get_benchmark
from api.services.caps import check_caps
from api.services.submissions import refresh_columns
from api.services.uploads import (
    StagedUpload,
    check_architecture_fits,
    check_model_file,
    discard,
    store_file,
)
from config.settings import Settings
from db import lifecycle
from db.models import Submission, SubmissionStatus, User, utcnow
from db.session import on_rollback
from evaluator.benchmarks import BenchmarkSpec
from evaluator.models.registry import get_architecture
from evaluator.vocabulary import ModelFormat
from storage import Storage

__all__ = ["SubmitResult", "check_metadata", "submit"]


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
        refresh_columns(session, submission)
        return SubmitResult(submission, duplicate=True, enqueue=False)
    # The metadata changes in the same transaction as the requeue, which cleared the claim
    # token: no run of the old settings can record a result for the new ones.
    _apply_metadata(submission, meta)
    submission.model_format = model_format
    session.flush()
    refresh_columns(session, submission)
    return SubmitResult(submission, duplicate=True, enqueue=True)
