"""`check_result` on a real result that carries every metric the digits benchmark runs: the
vote under its three attacker models, first-order and the ablations are kept, and values out
of bounds are refused."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.worker.helpers import digits_result
from worker.result_bounds import ResultRejected, check_result


@pytest.fixture(scope="module")
def full_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # The benchmark's defaults: every vote protocol, first-order and all ablations.
    return digits_result(tmp_path_factory.mktemp("m"), limit=3)


def _tampered(result: dict[str, Any], change: Any) -> dict[str, Any]:
    copied = copy.deepcopy(result)
    change(copied)
    return copied


def test_ablations_and_new_metrics_are_kept(full_result: dict[str, Any]) -> None:
    checked = check_result(full_result, "digits")
    assert set(checked["ablations"]) == {
        "rotation-only", "translation-only", "zero-fill", "reflection", "black-canvas"
    }  # fmt: skip
    assert checked["ablations"] == full_result["ablations"]
    for key in ("grid_vote", "grid_vote_per_query", "grid_vote_transfer", "first_order"):
        assert checked["metrics"][key] == full_result["metrics"][key]
    for key in ("grid_vote_transfer_point", "first_order_correct", "ablation_reflection_robust"):
        assert checked["per_image"][key] == full_result["per_image"][key]


def _ablation(result: dict[str, Any]) -> dict[str, Any]:
    return result["ablations"]["rotation-only"]


@pytest.mark.parametrize(
    "change",
    [
        lambda r: _ablation(r).update(correct=_ablation(r)["images"] + 1),
        lambda r: _ablation(r).update(images=10**6),
        lambda r: _ablation(r).update(grid=[31, 1, 2]),
        lambda r: _ablation(r).update(fill="wrap"),
        lambda r: _ablation(r).update(canvas=1000),
        lambda r: _ablation(r).update(natural=float("nan")),
        lambda r: r["ablations"].update(shear=_ablation(r)),
        lambda r: r["metrics"]["grid_vote"].update(protocol="oracle"),
        lambda r: r["metrics"]["first_order"].update(gap_to_grid=3.0),
        lambda r: r["metrics"]["grid_vote_transfer"].update(grid_same_images=-0.5),
        lambda r: r["per_image"]["grid_vote_transfer_point"].__setitem__(0, 775),
        lambda r: r["per_image"]["ablation_zero_fill_natural"].__setitem__(0, 7),
        lambda r: r["per_image"].update(ablation_shear_robust=r["per_image"]["label"]),
    ],
)
def test_out_of_bounds_values_are_rejected(full_result: dict[str, Any], change: Any) -> None:
    check_result(full_result, "digits")
    with pytest.raises(ResultRejected):
        check_result(_tampered(full_result, change), "digits")


def test_ablation_accuracy_is_recomputed_and_label_capped(full_result: dict[str, Any]) -> None:
    def change(r: dict[str, Any]) -> None:
        _ablation(r).update(accuracy=1.0, label="x" * 10_000)
        r["metrics"]["grid_vote"]["attacker"] = "y" * 10_000

    checked = check_result(_tampered(full_result, change), "digits")
    record = _ablation(full_result)
    assert _ablation(checked)["accuracy"] == (
        record["correct"] / record["images"] if record["images"] else None
    )
    assert len(_ablation(checked)["label"]) == 200
    assert len(checked["metrics"]["grid_vote"]["attacker"]) == 200


def test_a_failed_ablation_keeps_its_reason_and_no_number(full_result: dict[str, Any]) -> None:
    def change(r: dict[str, Any]) -> None:
        _ablation(r).update(error="out of memory", accuracy=0.9, correct=3)

    record = _ablation(check_result(_tampered(full_result, change), "digits"))
    assert record["error"] == "out of memory"
    assert record["accuracy"] is None and record["correct"] == 0
