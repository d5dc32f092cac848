"""``spatialbench train``: train a baseline and write submission-ready weights and metadata.

Writes ``--out`` (safetensors weights of the bare architecture, no normalisation inside) and,
next to it, a JSON file with the same stem (``model.safetensors`` -> ``model.json``). Its top
level holds the submission fields (``display_name``, ``benchmark``, ``architecture``,
``training_method``, ``mean``, ``std``, ``extra_data``, ``paper_url``, ``description``), so a
client can submit it as is; ``training`` records how the weights were made, including the full
command that reproduces them.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from evaluator.cli import (
    DataDirOption,
    DeviceOption,
    MeanOption,
    StdOption,
    parse_floats,
    pick_device,
)
from evaluator.errors import EvaluatorError

app = typer.Typer(no_args_is_help=True)
console = Console(stderr=True)


@app.callback()
def _group() -> None:
    """Training of baseline models (merged into the ``spatialbench`` command)."""


METHOD_CHOICES = "standard, augmentation (or augment), worst-of-k"


def _parse_method(text: str) -> str:
    from evaluator.train import trainable_method

    value = {"augment": "augmentation", "worst-of-10": "worst-of-k"}.get(text.lower(), text)
    try:
        return trainable_method(value.lower()).value
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a training method; choose {METHOD_CHOICES}", param_hint="--method"
        ) from None


def metadata_path(out: Path) -> Path:
    """Where the metadata of weights ``out`` goes: the same name with ``.json``."""
    return out.with_suffix(".json")


def _method_label(method: str, k: int) -> str:
    return f"worst-of-{k}" if method == "worst-of-k" else method


def _command(params: dict[str, Any]) -> str:
    """The full command, every option spelled out, that reproduces this run."""
    args = ["spatialbench", "train"]
    for name in (
        "benchmark", "arch", "method", "k", "epochs", "batch_size", "lr", "momentum",
        "weight_decay", "schedule", "seed", "device", "mean", "std", "data_dir", "threads",
        "name", "out",
    ):  # fmt: skip
        value = params[name]
        if value is None or (name == "k" and params["method"] != "worst-of-k"):
            continue
        args += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(args)


@app.command("train")
def train_command(
    benchmark: Annotated[str, typer.Option(help="benchmark whose train split to train on")],
    arch: Annotated[str, typer.Option(help="registry architecture, e.g. small_cnn")],
    method: Annotated[str, typer.Option(help=f"training method: {METHOD_CHOICES}")],
    out: Annotated[
        Path, typer.Option(help="weights file to write (.safetensors); metadata goes to .json")
    ],
    k: Annotated[int, typer.Option(help="worst-of-k: transformations tried per example")] = 10,
    epochs: Annotated[int, typer.Option(help="passes over the training set")] = 20,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 64,
    lr: Annotated[float, typer.Option(help="initial learning rate (SGD)")] = 0.02,
    momentum: Annotated[float, typer.Option(help="SGD momentum")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="learning-rate schedule: cosine or step")] = (
        "cosine"
    ),
    seed: Annotated[int, typer.Option(help="seeds the initial weights, order and draws")] = 0,
    device: DeviceOption = "auto",
    mean: MeanOption = None,
    std: StdOption = None,
    data_dir: DataDirOption = Path("data"),
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch [torch's]")] = None,
    name: Annotated[str | None, typer.Option(help="display name for the submission")] = None,
) -> None:
    """Train a baseline (standard, augmentation or worst-of-k) on a benchmark's train split."""
    import torch
    from safetensors.torch import save

    from evaluator import __version__
    from evaluator.benchmarks import get_benchmark
    from evaluator.data import load_dataset, resolve_benchmark
    from evaluator.models.loading import wrap_normalization
    from evaluator.models.registry import get_architecture
    from evaluator.train import Schedule, build_model, train

    params = dict(locals())
    method = _parse_method(method)
    params["method"] = method
    try:
        schedule = Schedule(schedule).value
    except ValueError:
        raise typer.BadParameter("choose cosine or step", param_hint="--schedule") from None
    mean_v, std_v = parse_floats(mean, "--mean"), parse_floats(std, "--std")
    if (mean_v is None) != (std_v is None):
        raise typer.BadParameter("give both --mean and --std, or neither")
    if out.suffix == ".json":
        raise typer.BadParameter("the weights file cannot end in .json", param_hint="--out")
    for option, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--k", k)):
        if value < 1:
            raise typer.BadParameter("must be at least 1", param_hint=option)
    run_device = pick_device(device)
    if threads is not None:
        torch.set_num_threads(threads)

    try:
        spec = get_benchmark(benchmark)
        arch_spec = get_architecture(arch)
        train_spec = replace(spec, split="train")
        dataset = load_dataset(train_spec, data_dir)
        train_spec = resolve_benchmark(train_spec, dataset)
        if arch_spec.in_channels != train_spec.channels:
            raise EvaluatorError(
                f"architecture {arch!r} takes {arch_spec.in_channels}-channel images, benchmark "
                f"{benchmark!r} has {train_spec.channels}"
            )
        with console.status(f"loading the {benchmark} train split"):
            images, labels = dataset.load(torch.arange(len(dataset)))
        net = build_model(arch, train_spec.num_classes, seed)
        model = wrap_normalization(net, mean_v, std_v)
    except EvaluatorError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc

    label = _method_label(method, k)
    console.print(
        f"training {arch} on {benchmark} (train split, {len(labels)} images) with {label}, "
        f"{epochs} epochs on {run_device}"
    )
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("epoch 1", total=None, stats="")

        def on_step(epoch: int, step: int, total: int, loss: float, acc: float) -> None:
            bar.update(
                task,
                total=total,
                completed=step,
                description=f"epoch {epoch}/{epochs}",
                stats=f"loss {loss:.3f} acc {100 * acc:.1f}%",
            )

        result = train(
            model,
            images,
            labels,
            method=method,
            box=train_spec.box,
            k=k,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            schedule=schedule,
            seed=seed,
            device=run_device,
            fill=train_spec.fill,
            progress=on_step,
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    # Serialised in memory and written as a plain file, so it gets the usual permissions
    # (the worker may read it as another user) and its hash without reading it back.
    blob = save(state)
    out.write_bytes(blob)
    sha256 = hashlib.sha256(blob).hexdigest()
    command = _command(params)
    display_name = name or f"{arch} {label} ({benchmark} baseline)"
    box = train_spec.box
    metadata = {
        "display_name": display_name,
        "benchmark": benchmark,
        "architecture": arch,
        "training_method": method,
        "mean": mean_v,
        "std": std_v,
        "extra_data": False,
        "paper_url": None,
        "description": (
            f"{arch} trained from scratch on the {benchmark} train split with {label} "
            f"({epochs} epochs, seed {seed}), with: {command}"
        ),
        "training": {
            "method": method,
            "k": k if method == "worst-of-k" else None,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "schedule": schedule,
            "seed": seed,
            "device": run_device,
            "threads": torch.get_num_threads(),
            "split": train_spec.split,
            "train_images": len(labels),
            "num_classes": train_spec.num_classes,
            "box": {
                "max_rotation": box.max_rotation,
                "max_dx": box.max_dx,
                "max_dy": box.max_dy,
            },
            "fill": train_spec.fill.value,
            "command": command,
            "final_train_loss": result.train_loss,
            "final_train_accuracy": result.train_accuracy,
            "natural_train_accuracy": result.natural_accuracy,
            "train_seconds": round(result.seconds, 2),
            "torch_version": torch.__version__,
            "spatialbench_version": __version__,
            "weights_sha256": sha256,
        },
    }
    meta_path = metadata_path(out)
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n")
    console.print(
        f"final epoch: loss {result.train_loss:.3f}, accuracy {100 * result.train_accuracy:.1f}% "
        f"on the {'images' if method == 'standard' else 'transformed images'} trained on; "
        f"{100 * result.natural_accuracy:.1f}% on the untransformed train split; "
        f"{result.seconds:.1f} s"
    )
    console.print(f"wrote {out} and {meta_path}")
