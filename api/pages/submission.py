"""The submission pages: live progress while queued or running (a small script polls the JSON
API; without JavaScript the page refreshes itself), then the metrics, the plots, example images
and the reproducibility record, or the message of a failed run; the plots (`api.plots`, cached
per evaluation) and the example images the worker stored."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from api import plots
from api.deps import SessionDep, SettingsDep, StorageDep, base_url
from api.pages.rendering import (
    PageNotFound,
    board_metrics,
    find_submission,
    iso,
    render,
)
from api.services.ablations import evaluation_ablations
from api.services.benchmarks import get_benchmark
from api.urls import submission_path
from config.settings import Settings
from db.models import Evaluation, Submission, SubmissionStatus
from evaluator.benchmarks import BenchmarkSpec
from evaluator.errors import UnknownBenchmarkError
from evaluator.vocabulary import VOTE_ATTACKER_KEYS, BenchmarkCounts, metric_texts
from storage import ObjectNotFoundError, example_key
from storage.keys import EXAMPLE_NAME, example_name

__all__ = ["example_url", "router"]

# How often the progress script asks the API, and the no-JavaScript page refresh.
POLL_INTERVAL_S = 3
REFRESH_S = 10

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)

EXAMPLE_ROUTE = "/submissions/{submission_id}/examples/{name}.png"


def _finished_evaluation(submission: Submission) -> Evaluation | None:
    # As in the API: results are shown once the submission has finished.
    if submission.status is SubmissionStatus.FINISHED:
        return submission.evaluation
    return None


def example_url(submission_id: str, name: str) -> str:
    """The page's URL of the example image ``name`` (served by `example_image`)."""
    return EXAMPLE_ROUTE.format(submission_id=submission_id, name=name)


def _example_url(submission: Submission, stored: Any) -> str | None:
    """The page's URL of an example image the worker stored under `example_key`."""
    name = example_name(submission.id, stored)
    return None if name is None else example_url(submission.id, name)


def _examples(submission: Submission, evaluation: Evaluation) -> list[dict[str, Any]]:
    out = []
    for example in evaluation.examples or []:
        if not isinstance(example, dict):
            continue
        original = _example_url(submission, example.get("original"))
        transformed = _example_url(submission, example.get("transformed"))
        if original is None or transformed is None:
            continue
        given = example.get("point")
        point: dict[str, Any] = given if isinstance(given, dict) else {}

        def label(value: Any, name: Any = None) -> str:
            return name if isinstance(name, str) and name else str(value)

        true_label, pred = example.get("label"), example.get("pred")
        out.append(
            {
                "index": example.get("index"),
                "fooled": bool(example.get("fooled", True)),
                "label": label(true_label, example.get("label_name")),
                # The worker names the true and the fooled class; the natural prediction has a
                # name when it is the true class.
                "pred": label(pred, example.get("label_name") if pred == true_label else None),
                "fool_pred": label(example.get("fool_pred"), example.get("fool_pred_name")),
                "theta": float(point.get("theta", 0.0)),
                "dx": float(point.get("dx", 0.0)),
                "dy": float(point.get("dy", 0.0)),
                "original": original,
                "transformed": transformed,
            }
        )  # fmt: skip
    return out


def _counts(evaluation: Evaluation, spec: BenchmarkSpec | None) -> BenchmarkCounts | None:
    """The numbers the metrics' texts state, as this evaluation ran them (its config, or the
    benchmark record stored with it), else the benchmark's as it is now."""
    config = evaluation.config if isinstance(evaluation.config, dict) else {}
    recorded = BenchmarkCounts.of(config) or BenchmarkCounts.of(config.get("benchmark"))
    return recorded or (spec.counts if spec is not None else None)


def _metric_rows(evaluation: Evaluation, counts: BenchmarkCounts | None) -> list[dict[str, Any]]:
    details = evaluation.metrics or {}
    rows = []
    for info in board_metrics(counts):
        detail = details.get(info.key.value) if isinstance(details, dict) else None
        detail = detail if isinstance(detail, dict) else {}
        rows.append(
            {
                "info": info,
                "value": getattr(evaluation, info.key.value),
                "correct": detail.get("correct"),
                "total": detail.get("total"),
                # Why there is no number (first-order on a model without gradients).
                "error": detail.get("error"),
                "gap": _fraction(detail.get("gap_to_grid")),
                "protocol": detail.get("protocol"),
            }
        )
    return rows


def _fraction(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _vote_rows(evaluation: Evaluation, counts: BenchmarkCounts | None) -> list[dict[str, Any]]:
    """Grid + vote under each attacker model the result has, with the images behind it and
    the grid's accuracy on those same images. The sentence on what the attacker may do is the
    result's own, or the vocabulary's when an older result has none."""
    details = evaluation.metrics if isinstance(evaluation.metrics, dict) else {}
    texts = metric_texts(counts)
    rows = []
    for name, key in VOTE_ATTACKER_KEYS.items():
        attacker = texts[key].description
        detail = details.get(key)
        # A result from before the attacker models were named has a grid_vote without a
        # protocol (it was per-query): it is not shown as any of them.
        if not isinstance(detail, dict) or "protocol" not in detail:
            continue
        rows.append(
            {
                "protocol": str(detail.get("protocol") or name),
                "attacker": str(detail.get("attacker") or attacker),
                "accuracy": _fraction(detail.get("accuracy")),
                "correct": detail.get("correct"),
                "images": detail.get("images", detail.get("total")),
                "grid_same_images": _fraction(detail.get("grid_same_images")),
            }
        )
    return rows


def _ablation_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    rows = []
    for name, record in evaluation_ablations(evaluation).items():
        if not isinstance(record, dict):
            continue
        grid = record.get("grid")
        grid = grid if isinstance(grid, list) else []
        rows.append(
            {
                "name": str(name),
                "label": str(record.get("label") or name),
                "grid": " × ".join(str(n) for n in grid),
                "grid_points": record.get("grid_points"),
                "fill": str(record.get("fill") or "—"),
                "canvas": record.get("canvas") or 1,
                "images": record.get("images"),
                "accuracy": _fraction(record.get("accuracy")),
                "natural": _fraction(record.get("natural")),
                "error": record.get("error"),
            }
        )
    return rows


def _sharding(config: dict[str, Any]) -> dict[str, Any] | None:
    """How a sharded evaluation was split (``config["sharding"]``, written by the worker that
    merged it): shards, images per shard, workers and their names; None for an evaluation run
    in one piece, or a record this page cannot read."""
    record = config.get("sharding")
    if not isinstance(record, dict):
        return None
    shards, workers = record.get("shards"), record.get("workers")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (shards, workers)):
        return None
    names = record.get("worker_names")
    per_shard = record.get("shard_images")
    return {
        "shards": shards,
        "workers": workers,
        "shard_images": per_shard if isinstance(per_shard, int) and per_shard > 0 else None,
        "worker_names": [str(n) for n in names] if isinstance(names, list) else [],
    }


def _has_landscape(evaluation: Evaluation) -> bool:
    try:
        plots._landscape_array(evaluation.landscape)
    except plots.PlotUnavailable:
        return False
    return True


def _has_fool_counts(evaluation: Evaluation) -> bool:
    try:
        plots.fool_counts(evaluation.per_image)
    except plots.PlotUnavailable:
        return False
    return True


def _benchmark(name: str, settings: Settings) -> BenchmarkSpec | None:
    try:
        return get_benchmark(name, settings)
    except UnknownBenchmarkError:  # a benchmark the operator has since removed
        return None


@router.get("/submissions/{submission_id}", response_class=HTMLResponse)
def submission_page(
    request: Request, submission_id: str, session: SessionDep, settings: SettingsDep
) -> HTMLResponse:
    submission = find_submission(session, submission_id)
    spec = _benchmark(submission.benchmark, settings)
    evaluation = _finished_evaluation(submission)
    active = submission.status in (SubmissionStatus.QUEUED, SubmissionStatus.RUNNING)
    context: dict[str, Any] = {
        "current": submission.benchmark,
        "s": submission,
        "spec": spec,
        "active": active,
        "evaluation": evaluation,
        "poll_url": submission_path(submission.id),
        "poll_interval_ms": POLL_INTERVAL_S * 1000,
        "refresh_s": REFRESH_S,
        "curl": f"curl -s {base_url(request)}{submission_path(submission.id)}",
    }
    if evaluation is None:
        return render(request, "submission.html", context)
    try:
        result = _result_context(submission, evaluation, spec, context)
        return render(request, "submission.html", result)
    except _MALFORMED as exc:
        # A stored result this page cannot show: say so rather than answer 500.
        log.warning("the stored result of %s cannot be shown: %r", submission.id, exc)
        context.update(evaluation=None, result_error=RESULT_ERROR)
        return render(request, "submission.html", context)


# What a malformed stored result raises while the page is built or rendered.
_MALFORMED = (TypeError, ValueError, AttributeError, KeyError, OverflowError, jinja2.TemplateError)
RESULT_ERROR = (
    "This submission's stored result is malformed and cannot be shown. The operator has been "
    "told; evaluating the model again will replace it."
)


def _result_context(
    submission: Submission,
    evaluation: Evaluation,
    spec: BenchmarkSpec | None,
    context: dict[str, Any],
) -> dict[str, Any]:
    context = dict(context)
    config = evaluation.config or {}
    cost = evaluation.cost or {}
    counts = _counts(evaluation, spec)
    context.update(
        metrics=_metric_rows(evaluation, counts),
        votes=_vote_rows(evaluation, counts),
        sharding=_sharding(config),
        ablations=_ablation_rows(evaluation),
        has_landscape=_has_landscape(evaluation),
        has_histogram=_has_fool_counts(evaluation),
        examples=_examples(submission, evaluation),
        config=config,
        cost=cost,
        landscape_images=(evaluation.landscape or {}).get("images"),
        grid_shape=(evaluation.landscape or {}).get("shape") or config.get("grid") or [],
        by_phase={
            k: v for k, v in (cost.get("forward_passes_by_phase") or {}).items() if k != "total"
        },
    )
    return context


def _plot(
    request: Request, session: SessionDep, submission_id: str, kind: str, draw: Any
) -> Response:
    submission = find_submission(session, submission_id)
    evaluation = _finished_evaluation(submission)
    if evaluation is None:
        raise PageNotFound("This submission has no results yet.")
    # The submission id is a UUID, unique across databases; the evaluation's id and time tell
    # a re-evaluation apart.
    key = (kind, submission.id, evaluation.id, iso(evaluation.created_at))
    etag = '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:24] + '"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=3600"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    cache: plots.PlotCache = request.app.state.plot_cache
    try:
        svg = cache.get(key, lambda: draw(evaluation))
    except plots.PlotUnavailable as exc:
        raise PageNotFound(f"This plot is not available: {exc}.") from None
    except _MALFORMED:
        raise PageNotFound("This plot is not available: the stored result is malformed.") from None
    return Response(svg, media_type="image/svg+xml", headers=headers)


@router.get("/submissions/{submission_id}/landscape.svg")
def landscape_plot(request: Request, submission_id: str, session: SessionDep) -> Response:
    return _plot(request, session, submission_id, "landscape",
                 lambda ev: plots.landscape_svg(ev.landscape))  # fmt: skip


@router.get("/submissions/{submission_id}/rotation.svg")
def rotation_plot(request: Request, submission_id: str, session: SessionDep) -> Response:
    return _plot(request, session, submission_id, "rotation",
                 lambda ev: plots.rotation_svg(ev.landscape))  # fmt: skip


@router.get("/submissions/{submission_id}/fool-histogram.svg")
def fool_histogram_plot(
    request: Request, submission_id: str, session: SessionDep, settings: SettingsDep
) -> Response:
    def draw(ev: Evaluation) -> bytes:
        # The grid this evaluation searched, as it recorded it; the benchmark's own only for
        # a record without one.
        shape = (ev.landscape or {}).get("shape") or (ev.config or {}).get("grid")
        if not shape:
            spec = _benchmark(ev.benchmark, settings)
            if spec is None:
                raise plots.PlotUnavailable("the evaluation does not record its grid")
            shape = list(spec.grid.shape)
        return plots.fool_histogram_svg(ev.per_image, math.prod(int(n) for n in shape))

    return _plot(request, session, submission_id, "fool-histogram", draw)


@router.get(EXAMPLE_ROUTE)
def example_image(
    submission_id: str, name: str, session: SessionDep, storage: StorageDep
) -> Response:
    """An example image, only by a name this evaluation lists (nothing else in storage is
    reachable: the name is checked against a strict pattern and against the record),
    streamed from the storage the worker put it in."""
    if not EXAMPLE_NAME.fullmatch(name):
        raise PageNotFound("There is no such example image.")
    submission = find_submission(session, submission_id)
    evaluation = _finished_evaluation(submission)
    key = example_key(submission.id, name)
    listed = evaluation is not None and any(
        isinstance(e, dict) and key in (e.get("original"), e.get("transformed"))
        for e in evaluation.examples or []
    )
    if not listed:
        raise PageNotFound("There is no such example image.")
    try:
        chunks = storage.stream(key)
    except ObjectNotFoundError:
        raise PageNotFound("There is no such example image.") from None
    return StreamingResponse(
        chunks, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"}
    )
