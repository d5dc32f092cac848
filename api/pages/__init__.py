"""The public pages: server-rendered HTML (Jinja2, autoescaped) over the same service functions
as the JSON API.

- ``/``: the benchmarks with their top entries, the threat model and the metrics explained.
- ``/leaderboard/{benchmark}``: the ranked table; sort, filters, search and page are query
  parameters (links and the back button work without JavaScript), with links to the JSON and
  CSV of exactly the rows shown.
- ``/submissions/{id}``: live progress while queued or running (a small script polls the JSON
  API; without JavaScript the page refreshes itself), then the metrics, the plots, example
  images and the reproducibility record; the message of a failed run.
- ``/submissions/{id}/{landscape,rotation,fool-histogram}.svg``: the plots (`api.plots`),
  cached per evaluation; ``/submissions/{id}/examples/NN_{original,transformed}.png``: the
  example images the worker stored.

The pages are anonymous: a private submission is a 404 here for everyone (its owner follows
it through the API with a token), and the leaderboard shows only public, finished runs. Every
page and asset comes from this server, so it works offline.
"""

from __future__ import annotations

import inspect

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import plots
from api.pages import leaderboard, submission
from api.pages.leaderboard import BoardQuery
from api.pages.rendering import STATIC_DIR, PageNotFound, not_found_page, unavailable_page

__all__ = ["ROUTERS", "BoardQuery", "PageNotFound", "install_pages"]

# In the order their routes are matched: the home and leaderboard pages, then a submission's.
ROUTERS: tuple[APIRouter, ...] = (leaderboard.router, submission.router)


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get(
        "accept", ""
    )


def install_pages(app: FastAPI) -> None:
    """Add the pages, their static files and the HTML 404 and 503 pages to ``app`` (after the
    API's error handlers are installed: a browser asking for an unknown page outside ``/api``
    gets the HTML 404 page, a page whose database is down the HTML 503 page, everything else
    keeps the API's JSON errors)."""
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.plot_cache = plots.PlotCache()

    async def page_not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageNotFound)
        return not_found_page(request, exc.message)

    json_http_error = app.exception_handlers.get(StarletteHTTPException)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404 and _wants_html(request):
            return not_found_page(request, "There is no page at this address.")
        if json_http_error is None:
            raise exc
        response = json_http_error(request, exc)
        return await response if inspect.isawaitable(response) else response

    app.add_exception_handler(PageNotFound, page_not_found)
    app.add_exception_handler(StarletteHTTPException, http_error)

    # A page whose database is down answers an HTML 503 (the API keeps its JSON one).
    json_database_error = app.exception_handlers[DBAPIError]
    page_endpoints = {
        route.endpoint  # type: ignore[attr-defined]
        for router in ROUTERS
        for route in router.routes
    }

    async def database_error(request: Request, exc: Exception) -> Response:
        answer = json_database_error(request, exc)
        response = await answer if inspect.isawaitable(answer) else answer
        if response.status_code == 503 and request.scope.get("endpoint") in page_endpoints:
            return unavailable_page(request)
        return response

    app.add_exception_handler(DBAPIError, database_error)
    app.add_exception_handler(PoolTimeoutError, database_error)
