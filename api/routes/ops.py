"""``/healthz`` and ``/metrics``, outside the versioned API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import SessionDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", responses={503: {"description": "The database is unreachable"}})
def healthz(session: SessionDep) -> dict[str, Any]:
    """200 when the API can reach its database; 503 (JSON) when it cannot."""
    session.execute(text("SELECT 1"))
    return {"status": "ok", "database": "ok"}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: request counts and latency, submissions by status."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
