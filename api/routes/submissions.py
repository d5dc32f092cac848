"""``/api/v1/submissions``: upload a model, follow it, list yours, cancel."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import (
    CurrentUser,
    EnqueuerDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    SubmissionDep,
    base_url,
    enqueue_after_commit,
)
from api.errors import error_body, invalid_input
from api.schemas import SubmissionAccepted, SubmissionCreate, SubmissionList, SubmissionPublic
from api.services.caps import check_caps
from api.services.submissions import cancel_submission, list_submissions
from api.services.submit import submit
from api.services.uploads import FILE_FIELD, discard, receive_multipart
from db.models import Submission, SubmissionStatus

router = APIRouter(prefix="/submissions", tags=["submissions"])

Public = TypeVar("Public", bound=SubmissionPublic)

# Far past anyone's submissions, and within a 64-bit offset (beyond it the database driver
# fails with OverflowError, a 500).
MAX_OFFSET = 1_000_000_000


def _error(description: str, error: str, detail: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"example": error_body(error, detail)}},
    }


def _public(schema: type[Public], submission: Submission, request: Request) -> Public:
    """The API's view of ``submission`` (loaded with its owner and evaluation), its
    ``status_url`` absolute under the URL this request came to."""
    context = {"base_url": base_url(request)}
    return schema.model_validate(submission, from_attributes=True, context=context)


def _upload_schema() -> dict[str, Any]:
    schema = SubmissionCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    schema.pop("title", None)
    properties = {FILE_FIELD: {"type": "string", "format": "binary", "description": (
        "The model: safetensors weights (give `architecture`) or a torch.export archive "
        "(.pt2). Pickles and TorchScript are refused."
    )}}  # fmt: skip
    properties.update(schema["properties"])
    properties["mean"] = properties["std"] = {
        "type": "string",
        "description": "One value per channel, comma-separated or a JSON list; give both "
        "mean and std, or neither.",
        "example": "0.4914,0.4822,0.4465",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FILE_FIELD, *schema.get("required", [])],
                        "properties": properties,
                    }
                }
            },
        }
    }


@router.post(
    "",
    status_code=202,
    response_model=SubmissionAccepted,
    summary="Submit a model",
    openapi_extra=_upload_schema(),
    responses={
        200: {
            "description": "The same file was already submitted to this benchmark.",
            "model": SubmissionAccepted,
        },
        401: _error("No, unknown or revoked token", "unauthorized", "Unknown API token."),
        409: _error("The same file sent twice at the same moment", "conflict", "..."),
        413: _error("Over the size limit", "upload_too_large", "The upload is larger..."),
        422: _error(
            "Refused metadata or model file",
            "unsupported_model_format",
            "This is a pickled PyTorch checkpoint ...",
        ),
        429: _error("A per-user cap", "rate_limited", "You have 3 submissions queued..."),
    },
)
async def create_submission(
    request: Request,
    response: Response,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    enqueue: EnqueuerDep,
    background: BackgroundTasks,
) -> SubmissionAccepted:
    """Upload a model as multipart/form-data; it is checked, stored and queued.

    Answers 202 with the new submission and its `status_url`, or 200 with
    `"duplicate": true` and the existing submission when the same file was already
    submitted to this benchmark (your own failed or cancelled one is queued again).
    """
    # Before reading the body: a user at a cap does not get to upload 500 MB first.
    await run_in_threadpool(check_caps, session, settings, user)
    upload = await receive_multipart(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        settings.state_dir,
        settings.max_upload_bytes,
    )
    try:
        try:
            meta = SubmissionCreate.model_validate(upload.fields)
        except ValidationError as exc:
            raise invalid_input(exc.errors(), "submission metadata") from None
        result = await run_in_threadpool(submit, session, settings, user, meta, upload, storage)
    finally:
        discard(upload)
    if result.enqueue:
        background.add_task(enqueue_after_commit, enqueue, result.submission.id)
    else:
        response.status_code = 200
    accepted = _public(SubmissionAccepted, result.submission, request)
    return accepted.model_copy(update={"duplicate": result.duplicate})


@router.get("", response_model=SubmissionList, summary="Your submissions")
def list_own_submissions(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    status: SubmissionStatus | None = None,
    benchmark: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> SubmissionList:
    """Your submissions, newest first, optionally only one status or benchmark."""
    items, total = list_submissions(
        session, user, status=status, benchmark=benchmark, limit=limit, offset=offset
    )
    return SubmissionList(
        items=[_public(SubmissionPublic, s, request) for s in items],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{submission_id}", response_model=SubmissionPublic, summary="Follow a submission")
def read_submission(request: Request, submission: SubmissionDep) -> Response:
    """Status, phase, progress, forward passes, ETA, message and timestamps; the evaluation
    once finished. Private submissions are visible to their owner only (404 for others)."""
    # Serialised once, here: returned as a model, it would be dumped, validated against
    # `response_model` and serialised again, on the path every poll takes.
    public = _public(SubmissionPublic, submission, request)
    return Response(public.model_dump_json(), media_type="application/json")


@router.post(
    "/{submission_id}/cancel", response_model=SubmissionPublic, summary="Cancel a submission"
)
def cancel(
    request: Request, user: CurrentUser, session: SessionDep, submission: SubmissionDep
) -> SubmissionPublic:
    """Queued: cancelled at once. Running: `cancel_requested` is set and the worker stops it
    within seconds. Finished or failed: 409."""
    return _public(SubmissionPublic, cancel_submission(session, submission, user), request)
