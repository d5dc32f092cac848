"""Errors the API answers with, each with its HTTP status and a message a user can act on.

Every error response has the same JSON shape, ``{"error": CODE, "detail": MESSAGE}``, where
``CODE`` is a stable machine-readable name (``"weights_mismatch"``) and ``MESSAGE`` says what
was wrong and what to do. Validation errors add ``"fields"`` with one entry per bad field.

Statuses, decided once:

- 400 ``bad_request``: a malformed request (not multipart, a broken multipart body).
- 401 ``unauthorized``: no bearer token, or one that is unknown or revoked.
- 403 ``forbidden``: authenticated, but not allowed (someone else's submission's cancel).
- 404 ``not_found``: no such resource, *or one the caller may not see* (another user's private
  submission): the API does not confirm that it exists.
- 409 ``conflict``: the request clashes with the current state (cancel a finished job; the same
  file already submitted privately by someone else).
- 413 ``upload_too_large``: the upload passed ``max_upload_bytes``; nothing is kept.
- 422: the request is well formed but its content is refused. Metadata:
  ``invalid_input``, ``unknown_benchmark``, ``unknown_architecture``,
  ``incompatible_architecture``. The model file: ``unsupported_model_format`` (pickles,
  TorchScript, zips that are not torch.export archives, truncated files; the message says how
  to convert) and ``weights_mismatch`` (keys, shapes, dtypes, NaN/inf). A refused file is a
  refusal of the upload's *content*, not of the request's media type (always multipart), so
  it is 422 and never 415.
- 429 ``rate_limited``: a per-user cap; ``Retry-After`` (seconds) and the message say when.
- 503 ``database_unavailable``: the database cannot be reached; retry later. The API
  reconnects by itself once it is back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.urls import API_PREFIX
from evaluator.errors import (
    EvaluatorError,
    ModelFormatError,
    UnknownArchitectureError,
    UnknownBenchmarkError,
    WeightsMismatchError,
)

__all__ = [
    "ApiError",
    "BadRequest",
    "Conflict",
    "DatabaseUnavailable",
    "Forbidden",
    "IncompatibleArchitecture",
    "InvalidInput",
    "NotFound",
    "RateLimited",
    "Unauthorized",
    "UploadTooLarge",
    "error_body",
    "install_error_handlers",
    "invalid_input",
]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Base class: raise a subclass with a message; the handler renders it."""

    status_code = 400
    error = "bad_request"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        # More members of the JSON body, e.g. "fields" of a validation error.
        self.extra = extra or {}


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    status_code = 401
    error = "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status_code = 403
    error = "forbidden"


class NotFound(ApiError):
    status_code = 404
    error = "not_found"


class Conflict(ApiError):
    status_code = 409
    error = "conflict"


class UploadTooLarge(ApiError):
    status_code = 413
    error = "upload_too_large"


class InvalidInput(ApiError):
    status_code = 422
    error = "invalid_input"


class IncompatibleArchitecture(InvalidInput):
    error = "incompatible_architecture"


class RateLimited(ApiError):
    status_code = 429
    error = "rate_limited"

    def __init__(self, detail: str, *, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(detail, headers={"Retry-After": str(self.retry_after_s)})


class DatabaseUnavailable(ApiError):
    status_code = 503
    error = "database_unavailable"

    def __init__(self, detail: str = "The database is unavailable; retry in a minute.") -> None:
        super().__init__(detail, headers={"Retry-After": "30"})


# Evaluator errors are about the user's model or options: (status, code).
_EVALUATOR_ERRORS: dict[type[EvaluatorError], tuple[int, str]] = {
    ModelFormatError: (422, "unsupported_model_format"),
    WeightsMismatchError: (422, "weights_mismatch"),
    UnknownArchitectureError: (422, "unknown_architecture"),
    UnknownBenchmarkError: (422, "unknown_benchmark"),
}


def error_body(error: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"error": error, "detail": detail, **extra}


def _json(status: int, error: str, detail: str, headers: dict[str, str] | None = None,
          **extra: Any) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(error, detail, **extra), status_code=status, headers=headers)


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _json(exc.status_code, exc.error, exc.detail, exc.headers, **exc.extra)


async def _evaluator_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EvaluatorError)
    for cls in type(exc).__mro__:
        if cls in _EVALUATOR_ERRORS:
            status, code = _EVALUATOR_ERRORS[cls]
            return _json(status, code, str(exc))
    return _json(422, "invalid_model", str(exc))


def _is_connection_problem(exc: DBAPIError) -> bool:
    return isinstance(exc, OperationalError) or exc.connection_invalidated


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError | PoolTimeoutError)
    if isinstance(exc, DBAPIError) and not _is_connection_problem(exc):
        # A real bug (a constraint we did not expect, bad SQL): a 500, logged with its trace.
        log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json(500, "internal_error", "Internal server error; it has been logged.")
    # The message of a connection error names the host; log it, do not show it.
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return await _api_error(request, DatabaseUnavailable())


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"No such URL; the API lives under {API_PREFIX} and is described at /docs."
    return _json(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        detail,
        dict(exc.headers) if exc.headers else None,
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "request"


def invalid_input(errors: Sequence[Any], what: str = "request") -> InvalidInput:
    """An ``InvalidInput`` listing pydantic's errors, one ``{"field", "message"}`` per field."""
    fields = []
    for err in errors:
        message = str(err.get("msg", ""))
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        fields.append({"field": _field_name(tuple(err.get("loc", ()))), "message": message})
    detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return InvalidInput(f"Invalid {what}: {detail}.", extra={"fields": fields})


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return await _api_error(request, invalid_input(exc.errors()))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the trace and re-raises after sending this; the client sees JSON.
    return _json(500, "internal_error", "Internal server error; it has been logged.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(EvaluatorError, _evaluator_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _database_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
