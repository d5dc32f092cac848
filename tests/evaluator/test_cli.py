"""The local CLI: evaluate a registry model on digits and a .pt2 model on an imagefolder."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

from evaluator.attacks import VoteProtocol
from evaluator.benchmarks import DEFAULT_LANDSCAPE_SUBSET
from evaluator.cli import app
from evaluator.cli_tables import results_table
from evaluator.models import get_architecture
from evaluator.vocabulary import METRIC_KEYS, VOTE_ATTACKER_KEYS

runner = CliRunner()


@pytest.fixture
def digits_weights(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.safetensors"
    save_file(get_architecture("small_cnn").build(10).state_dict(), str(path))
    return path


def test_evaluate_digits_prints_the_table_and_writes_the_json(
    digits_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "result.json"
    result = runner.invoke(
        app,
        ["evaluate", "--benchmark", "digits", "--weights", str(digits_weights),
         "--arch", "small_cnn", "--limit", "12", "--device", "cpu",
         "--metrics", "natural,random,worst-of-k,grid,vote",
         "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "grid (headline)" in result.output
    for attacker in ("adaptive", "per-query", "transfer"):
        assert f"grid + vote ({attacker})" in result.output
    assert "worst-of-10" in result.output
    assert "first-order" in result.output and "ablation: black canvas" in result.output
    doc = json.loads(out.read_text())
    assert set(doc["metrics"]) == set(METRIC_KEYS)
    assert set(doc["ablations"]) == {
        "rotation-only",
        "translation-only",
        "zero-fill",
        "reflection",
        "black-canvas",
    }
    assert doc["metrics"]["grid"]["total"] == 12
    assert doc["landscape"]["shape"] == [31, 5, 5]
    assert {"forward_passes", "wall_time_s", "device", "precision", "versions", "seed"} <= set(
        doc["cost"]
    )
    assert len(doc["per_image"]["index"]) == 12


def make_imagefolder(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).relu().mean(dim=(2, 3)))


def tiny_archive(path: Path) -> Path:
    """`Tiny` exported with a dynamic batch, as a user would upload it."""
    program = torch.export.export(
        Tiny().eval(), (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(path))
    return path


def test_evaluate_an_export_archive_on_an_imagefolder(tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "images")
    model_path = tiny_archive(tmp_path / "tiny.pt2")
    out = tmp_path / "r.json"
    result = runner.invoke(
        app,
        ["evaluate", "--benchmark", "imagefolder", "--folder", str(folder), "--image-size", "16",
         "--max-rotation", "20", "--max-translation", "2", "--grid", "5x3x3",
         "--model", str(model_path), "--device", "cpu", "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["benchmark"]["grid"] == [5, 3, 3] and doc["benchmark"]["max_rotation"] == 20
    assert doc["metrics"]["natural"]["total"] == 12
    assert "landscape: the full 45-point grid on 12 of 12 images, 540 forward passes" in (
        result.output
    )


def test_imagefolder_does_not_run_the_full_grid_on_every_image(tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "images", per_class=60)
    model_path = tiny_archive(tmp_path / "tiny.pt2")
    out = tmp_path / "r.json"
    result = runner.invoke(
        app,
        ["evaluate", "--benchmark", "imagefolder", "--folder", str(folder), "--image-size", "16",
         "--grid", "5x3x3", "--metrics", "grid", "--model", str(model_path), "--device", "cpu",
         "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["landscape"]["images"] == DEFAULT_LANDSCAPE_SUBSET < doc["config"]["images"]
    assert "on 100 of 180 images, 4,500 forward passes" in result.output


def test_missing_dataset_says_where_the_files_go(digits_weights: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["evaluate", "--benchmark", "cifar10", "--weights", str(digits_weights),
         "--arch", "resnet32", "--data-dir", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "cifar-10-batches-py" in result.output


def test_a_pickle_is_refused_with_how_to_convert(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(get_architecture("small_cnn").build(10).state_dict(), path)
    result = runner.invoke(
        app, ["evaluate", "--benchmark", "digits", "--weights", str(path), "--arch", "small_cnn"]
    )
    assert result.exit_code == 2
    assert "safetensors" in result.output


def test_weights_and_model_are_exclusive(digits_weights: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--benchmark", "digits"])
    assert result.exit_code != 0 and "--weights" in result.output


def test_unknown_metric_is_refused(digits_weights: Path) -> None:
    result = runner.invoke(
        app,
        ["evaluate", "--benchmark", "digits", "--weights", str(digits_weights),
         "--arch", "small_cnn", "--metrics", "grid,bogus"],
    )  # fmt: skip
    assert result.exit_code != 0 and "natural" in result.output


def test_protocols_first_order_and_ablations_are_chosen_on_the_command_line(
    digits_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "result.json"
    result = runner.invoke(
        app,
        ["evaluate", "--benchmark", "digits", "--weights", str(digits_weights),
         "--arch", "small_cnn", "--limit", "6", "--device", "cpu", "--metrics", "grid,vote",
         "--vote-protocols", "transfer", "--no-first-order",
         "--ablations", "rotation-only,translation-only", "--ablation-subset", "4",
         "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "grid + vote (transfer)" in result.output
    assert "grid + vote (adaptive)" not in result.output and "first-order" not in result.output
    doc = json.loads(out.read_text())
    assert doc["config"]["vote_protocols"] == ["transfer"]
    assert doc["config"]["first_order"] is None
    assert set(doc["ablations"]) == {"rotation-only", "translation-only"}
    assert doc["ablations"]["rotation-only"]["grid"] == [31, 1, 1]
    assert doc["ablations"]["translation-only"]["images"] == 4


def test_unknown_ablation_is_refused_with_the_known_names(digits_weights: Path) -> None:
    result = runner.invoke(
        app,
        ["evaluate", "--benchmark", "digits", "--weights", str(digits_weights),
         "--arch", "small_cnn", "--ablations", "rotation-only,mirror"],
    )  # fmt: skip
    assert result.exit_code != 0 and "black-canvas" in result.output


def test_results_table_names_the_metrics_with_the_benchmarks_numbers() -> None:
    metric = {"accuracy": 0.5, "correct": 6, "total": 12}
    result = {
        "benchmark": {"name": "tiny", "grid": [5, 3, 3], "grid_points": 45, "worst_of_k": 4,
                      "vote_samples": 3},
        "metrics": {"worst_of_k": metric, "grid": metric},
        "cost": {"forward_passes": 600, "full_grid_forward_passes": 540, "wall_time_s": 1.0,
                 "device": "cpu", "precision": "fp32", "seed": 0},
        "forward_passes": {"grid": 300},
    }  # fmt: skip
    buffer = io.StringIO()
    Console(file=buffer, width=200).print(results_table(result))
    text = buffer.getvalue()
    assert "worst-of-4" in text and "grid (headline)" in text
    assert "of-10" not in text


def test_every_vote_attacker_has_the_vocabularys_result_key() -> None:
    # The vocabulary names the keys without importing the library (it is a leaf module), so
    # the two spellings are held together here.
    assert {p.value: p.metric_key for p in VoteProtocol} == VOTE_ATTACKER_KEYS
