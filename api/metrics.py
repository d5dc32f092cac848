"""Prometheus metrics of one app: request counts and latency, submissions by status.

Each app has its own registry (several apps live in one test process). The submissions gauge
is read from the database when scraped; while the database is down it is left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.session import Database

__all__ = ["ApiMetrics", "MetricsMiddleware"]

log = logging.getLogger(__name__)


class _SubmissionsCollector(Collector):
    def __init__(self, database: Database) -> None:
        self.database = database

    def collect(self) -> Iterator[Metric]:
        from api.services.submissions import count_by_status

        try:
            with self.database.session() as session:
                counts = count_by_status(session)
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot count submissions: %s", exc)
            return
        gauge = GaugeMetricFamily(
            "spatialbench_submissions", "Submissions by status.", labels=["status"]
        )
        for status, count in counts.items():
            gauge.add_metric([status.value], count)
        yield gauge


class ApiMetrics:
    def __init__(self, database: Database) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "spatialbench_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "spatialbench_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(_SubmissionsCollector(database))


def _route_template(scope: Scope) -> str:
    """``/api/v1/submissions/{submission_id}`` for ``/api/v1/submissions/3f2a...``.

    Rebuilt from the matched path parameters rather than read from the route object, whose
    path is relative to its router when routers are nested.
    """
    if scope.get("route") is None and scope.get("endpoint") is None:
        return "unmatched"
    params: dict[str, Any] = scope.get("path_params") or {}
    by_value = {str(value): name for name, value in params.items()}
    segments = [
        f"{{{by_value[segment]}}}" if segment in by_value else segment
        for segment in str(scope.get("path", "")).split("/")
    ]
    return "/".join(segments)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not the raw path, which
    would make one series per submission id)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = _route_template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
