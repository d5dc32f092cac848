"""What the local command line prints: the result of an evaluation as a table, the
landscape's cost before it runs, and the lists of benchmarks and architectures.

Kept apart from `evaluator.cli`'s commands so that the commands read as parse, run, print.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.table import Table

from evaluator.benchmarks import BenchmarkSpec
from evaluator.vocabulary import BenchmarkCounts, MetricKey, metric_texts

if TYPE_CHECKING:
    from evaluator.evaluate import EvalOptions

__all__ = ["architectures_table", "benchmarks_table", "landscape_cost", "results_table"]


def _metric_row(value: dict[str, Any]) -> tuple[str, str]:
    if value.get("error"):
        return "not measured", value["error"]
    acc = value["accuracy"]
    text = "-" if acc is None else f"{100 * acc:.2f}%"
    if "gap_to_grid" in value:
        text += f" ({100 * value['gap_to_grid']:+.2f} vs grid)"
    elif "grid_same_images" in value:
        text += f" (grid here {100 * value['grid_same_images']:.2f}%)"
    return text, f"{value['correct']} / {value['total']}"


def results_table(result_dict: dict[str, Any]) -> Table:
    table = Table(title=f"SpatialBench: {result_dict['benchmark']['name']}")
    table.add_column("metric")
    table.add_column("accuracy", justify="right")
    table.add_column("correct / images", justify="right")
    # Named with the numbers this run used (its benchmark's k), the grid as the headline.
    for key, text in metric_texts(BenchmarkCounts.of(result_dict["benchmark"])).items():
        value = result_dict["metrics"].get(key)
        if value is not None:
            label = f"{text.short} (headline)" if key is MetricKey.GRID else text.short
            table.add_row(label, *_metric_row(value))
    for record in result_dict.get("ablations", {}).values():
        label = f"ablation: {record['label']}"
        if "error" in record:
            table.add_row(label, "not measured", record["error"])
            continue
        acc, natural = record["accuracy"], record["natural"]
        accuracy = "-" if acc is None else f"{100 * acc:.2f}%"
        if natural is not None:
            # On the canvas the model may not even read the untransformed image.
            accuracy += f" (identity {100 * natural:.2f}%)"
        table.add_row(label, accuracy, f"{record['correct']} / {record['images']}")
    cost = result_dict["cost"]
    grid_passes = result_dict["forward_passes"].get("grid", 0)
    full = cost["full_grid_forward_passes"]
    grid_share = (
        f", grid {grid_passes:,} = {grid_passes / full:.1%} of the full grid" if full else ""
    )
    table.caption = (
        f"{cost['forward_passes']:,} forward passes{grid_share}; {cost['wall_time_s']:.1f} s on "
        f"{cost['device']}, {cost['precision']}, seed {cost['seed']}"
    )
    return table


def landscape_cost(spec: BenchmarkSpec, n_images: int, options: EvalOptions) -> str:
    """One line on what the landscape will cost: it tries every grid point on every image it
    covers, early exit or not."""
    from evaluator.evaluate import Metric

    if Metric.GRID not in options.metrics:
        return "landscape: off (no grid metric)"
    n = n_images if options.limit is None else min(options.limit, n_images)
    subset = options.landscape_subset
    if subset is None:
        subset = spec.landscape_subset
    covered = n if subset is None or not options.early_exit else min(subset, n)
    return (
        f"landscape: the full {spec.grid.size}-point grid on {covered:,} of {n:,} images, "
        f"{covered * spec.grid.size:,} forward passes (--landscape-subset N changes it)"
    )


def benchmarks_table(specs: Iterable[BenchmarkSpec]) -> Table:
    """One row per benchmark: dataset, image size, limits, grid, subsets."""
    table = Table(title="benchmarks")
    for column in (
        "name",
        "dataset",
        "images",
        "rotation",
        "translation",
        "grid",
        "vote/landscape subset",
    ):
        table.add_column(column)
    for spec in specs:
        b = spec.grid.box
        table.add_row(
            spec.name,
            f"{spec.dataset.value} {spec.split}",
            f"{spec.channels}x{spec.image_size[0]}x{spec.image_size[1]}",
            f"±{b.max_rotation:g}°",
            f"±{b.max_dx:g}/{b.max_dy:g} px",
            "x".join(map(str, spec.grid.shape)) + f" = {spec.grid.size}",
            f"{spec.vote_subset or 'all'} / {spec.landscape_subset or 'all'}",
        )
    return table


def architectures_table() -> Table:
    """One row per registry architecture: its input shape and what it is."""
    from evaluator.models import get_architecture, list_architectures

    table = Table(title="architectures")
    for column in ("name", "input", "description"):
        table.add_column(column)
    for name in list_architectures():
        spec = get_architecture(name)
        table.add_row(
            name, f"{spec.in_channels}x{spec.input_size[0]}x{spec.input_size[1]}", spec.description
        )
    return table
