"""Built-in benchmarks and benchmarks from operator TOML files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluator.ablations import Ablation
from evaluator.attacks import VoteProtocol
from evaluator.benchmarks import (
    BUILTIN_BENCHMARKS,
    DEFAULT_LANDSCAPE_SUBSET,
    DatasetKind,
    get_benchmark,
    list_benchmarks,
    load_benchmark_file,
)
from evaluator.errors import UnknownBenchmarkError
from evaluator.transforms import FillMode


def test_builtin_benchmarks_are_the_four_of_the_design() -> None:
    assert set(BUILTIN_BENCHMARKS) == {"cifar10", "imagenet", "mnist", "digits"}


def test_cifar10_grid_has_775_points() -> None:
    spec = get_benchmark("cifar10")
    assert spec.grid.shape == (31, 5, 5) and spec.grid.size == 775


def test_cifar10_translations_are_multiples_of_one_and_a_half() -> None:
    _, dxs, dys = get_benchmark("cifar10").grid.axes()
    assert dxs.tolist() == [-3.0, -1.5, 0.0, 1.5, 3.0]
    assert dys.tolist() == [-3.0, -1.5, 0.0, 1.5, 3.0]


def test_cifar10_rotations_step_by_two_degrees_up_to_30() -> None:
    thetas, _, _ = get_benchmark("cifar10").grid.axes()
    assert torch.equal(thetas, torch.arange(-30, 31, 2, dtype=torch.float64))


def test_imagenet_resizes_to_256_and_crops_224() -> None:
    spec = get_benchmark("imagenet")
    assert (spec.resize, spec.image_size, spec.split) == (256, (224, 224), "val")
    assert spec.box.max_dx == spec.box.max_dy == 24.0


def test_every_builtin_grid_contains_the_identity() -> None:
    for spec in list_benchmarks():
        assert spec.grid.identity_index() is not None, spec.name


def test_get_benchmark_error_lists_the_known_names() -> None:
    with pytest.raises(UnknownBenchmarkError, match="cifar10, digits, imagenet, mnist"):
        get_benchmark("cifar100")


def test_to_dict_records_the_grid() -> None:
    record = get_benchmark("cifar10").to_dict()
    assert record["grid"] == [31, 5, 5] and record["grid_points"] == 775
    assert record["max_translation"] == [3.0, 3.0]


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "benchmarks.toml"
    path.write_text(text)
    return path


def test_load_benchmark_file_reads_an_imagefolder_benchmark(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [benchmarks.flowers]
        dataset = "imagefolder"
        path = "flowers/test"
        image_size = [64, 48]
        max_rotation = 15
        max_translation = [4, 2]
        grid = [7, 3, 3]
        fill = "border"
        """,
    )
    spec = load_benchmark_file(path)["flowers"]
    assert spec.dataset is DatasetKind.IMAGEFOLDER and spec.path == "flowers/test"
    assert spec.image_size == (64, 48) and spec.fill is FillMode("border")
    assert (spec.box.max_rotation, spec.box.max_dx, spec.box.max_dy) == (15.0, 4.0, 2.0)
    assert spec.grid.size == 63
    assert spec.num_classes == 0  # learnt from the folders by evaluator.data.resolve_benchmark


def test_a_benchmark_without_a_base_bounds_its_landscape(tmp_path: Path) -> None:
    text = '[benchmarks.f]\ndataset = "imagefolder"\npath = "f"\n'
    spec = load_benchmark_file(write_toml(tmp_path, text))["f"]
    assert spec.landscape_subset == DEFAULT_LANDSCAPE_SUBSET
    full = load_benchmark_file(write_toml(tmp_path, text + "landscape_subset = 5000\n"))["f"]
    assert full.landscape_subset == 5000


def test_load_benchmark_file_starts_from_a_base(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[benchmarks.cifar10-wide]\nbase = "cifar10"\nmax_rotation = 45\n')
    spec = load_benchmark_file(path)["cifar10-wide"]
    assert spec.dataset is DatasetKind.CIFAR10 and spec.num_classes == 10
    assert spec.box.max_rotation == 45.0 and spec.box.max_dx == 3.0


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[benchmarks.x]\ndataset = "cifar10"\nrotation = 30\n')
    with pytest.raises(ValueError, match=r"unknown keys \['rotation'\]"):
        load_benchmark_file(path)


def test_imagefolder_without_path_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[benchmarks.x]\ndataset = "imagefolder"\n')
    with pytest.raises(ValueError, match="needs 'path'"):
        load_benchmark_file(path)


def test_file_without_benchmarks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[benchmarks.NAME\]"):
        load_benchmark_file(write_toml(tmp_path, "title = 'nothing'\n"))


def test_every_benchmark_measures_grid_vote_under_all_three_attackers_by_default() -> None:
    for spec in list_benchmarks():
        assert spec.vote_protocols == tuple(VoteProtocol), spec.name


def test_the_demo_runs_first_order_and_every_ablation_on_recorded_subsets() -> None:
    spec = get_benchmark("digits")
    assert spec.first_order and spec.first_order_subset == 200
    assert spec.ablations == tuple(Ablation) and spec.ablation_subset == 100
    record = spec.to_dict()
    assert record["vote_protocols"] == ["adaptive", "per-query", "transfer"]
    assert record["ablations"] == [a.value for a in Ablation]
    assert record["first_order_subset"] == 200 and record["ablation_subset"] == 100


def test_a_benchmark_file_sets_protocols_first_order_and_ablations(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [benchmarks.small]
        base = "cifar10"
        vote_protocols = ["transfer", "adaptive"]
        first_order = true
        first_order_subset = 500
        ablations = ["black-canvas", "rotation-only"]
        ablation_subset = 250
        """,
    )
    spec = load_benchmark_file(path)["small"]
    assert spec.vote_protocols == (VoteProtocol.ADAPTIVE, VoteProtocol.TRANSFER)
    assert spec.first_order and spec.first_order_subset == 500
    assert spec.ablations == (Ablation.ROTATION_ONLY, Ablation.BLACK_CANVAS)
    assert spec.ablation_subset == 250


def test_an_unknown_protocol_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[benchmarks.x]\nbase = "cifar10"\nvote_protocols = ["oracle"]\n')
    with pytest.raises(ValueError, match=r"unknown vote_protocols \['oracle'\].*per-query"):
        load_benchmark_file(path)
