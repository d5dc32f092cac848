"""``/api/v1/leaderboard/{benchmark}``: JSON, or CSV with ``?format=csv``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from api.deps import SessionDep, SettingsDep
from api.errors import NotFound
from api.schemas import LeaderboardPage, SortKey, SortOrder
from api.services.benchmarks import get_benchmark
from api.services.leaderboard import MAX_PER_PAGE, leaderboard_document
from evaluator.errors import UnknownBenchmarkError
from evaluator.vocabulary import TrainingMethod

router = APIRouter(tags=["leaderboard"])

# Far past any real board, and small enough that (page - 1) * per_page fits a 64-bit offset:
# a bigger number would reach the database driver and fail there (OverflowError, a 500).
MAX_PAGE = 1_000_000


@router.get(
    "/leaderboard/{benchmark}",
    response_model=LeaderboardPage,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
def read_leaderboard(
    request: Request,
    benchmark: str,
    session: SessionDep,
    settings: SettingsDep,
    sort: SortKey = SortKey.GRID,
    order: SortOrder | None = None,
    training_method: TrainingMethod | None = None,
    architecture: str | None = None,
    search: Annotated[str | None, Query(max_length=200)] = None,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    per_page: Annotated[int | None, Query(ge=1, le=MAX_PER_PAGE)] = None,
    format: Literal["json", "csv"] = "json",
) -> Response:
    """Public, finished submissions ranked by `sort` (default: grid accuracy, best first).

    JSON pages hold 50 rows unless `per_page` says otherwise; CSV holds every row unless
    `per_page` is given.
    """
    try:
        spec = get_benchmark(benchmark, settings)
    except UnknownBenchmarkError as exc:
        raise NotFound(str(exc)) from None
    if per_page is None and format == "json":
        per_page = 50
    body, etag = leaderboard_document(
        session,
        request.app.state.board_cache,
        spec.name,
        csv=format == "csv",
        sort=sort,
        order=order,
        training_method=training_method,
        architecture=architecture,
        search=search,
        page=page,
        per_page=per_page,
    )
    # Pollers that send the ETag back get a 304 while the board is unchanged.
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    if format == "csv":
        headers["Content-Disposition"] = f'attachment; filename="{spec.name}-leaderboard.csv"'
        return Response(body, media_type="text/csv; charset=utf-8", headers=headers)
    return Response(body, media_type="application/json", headers=headers)
