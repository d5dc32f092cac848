"""The local command line: evaluate a model on your own machine, list what is available.

This is the one place in `evaluator` that prints and writes files; it is run by a model's own
author, so it may open ``.pt2`` archives directly (the service does that only in a sandbox). The
commands parse, run and print; what they print is built in `evaluator.cli_tables`.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from evaluator.benchmarks import (
    BenchmarkSpec,
    DatasetKind,
    benchmark_from_mapping,
    get_benchmark,
    list_benchmarks,
    load_benchmark_file,
)
from evaluator.cli_tables import (
    architectures_table,
    benchmarks_table,
    landscape_cost,
    results_table,
)
from evaluator.errors import EvaluatorError

E = TypeVar("E", bound=StrEnum)

app = typer.Typer(no_args_is_help=True)
data_app = typer.Typer(help="Datasets: where they go, and fetching them.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=True)


# The library reads no environment variable: the command reads this one and passes the
# directory down (evaluator.data's help text names it, and the service's settings read it too).
DATA_DIR_ENV = "SPATIALBENCH_DATA_DIR"

# Options that evaluate and train share, declared once.
DataDirOption = Annotated[Path, typer.Option(envvar=DATA_DIR_ENV, help="datasets directory")]
MeanOption = Annotated[
    str | None, typer.Option(help="per-channel mean, applied after the transform")
]
StdOption = Annotated[str | None, typer.Option(help="per-channel std, applied after the transform")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda or auto")]


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA was asked for but no GPU is visible", param_hint="--device")
    return name


def parse_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(
            f"give numbers separated by commas, got {text!r}", param_hint=option
        ) from None


def resolve_benchmark_option(
    name: str,
    benchmarks_file: Path | None,
    folder: Path | None,
    image_size: int | None,
    max_rotation: float | None,
    max_translation: float | None,
    grid: str | None,
) -> BenchmarkSpec:
    """The benchmark from its name, an operator's TOML file, or imagefolder options."""
    extra = load_benchmark_file(benchmarks_file) if benchmarks_file else {}
    table: dict[str, object] = {}
    if folder is not None:
        table["path"] = str(folder.resolve())
    if image_size is not None:
        table["image_size"] = image_size
    if max_rotation is not None:
        table["max_rotation"] = max_rotation
    if max_translation is not None:
        table["max_translation"] = max_translation
    if grid is not None:
        try:
            table["grid"] = [int(v) for v in grid.lower().replace("x", ",").split(",")]
        except ValueError:
            raise typer.BadParameter(
                "give the grid as THETAxDXxDY, e.g. 31x5x5", param_hint="--grid"
            ) from None
    if name == DatasetKind.IMAGEFOLDER.value and name not in extra:
        if folder is None:
            raise typer.BadParameter("imagefolder needs --folder DIR (one sub-folder per class)")
        return benchmark_from_mapping(name, {"dataset": "imagefolder", **table})
    spec = get_benchmark(name, extra)
    if table:
        spec = benchmark_from_mapping(name, {**_as_table(spec), **table})
    return spec


def _as_table(spec: BenchmarkSpec) -> dict[str, object]:
    b = spec.grid.box
    table: dict[str, object] = {
        "dataset": spec.dataset.value,
        "split": spec.split,
        "num_classes": spec.num_classes,
        "channels": spec.channels,
        "image_size": list(spec.image_size),
        "max_rotation": b.max_rotation,
        "max_translation": [b.max_dx, b.max_dy],
        "grid": list(spec.grid.shape),
        "fill": spec.fill.value,
        "seed": spec.seed,
        "worst_of_k": spec.worst_of_k,
        "vote_samples": spec.vote_samples,
        "title": spec.title,
        "description": spec.description,
    }
    for key in ("vote_subset", "landscape_subset", "resize", "path", "first_order_subset",
                "ablation_subset"):  # fmt: skip
        if getattr(spec, key) is not None:
            table[key] = getattr(spec, key)
    table["vote_protocols"] = [p.value for p in spec.vote_protocols]
    table["first_order"] = spec.first_order
    table["ablations"] = [a.value for a in spec.ablations]
    return table


def parse_names(text: str | None, kind: type[E], option: str) -> frozenset[E] | None:
    """Comma-separated names of a closed vocabulary; "none" for the empty set."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return frozenset()
    try:
        return frozenset(kind(n) for n in names)
    except ValueError:
        known = ", ".join(e.value for e in kind)
        raise typer.BadParameter(f"give some of {known}, or none", param_hint=option) from None


@app.command()
def evaluate(
    benchmark: Annotated[
        str,
        typer.Option(
            help="cifar10, imagenet, mnist, digits, imagefolder, or one from --benchmarks-file"
        ),
    ],
    weights: Annotated[Path | None, typer.Option(help="safetensors weights for --arch")] = None,
    arch: Annotated[str | None, typer.Option(help="registry architecture of --weights")] = None,
    model: Annotated[Path | None, typer.Option(help="a torch.export archive (.pt2)")] = None,
    allow_pickled_weights: Annotated[
        bool,
        typer.Option(
            help="your own .pt2 only: read weights torch.export.save stored with pickle "
            "(tensor subclasses), through torch's weights_only unpickler; the service refuses them"
        ),
    ] = False,
    data_dir: DataDirOption = Path("data"),
    benchmarks_file: Annotated[
        Path | None, typer.Option(help="TOML file with [benchmarks.NAME] tables")
    ] = None,
    folder: Annotated[
        Path | None, typer.Option(help="imagefolder: class-per-folder directory")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="imagefolder: image side in pixels")
    ] = None,
    max_rotation: Annotated[float | None, typer.Option(help="rotation limit, degrees")] = None,
    max_translation: Annotated[float | None, typer.Option(help="translation limit, pixels")] = None,
    grid: Annotated[str | None, typer.Option(help="grid counts THETAxDXxDY, e.g. 31x5x5")] = None,
    mean: MeanOption = None,
    std: StdOption = None,
    limit: Annotated[
        int | None, typer.Option(help="evaluate the first N images of the fixed order")
    ] = None,
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(help="forward-pass batch size")] = 512,
    seed: Annotated[int | None, typer.Option(help="seed of the random draws [benchmark's]")] = None,
    metrics: Annotated[
        str, typer.Option(help="comma-separated: natural,random,worst-of-k,grid,vote")
    ] = "natural,random,worst-of-k,grid,vote",
    early_exit: Annotated[
        bool, typer.Option(help="stop attacking an image once it is fooled")
    ] = True,
    vote_subset: Annotated[
        int | None, typer.Option(help="images for the vote metrics [benchmark's]")
    ] = None,
    landscape_subset: Annotated[
        int | None, typer.Option(help="images for the full landscape [benchmark's]")
    ] = None,
    vote_protocols: Annotated[
        str | None,
        typer.Option(
            help="attackers of grid + vote: adaptive,per-query,transfer, or none [benchmark's]"
        ),
    ] = None,
    first_order: Annotated[
        bool | None,
        typer.Option(help="run the first-order (gradient) attack [benchmark's]"),
    ] = None,
    first_order_subset: Annotated[
        int | None, typer.Option(help="images for the first-order attack [benchmark's]")
    ] = None,
    ablations: Annotated[
        str | None,
        typer.Option(
            help="rotation-only,translation-only,zero-fill,reflection,black-canvas, or none "
            "[benchmark's]"
        ),
    ] = None,
    ablation_subset: Annotated[
        int | None, typer.Option(help="images for the ablations [benchmark's]")
    ] = None,
    bf16: Annotated[
        bool, typer.Option(help="run the model in bfloat16 autocast (recorded)")
    ] = False,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="write every metric, the landscape and the cost here"),
    ] = None,
    per_image: Annotated[bool, typer.Option(help="include per-image records in the JSON")] = True,
) -> None:
    """Attack a model with the rotation-and-translation grid and report every metric."""
    from evaluator.ablations import Ablation
    from evaluator.attacks import Classifier, VoteProtocol
    from evaluator.data import load_dataset, resolve_benchmark
    from evaluator.evaluate import EvalOptions, Metric
    from evaluator.evaluate import Progress as EvalProgress
    from evaluator.evaluate import evaluate as run_evaluation
    from evaluator.models.loading import load_model

    if (weights is None) == (model is None):
        raise typer.BadParameter("give either --weights with --arch, or --model for a .pt2 archive")
    try:
        wanted = frozenset(Metric(m.strip()) for m in metrics.split(",") if m.strip())
    except ValueError:
        raise typer.BadParameter(
            f"metrics are {', '.join(m.value for m in Metric)}", param_hint="--metrics"
        ) from None
    protocols = parse_names(vote_protocols, VoteProtocol, "--vote-protocols")
    wanted_ablations = parse_names(ablations, Ablation, "--ablations")
    try:
        spec = resolve_benchmark_option(
            benchmark, benchmarks_file, folder, image_size, max_rotation, max_translation, grid
        )
        dataset = load_dataset(spec, data_dir)
        spec = resolve_benchmark(spec, dataset)
        dev = pick_device(device)
        model_path = weights if weights is not None else model
        assert model_path is not None
        net = load_model(
            model_path,
            arch=arch,
            num_classes=spec.num_classes,
            mean=parse_floats(mean, "--mean"),
            std=parse_floats(std, "--std"),
            device=dev,
            allow_pickled_weights=allow_pickled_weights,
        )
        classifier = Classifier(net, spec.num_classes, device=dev, batch_size=batch_size, bf16=bf16)
        options = EvalOptions(
            metrics=wanted,
            seed=seed,
            limit=limit,
            early_exit=early_exit,
            vote_subset=vote_subset,
            landscape_subset=landscape_subset,
            vote_protocols=protocols,
            first_order=first_order,
            first_order_subset=first_order_subset,
            ablations=wanted_ablations,
            ablation_subset=ablation_subset,
        )
        console.print(landscape_cost(spec, len(dataset), options))
        with Progress(
            TextColumn("{task.fields[phase]:<19}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[passes]:>14} passes"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task("evaluate", total=1.0, phase="loading", passes="0")

            def on_progress(p: EvalProgress) -> None:
                bar.update(
                    task, completed=p.fraction, phase=p.phase, passes=f"{p.forward_passes:,}"
                )

            result = run_evaluation(classifier, dataset, spec, options, progress=on_progress)
            bar.update(task, completed=1.0, phase="done")
    except EvaluatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    out = result.to_dict(include_per_image=per_image)
    Console().print(results_table(out))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=1))
        console.print(f"wrote {json_out}")


@app.command("benchmarks")
def benchmarks_command(
    benchmarks_file: Annotated[
        Path | None, typer.Option(help="TOML file with [benchmarks.NAME] tables")
    ] = None,
) -> None:
    """List the benchmarks: dataset, image size, limits, grid."""
    extra = load_benchmark_file(benchmarks_file) if benchmarks_file else {}
    Console().print(benchmarks_table(list_benchmarks(extra)))


@app.command("architectures")
def architectures_command() -> None:
    """List the registry architectures accepted with safetensors weights."""
    Console().print(architectures_table())


DOWNLOADS = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
    ),
}


@data_app.command("where")
def data_where(
    benchmark: str,
    data_dir: DataDirOption = Path("data"),
) -> None:
    """Say which files a benchmark reads and where they go."""
    from evaluator.data import dataset_help

    try:
        typer.echo(dataset_help(get_benchmark(benchmark), data_dir))
    except EvaluatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@data_app.command("fetch")
def data_fetch(
    benchmark: str,
    data_dir: DataDirOption = Path("data"),
    timeout: Annotated[float, typer.Option(help="seconds to wait for the server")] = 30.0,
) -> None:
    """Download a dataset where that is possible; otherwise say where to put its files."""
    import tarfile
    import urllib.request

    from evaluator.data import dataset_help

    spec = get_benchmark(benchmark)
    if spec.name not in DOWNLOADS:
        console.print(
            f"{spec.name} cannot be downloaded automatically.\n{dataset_help(spec, data_dir)}"
        )
        raise typer.Exit(1)
    url, filename = DOWNLOADS[spec.name]
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / filename
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as fh:
            while chunk := response.read(1 << 20):
                fh.write(chunk)
    except OSError as exc:
        target.unlink(missing_ok=True)
        console.print(f"could not download {url} ({exc}).\n{dataset_help(spec, data_dir)}")
        raise typer.Exit(1) from None
    with tarfile.open(target) as tar:
        tar.extractall(data_dir, filter="data")
    console.print(f"extracted into {data_dir}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
