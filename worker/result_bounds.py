"""Bounds on an evaluation result before the worker accepts it.

The evaluator process is trusted code, but what it sends crosses a process boundary and ends
up on the leaderboard, in the plots and in the API: `check_result` holds every value of an
``EvaluationResult.to_dict()`` to what the benchmark allows (counts within ``[0, images]``,
the landscape exactly the grid's shape, fool counts within ``[0, grid points]``, strings
capped) and recomputes each accuracy from its counts. Pure Python: the worker imports no torch.
"""

from __future__ import annotations

import math
import re
from typing import Any

from evaluator.vocabulary import VOTE_ATTACKER_KEYS

__all__ = ["MAX_GRID_POINTS", "MAX_IMAGES", "ResultRejected", "check_result"]

MAX_IMAGES = 10_000_000
MAX_GRID_POINTS = 100_000
MAX_CLASSES = 1_000_000
MAX_TEXT = 2000
MAX_SHORT_TEXT = 200
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_+. -]{0,63}$")
# Per-image fields whose values are 0/1 flags, -1 meaning "not measured".
_FLAGS = ("_correct", "_robust", "_natural")
# The evaluator's closed vocabulary of ablations (``evaluator.ablations.Ablation``; repeated
# here because the worker imports no torch) and of fill modes (``FillMode``).
ABLATIONS = ("rotation-only", "translation-only", "zero-fill", "reflection", "black-canvas")
VOTE_PROTOCOLS = tuple(VOTE_ATTACKER_KEYS)
FILL_MODES = ("zeros", "border", "reflection")
MAX_CANVAS = 8
_ABLATION_FIELD = re.compile(r"^ablation_([a-z_]+)_(robust|natural)$")


class ResultRejected(ValueError):
    """A value of the result is outside what the benchmark allows."""


def _int(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ResultRejected(f"{what} = {value!r:.80} is not an integer in [{low}, {high}]")
    return value


def _float(value: Any, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ResultRejected(f"{what} is not a number")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ResultRejected(f"{what} = {number} is outside [{low}, {high}]")
    return number


def _text(value: Any, cap: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ResultRejected(f"{value!r:.80} is not text")
    return value[:cap]


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ResultRejected(f"{what} is not an object")
    return value


def _list(value: Any, length: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) != length:
        raise ResultRejected(f"{what} is not a list of {length} values")
    return value


def _key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ResultRejected(f"{what} has an unexpected key {key!r:.80}")
    return key


def _grid(benchmark: dict[str, Any]) -> tuple[list[int], int]:
    shape = _list(benchmark.get("grid"), 3, "benchmark.grid")
    dims = [_int(n, 1, MAX_GRID_POINTS, "benchmark.grid") for n in shape]
    points = dims[0] * dims[1] * dims[2]
    _int(points, 1, MAX_GRID_POINTS, "grid points")
    if benchmark.get("grid_points") != points:
        raise ResultRejected("benchmark.grid_points does not match benchmark.grid")
    return dims, points


def _benchmark(value: Any, name: str) -> dict[str, Any]:
    benchmark = dict(_dict(value, "benchmark"))
    if benchmark.get("name") != name:
        raise ResultRejected(f"the result is for benchmark {benchmark.get('name')!r:.80}")
    _int(benchmark.get("num_classes"), 1, MAX_CLASSES, "benchmark.num_classes")
    for key, item in benchmark.items():
        _key(key, "benchmark")
        if isinstance(item, str):
            benchmark[key] = _text(item)
    return benchmark


def _metrics(value: Any, images: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, metric in _dict(value, "metrics").items():
        _key(key, "metrics")
        metric = _dict(metric, f"metrics.{key}")
        total = _int(metric.get("total"), 0, images, f"metrics.{key}.total")
        correct = _int(metric.get("correct"), 0, total, f"metrics.{key}.correct")
        if "images" in metric:
            _int(metric["images"], 0, images, f"metrics.{key}.images")
        _metric_extras(metric, f"metrics.{key}")
        # Further fields a metric records (its settings, its subset) pass as plain values;
        # the accuracy is recomputed, never taken as sent.
        extra = _plain(metric, f"metrics.{key}")
        out[key] = {**extra, "accuracy": correct / total if total else None, "correct": correct,
                    "total": total}  # fmt: skip
    return out


def _metric_extras(metric: dict[str, Any], what: str) -> None:
    """The named fields shown beside a number: the vote's attacker model from its closed
    vocabulary, the grid's accuracy on the same images and the gap to it as fractions."""
    if "protocol" in metric and metric["protocol"] not in VOTE_PROTOCOLS:
        raise ResultRejected(f"{what}.protocol = {metric['protocol']!r:.80} is not a protocol")
    if "attacker" in metric:
        metric["attacker"] = _text(metric["attacker"], MAX_SHORT_TEXT)
    if "grid_same_images" in metric:
        _float(metric["grid_same_images"], 0.0, 1.0, f"{what}.grid_same_images")
    if "gap_to_grid" in metric:
        _float(metric["gap_to_grid"], -1.0, 1.0, f"{what}.gap_to_grid")


def _plain(value: Any, what: str, depth: int = 0) -> Any:
    """A JSON value of bounded depth and size: capped strings, finite numbers."""
    if depth > 4:
        raise ResultRejected(f"{what} is nested too deeply")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _int(value, -(2**63), 2**64, what)
    if isinstance(value, float):
        return _float(value, -1e18, 1e18, what)
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, list):
        if len(value) > MAX_IMAGES:
            raise ResultRejected(f"{what} is too long")
        return [_plain(v, what, depth + 1) for v in value]
    if isinstance(value, dict):
        if len(value) > 64:
            raise ResultRejected(f"{what} has too many entries")
        return {_key(k, what): _plain(v, f"{what}.{k}", depth + 1) for k, v in value.items()}
    raise ResultRejected(f"{what} has an unexpected type")


def _landscape(value: Any, grid: list[int], points: int, images: int) -> dict[str, Any] | None:
    if value is None:
        return None
    landscape = _dict(value, "landscape")
    if landscape.get("shape") != grid:
        raise ResultRejected(f"landscape.shape {landscape.get('shape')!r:.80} is not {grid}")
    axes = {}
    for name, n in zip(("thetas", "dxs", "dys"), grid, strict=True):
        values = _list(landscape.get(name), n, f"landscape.{name}")
        axes[name] = [_float(v, -1e6, 1e6, f"landscape.{name}") for v in values]
    counted = _int(landscape.get("images"), 1, images, "landscape.images")
    correct = [
        _int(c, 0, counted, "landscape.correct")
        for c in _list(landscape.get("correct"), points, "landscape.correct")
    ]
    # The accuracy grid is derived from the counts: rebuilt, not trusted.
    flat = [c / counted for c in correct]
    n_dx, n_dy = grid[1], grid[2]
    accuracy = [
        [flat[(t * n_dx + x) * n_dy : (t * n_dx + x + 1) * n_dy] for x in range(n_dx)]
        for t in range(grid[0])
    ]
    return {"shape": grid, **axes, "images": counted, "correct": correct, "accuracy": accuracy}


def _per_image(
    value: Any, images: int, points: int, num_classes: int
) -> dict[str, list[int]] | None:
    if value is None:
        return None
    out: dict[str, list[int]] = {}
    for key, values in _dict(value, "per_image").items():
        _key(key, "per_image")
        ablation = _ABLATION_FIELD.match(key)
        if ablation and ablation.group(1).replace("_", "-") not in ABLATIONS:
            raise ResultRejected(f"per_image.{key} names no known ablation")
        column = _list(values, images, f"per_image.{key}")
        if key == "grid_fool_count":
            low, high = -1, points
        elif key == "grid_fool_point" or key == "grid_vote_transfer_point":
            low, high = -1, points - 1
        elif key in ("label", "natural_pred", "grid_fool_pred") or key.endswith("_pred"):
            low, high = -1, num_classes - 1
        elif key.endswith(_FLAGS):
            low, high = -1, 1
        else:  # positions and dataset indices
            low, high = -1, MAX_IMAGES * 10
        out[key] = [_int(v, low, high, f"per_image.{key}") for v in column]
    return out


def _ablation(name: str, value: Any, images: int) -> dict[str, Any]:
    what = f"ablations.{name}"
    record = _dict(value, what)
    shape = _list(record.get("grid"), 3, f"{what}.grid")
    grid = [_int(n, 1, MAX_GRID_POINTS, f"{what}.grid") for n in shape]
    points = _int(grid[0] * grid[1] * grid[2], 1, MAX_GRID_POINTS, f"{what}.grid points")
    if record.get("grid_points") != points:
        raise ResultRejected(f"{what}.grid_points does not match its grid")
    fill = record.get("fill")
    if fill not in FILL_MODES:
        raise ResultRejected(f"{what}.fill = {fill!r:.80} is not one of {FILL_MODES}")
    translation = _list(record.get("max_translation"), 2, f"{what}.max_translation")
    out: dict[str, Any] = {
        "label": _text(record.get("label"), MAX_SHORT_TEXT),
        "grid": grid,
        "grid_points": points,
        "max_rotation": _float(record.get("max_rotation"), 0.0, 360.0, f"{what}.max_rotation"),
        "max_translation": [_float(t, 0.0, 1e6, f"{what}.max_translation") for t in translation],
        "fill": fill,
        "canvas": _int(record.get("canvas"), 1, MAX_CANVAS, f"{what}.canvas"),
    }
    if "error" in record:
        # A variant that could not run: its reason, and no number that could be misread.
        return {**out, "error": _text(record["error"]), "images": 0, "correct": 0,
                "accuracy": None, "natural": None}  # fmt: skip
    total = _int(record.get("images"), 0, images, f"{what}.images")
    correct = _int(record.get("correct"), 0, total, f"{what}.correct")
    natural = record.get("natural")
    return {
        **out,
        "images": total,
        "correct": correct,
        # Recomputed from the counts, like every metric's.
        "accuracy": correct / total if total else None,
        "natural": None if natural is None else _float(natural, 0.0, 1.0, f"{what}.natural"),
        "forward_passes": _int(record.get("forward_passes", 0), 0, 2**53, f"{what}.passes"),
        "reused_grid": record.get("reused_grid") is True,
    }


def _ablations(value: Any, images: int) -> dict[str, dict[str, Any]]:
    out = {}
    for name, record in _dict(value, "ablations").items():
        if name not in ABLATIONS:
            raise ResultRejected(f"ablations has an unknown variant {name!r:.80}")
        out[name] = _ablation(name, record, images)
    return out


def _cost(value: Any) -> dict[str, Any]:
    cost = dict(_dict(value, "cost"))
    cost["forward_passes"] = _int(cost.get("forward_passes"), 0, 2**53, "cost.forward_passes")
    cost["wall_time_s"] = _float(cost.get("wall_time_s"), 0.0, 1e9, "cost.wall_time_s")
    cost["device"] = _text(cost.get("device"), MAX_SHORT_TEXT)
    cost["precision"] = _text(cost.get("precision"), 16)
    cost["seed"] = _int(cost.get("seed"), -(2**63), 2**64, "cost.seed")
    versions = _dict(cost.get("versions") or {}, "cost.versions")
    if len(versions) > 32:
        raise ResultRejected("cost.versions has too many entries")
    cost["versions"] = {_text(k, 64): _text(v, MAX_SHORT_TEXT) for k, v in versions.items()}
    for key, item in cost.items():
        _key(key, "cost")
        if isinstance(item, str):
            cost[key] = _text(item, MAX_SHORT_TEXT)
        elif isinstance(item, int | float) and not isinstance(item, bool):
            _float(item, -1e18, 1e18, f"cost.{key}")
        elif not isinstance(item, dict | bool) and item is not None:
            raise ResultRejected(f"cost.{key} has an unexpected type")
    return cost


def check_result(result: Any, benchmark: str) -> dict[str, Any]:
    """A checked copy of ``result`` (``EvaluationResult.to_dict()``) for ``benchmark``, with
    accuracies recomputed from their counts and strings capped; `ResultRejected` says which
    value is out of bounds."""
    result = _dict(result, "result")
    bench = _benchmark(result.get("benchmark"), benchmark)
    grid, points = _grid(bench)
    config = dict(_dict(result.get("config"), "config"))
    images = _int(config.get("images"), 0, MAX_IMAGES, "config.images")
    if config.get("grid") != grid:
        raise ResultRejected("config.grid is not the benchmark's grid")
    for key, item in config.items():
        _key(key, "config")
        if isinstance(item, str):
            config[key] = _text(item, MAX_SHORT_TEXT)
    passes = {
        _key(k, "forward_passes"): _int(v, 0, 2**53, f"forward_passes.{k}")
        for k, v in _dict(result.get("forward_passes"), "forward_passes").items()
    }
    checked: dict[str, Any] = {
        "benchmark": bench,
        "config": config,
        "metrics": _metrics(result.get("metrics"), images),
        "landscape": _landscape(result.get("landscape"), grid, points, images),
        "forward_passes": passes,
        "cost": _cost(result.get("cost")),
    }
    if result.get("ablations"):
        checked["ablations"] = _ablations(result["ablations"], images)
    if "per_image" in result:
        checked["per_image"] = _per_image(result["per_image"], images, points, bench["num_classes"])
    return checked
