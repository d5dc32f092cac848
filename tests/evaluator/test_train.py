"""Training baselines: the worst-of-k search, the three methods, determinism, the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from typer.testing import CliRunner

from evaluator.models import load_model, load_safetensors_model
from evaluator.train import (
    TRAINABLE_METHODS,
    Schedule,
    TrainingMethod,
    augment_batch,
    build_model,
    train,
    train_step,
    uniform_draws,
    worst_of_k_batch,
)
from evaluator.train_cli import app, metadata_path
from evaluator.transforms import TransformBox, spatial_transform

BOX = TransformBox(30.0, 3.0, 3.0)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: threads cost more than they give on a small shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bn_net(seed: int = 0, classes: int = 4) -> nn.Sequential:
    """A small CNN with batch norm for 3x16x16 inputs; its decisions move with the image."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, classes),
    )


def tiny_data(n: int = 16, size: int = 16, classes: int = 4, seed: int = 1) -> tuple[Tensor, ...]:
    """Images of a bright square whose position gives the class, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(n, 3, size, size, generator=g)
    labels = torch.arange(n) % classes
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        images[i, :, r * half + 2 : r * half + half - 2, c * half + 2 : c * half + half - 2] = 1.0
    return images, labels


# --- the worst-of-k search ----------------------------------------------------------------------


def test_uniform_draws_stay_in_the_box_and_follow_the_generator() -> None:
    draws = uniform_draws(BOX, 50, 10, torch.Generator().manual_seed(3))
    assert draws.shape == (50, 10, 3)
    assert draws.dtype == torch.float32
    assert (draws.abs() <= torch.tensor([30.0, 3.0, 3.0])).all()
    again = uniform_draws(BOX, 50, 10, torch.Generator().manual_seed(3))
    assert torch.equal(draws, again)


def test_worst_of_k_returns_the_highest_loss_candidate(device: torch.device) -> None:
    model = tiny_bn_net().to(device).eval()
    images, labels = (t.to(device) for t in tiny_data())
    k = 8
    chosen = worst_of_k_batch(model, images, labels, BOX, k, torch.Generator().manual_seed(5))

    # The same draws, each candidate's loss computed on its own.
    params = uniform_draws(BOX, len(labels), k, torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        losses = torch.stack(
            [
                F.cross_entropy(
                    model(spatial_transform(images, params[:, j])), labels, reduction="none"
                )
                for j in range(k)
            ],
            dim=1,
        )
    worst = losses.argmax(dim=1)
    assert len(set(worst.tolist())) > 1, "the test needs images whose worst draw differs"
    expected = spatial_transform(images, params[torch.arange(len(labels)), worst])
    assert torch.equal(chosen, expected)
    for i in range(len(labels)):
        with torch.no_grad():
            loss_of_chosen = F.cross_entropy(model(chosen[i : i + 1]), labels[i : i + 1])
        assert torch.isclose(loss_of_chosen, losses[i].max(), rtol=1e-4, atol=1e-5)


def test_worst_of_k_searches_in_eval_mode_and_restores_modes() -> None:
    model = tiny_bn_net().train()
    model[3].eval()  # a submodule in its own mode keeps it
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
    assert bn.running_var is not None
    # Make the running statistics differ from a fresh batch's, so a train-mode search shows.
    bn.running_mean.fill_(0.3)
    bn.running_var.fill_(2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen_modes: list[bool] = []
    hook = bn.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    images, labels = tiny_data()
    worst_of_k_batch(model, images, labels, BOX, 4, torch.Generator().manual_seed(0))
    hook.remove()
    assert seen_modes and not any(seen_modes)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert model.training and bn.training
    assert not model[3].training


def test_worst_of_1_is_one_uniform_draw_like_augmentation() -> None:
    model = tiny_bn_net().eval()
    images, labels = tiny_data()
    wok = worst_of_k_batch(model, images, labels, BOX, 1, torch.Generator().manual_seed(2))
    aug = augment_batch(images, BOX, torch.Generator().manual_seed(2))
    assert torch.equal(wok, aug)
    assert not torch.equal(aug, images)


def test_worst_of_k_rejects_k_below_one() -> None:
    images, labels = tiny_data(n=2)
    with pytest.raises(ValueError, match="k must be"):
        worst_of_k_batch(tiny_bn_net(), images, labels, BOX, 0, torch.Generator())


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", TRAINABLE_METHODS)
def test_train_step_decreases_the_loss(method: TrainingMethod, device: torch.device) -> None:
    model = tiny_bn_net().to(device)
    images, labels = (t.to(device) for t in tiny_data())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        loss, correct = train_step(
            model,
            optimizer,
            images,
            labels,
            method=method,
            box=BOX,
            generator=generator,
            k=4,
        )
        assert 0 <= correct <= len(labels)
        losses.append(loss)
    assert model.training
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


@pytest.mark.parametrize("method", TRAINABLE_METHODS)
def test_train_reports_progress_and_leaves_eval_mode(method: TrainingMethod) -> None:
    images, labels = tiny_data(n=20)
    calls: list[tuple[int, int, int, float, float]] = []
    model = tiny_bn_net()
    result = train(
        model,
        images,
        labels,
        method=method,
        box=BOX,
        k=3,
        epochs=2,
        batch_size=8,
        lr=0.05,
        seed=0,
        progress=lambda *args: calls.append(args),
    )
    # 20 images in batches of 8: 8, 8, 4 per epoch.
    assert result.steps == 6 and len(calls) == 6
    assert [c[:3] for c in calls] == [(1, 1, 6), (1, 2, 6), (1, 3, 6)] + [
        (2, 4, 6),
        (2, 5, 6),
        (2, 6, 6),
    ]
    assert [e.epoch for e in result.history] == [1, 2]
    assert result.train_accuracy == pytest.approx(calls[-1][4])
    assert 0.0 <= result.natural_accuracy <= 1.0
    assert result.method is method
    assert not model.training


def test_a_last_batch_of_one_is_dropped() -> None:
    images, labels = tiny_data(n=9)
    result = train(
        tiny_bn_net(), images, labels, method="standard", box=BOX, epochs=1, batch_size=4
    )
    assert result.steps == 2


def test_training_learns_the_tiny_problem() -> None:
    images, labels = tiny_data(n=32)
    model = tiny_bn_net()
    result = train(
        model,
        images,
        labels,
        method=TrainingMethod.STANDARD,
        box=BOX,
        epochs=15,
        batch_size=8,
        lr=0.05,
        schedule=Schedule.STEP,
    )
    assert result.natural_accuracy == 1.0
    assert result.history[-1].loss < result.history[0].loss


@pytest.mark.parametrize("method", TRAINABLE_METHODS)
def test_same_seed_gives_identical_weights(method: TrainingMethod) -> None:
    images, labels = tiny_data(n=24)

    def run(seed: int) -> dict[str, Tensor]:
        model = tiny_bn_net(seed=0)
        train(
            model,
            images,
            labels,
            method=method,
            box=BOX,
            k=3,
            epochs=2,
            batch_size=8,
            seed=seed,
        )
        return model.state_dict()

    first, second, other = run(7), run(7), run(8)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_training_leaves_the_global_generator_alone() -> None:
    images, labels = tiny_data(n=8)
    model = tiny_bn_net()
    state = torch.get_rng_state()
    build_model("small_cnn", 10, seed=4)
    train(model, images, labels, method="worst-of-k", box=BOX, k=2, epochs=1, batch_size=4)
    train(model, images, labels, method="augmentation", box=BOX, epochs=1, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)


def test_build_model_depends_on_the_seed_only() -> None:
    a = build_model("small_cnn", 10, seed=1).state_dict()
    torch.rand(5)
    b = build_model("small_cnn", 10, seed=1).state_dict()
    c = build_model("small_cnn", 10, seed=2).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_train_rejects_bad_shapes() -> None:
    images, labels = tiny_data(n=4)
    with pytest.raises(ValueError, match="labels"):
        train(tiny_bn_net(), images, labels[:3], method="standard", box=BOX, epochs=1)


def test_trained_model_round_trips_through_the_registry_loader(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 32, 32, generator=g)
    labels = torch.arange(12) % 10
    model = build_model("small_cnn", 10, seed=0)
    train(
        model,
        images,
        labels,
        method="augmentation",
        box=BOX,
        epochs=1,
        batch_size=6,
    )
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_safetensors_model(path, "small_cnn")
    with torch.no_grad():
        assert torch.equal(loaded(images), model.eval()(images))


# --- the CLI ------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_writes_weights_and_submittable_metadata(tmp_path: Path) -> None:
    out = tmp_path / "baselines" / "digits-wok.safetensors"
    args = [
        "train",
        "--benchmark", "digits", "--arch", "small_cnn", "--method", "worst-of-k",
        "--k", "2", "--epochs", "1", "--batch-size", "256", "--lr", "0.05",
        "--seed", "3", "--device", "cpu", "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    meta = json.loads(metadata_path(out).read_text())
    assert metadata_path(out) == tmp_path / "baselines" / "digits-wok.json"
    assert meta["benchmark"] == "digits"
    assert meta["architecture"] == "small_cnn"
    assert meta["training_method"] == "worst-of-k"
    assert meta["mean"] is None and meta["std"] is None
    assert meta["extra_data"] is False
    assert meta["display_name"] and meta["description"]
    training = meta["training"]
    assert training["seed"] == 3 and training["epochs"] == 1 and training["k"] == 2
    assert training["torch_version"] == torch.__version__
    assert 0.0 <= training["final_train_accuracy"] <= 1.0
    assert training["train_images"] == 1257
    command = training["command"]
    assert command.startswith("spatialbench train --benchmark digits --arch small_cnn")
    assert "--method worst-of-k --k 2 --epochs 1" in command
    assert f"--out {out}" in command
    model = load_safetensors_model(out, "small_cnn")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_cli_records_normalisation_outside_the_weights(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    args = [
        "train",
        "--benchmark", "digits", "--arch", "small_cnn", "--method", "augment",
        "--epochs", "1", "--batch-size", "512", "--device", "cpu", "--threads", "1",
        "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["training_method"] == "augmentation"
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.25, 0.25, 0.25]
    assert meta["training"]["k"] is None
    # The weights are the bare architecture's; normalisation comes from the metadata.
    model = load_model(out, arch="small_cnn", mean=meta["mean"], std=meta["std"])
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cli_refuses_an_unknown_method(tmp_path: Path) -> None:
    args = [
        "train", "--benchmark", "digits", "--arch", "small_cnn", "--method", "mixup",
        "--out", str(tmp_path / "m.safetensors"),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "not a training method" in result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    args = [
        "train", "--benchmark", "digits", "--arch", "no_such_net", "--method", "standard",
        "--out", str(tmp_path / "m.safetensors"),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Unknown architecture" in result.output


def test_train_refuses_a_method_that_only_describes_a_submission() -> None:
    """``other`` is in the shared vocabulary but names no recipe: refused, not trained as
    standard."""
    model = build_model("small_cnn", num_classes=10)
    images = torch.rand(4, 3, 32, 32)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="cannot train with method 'other'"):
        train(model, images, labels, method=TrainingMethod.OTHER, box=BOX, epochs=1)
