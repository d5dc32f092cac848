"""An attacker's torch.export archives: nothing in them runs, at upload or when loaded.

Each attack archive is built on the fly from a real ``torch.export.save`` archive and carries a
payload that would write a marker file and raise. The control tests show the payload is live:
torch's own loaders run it. Every other test shows the marker stays absent.
"""

# The API fixtures are imported from tests.api.conftest, so tests name them as parameters.
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from config.settings import Settings
from evaluator.attacks import Classifier
from evaluator.benchmarks import get_benchmark
from evaluator.errors import ModelFormatError
from evaluator.evaluate import EvalOptions, Metric, evaluate
from evaluator.models import ModelFormat, check_export_archive, detect_format, load_export_model
from evaluator.models.pt2 import strip_sample_inputs
from evaluator.transforms import GridSpec, TransformBox
from tests.api.conftest import (  # noqa: F401  (fixtures)
    Account,
    alice,
    client,
    enqueued,
    make_account,
    settings,
    upload,
)
from tests.evaluator.helpers import self_labelled, tiny_cnn
from tests.fixtures_db import (  # noqa: F401  (fixtures)
    TestDatabase,
    pg_connection_fixture,
    test_db_fixture,
)

SIZE = 16


class _Payload:
    """Pickles as a call to ``exec``: unpickling writes ``marker`` and raises."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, (_code(self.marker),))


def _code(marker: Path) -> str:
    return (
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "raise RuntimeError('the payload ran')"
    )


def _pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _write(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@dataclass
class Exported:
    path: Path
    model: nn.Module

    @property
    def top(self) -> str:
        return next(iter(_members(self.path))).split("/", 1)[0]

    def program(self) -> dict[str, Any]:
        return json.loads(_members(self.path)[f"{self.top}/models/model.json"])

    def variant(self, path: Path, **changes: bytes) -> Path:
        """A copy with the members named (relative to the top folder) replaced."""
        members = _members(self.path)
        for rel, data in changes.items():
            members[f"{self.top}/{rel}"] = data
        return _write(path, members)

    def with_program(self, path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
        program = self.program()
        edit(program)
        return self.variant(path, **{"models/model.json": json.dumps(program).encode()})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    model = tiny_cnn()
    path = tmp_path_factory.mktemp("export") / "tiny.pt2"
    program = torch.export.export(
        model,
        (torch.rand(2, 3, SIZE, SIZE),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    torch.export.save(program, str(path))
    return Exported(path, model)


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "payload-ran"
    yield path


# --- The attacker's archives --------------------------------------------------------------------


def pickled_sample_inputs(exported: Exported, folder: Path, marker: Path) -> Path:
    """(a) A real archive whose sample inputs are a pickle with a payload."""
    return exported.variant(
        folder / "sample-inputs.pt2", **{"data/sample_inputs/model.pt": _pickled(marker)}
    )


def pickled_weight(exported: Exported, folder: Path, marker: Path) -> Path:
    """(b) A weight marked ``use_pickle`` whose bytes are a pickle with a payload."""
    rel = "data/weights/model_weights_config.json"
    config = json.loads(_members(exported.path)[f"{exported.top}/{rel}"])
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    return exported.variant(
        folder / "pickled-weight.pt2",
        **{
            rel: json.dumps(config).encode(),
            f"data/weights/{entry['path_name']}": _pickled(marker),
        },
    )


def dressed_torch_save(exported: Exported, folder: Path, marker: Path) -> Path:
    """(c) A ``torch.save`` zip with a payload, dressed with the export archive's markers."""
    path = folder / "dressed.pt2"
    torch.save(_Payload(marker), path)
    top = next(iter(_members(path))).split("/", 1)[0]
    program = _members(exported.path)[f"{exported.top}/models/model.json"]
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(f"{top}/archive_format", b"pt2")
        zf.writestr(f"{top}/archive_version", b"0")
        zf.writestr(f"{top}/models/model.json", program)
    return path


REFUSED = {"pickled-weight": pickled_weight, "dressed-torch-save": dressed_torch_save}
ATTACKS = {"pickled-sample-inputs": pickled_sample_inputs, **REFUSED}


def test_the_payloads_are_live(exported: Exported, tmp_path: Path, marker: Path) -> None:
    """torch's own loaders run each payload: the tests below could fail."""
    for name, build in ATTACKS.items():
        path = build(exported, tmp_path, marker)
        marker.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            if name == "dressed-torch-save":
                torch.load(path, weights_only=False)
            else:
                torch.export.load(path)
        assert marker.exists(), name


# --- The loader ----------------------------------------------------------------------------------


def test_pickled_sample_inputs_are_never_read(
    exported: Exported, tmp_path: Path, marker: Path
) -> None:
    path = pickled_sample_inputs(exported, tmp_path, marker)
    check_export_archive(path)
    loaded = load_export_model(path)
    x = torch.rand(5, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), exported.model(x))
    assert not marker.exists()


@pytest.mark.parametrize("attack", sorted(REFUSED))
def test_pickled_archives_are_refused_by_the_check_and_the_loader(
    exported: Exported, tmp_path: Path, marker: Path, attack: str
) -> None:
    path = REFUSED[attack](exported, tmp_path, marker)
    assert detect_format(path) is ModelFormat.EXPORT
    with pytest.raises(ModelFormatError, match="pickle") as refused:
        check_export_archive(path)
    assert "torch.export.export(model.eval()" in str(refused.value)
    with pytest.raises(ModelFormatError, match="pickle"):
        load_export_model(path)
    # Not even the local opt-in runs it: torch's weights_only unpickler refuses ``exec``.
    with contextlib.suppress(Exception):
        load_export_model(path, allow_pickled_weights=True)
    assert not marker.exists()


def test_stripping_removes_the_sample_inputs_and_keeps_the_model(
    exported: Exported, tmp_path: Path, marker: Path
) -> None:
    path = pickled_sample_inputs(exported, tmp_path, marker)
    assert strip_sample_inputs(path) is True
    assert not any("sample_inputs" in name for name in _members(path))
    assert strip_sample_inputs(path) is False
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(load_export_model(path)(x), exported.model(x))
    assert not marker.exists()


def test_a_normal_archive_is_evaluated_like_the_original_module(exported: Exported) -> None:
    bench = replace(
        get_benchmark("digits"),
        image_size=(SIZE, SIZE),
        grid=GridSpec(TransformBox(30, 3, 3), 7, 3, 3),
        vote_samples=5,
        worst_of_k=6,
        vote_subset=None,
        landscape_subset=None,
    )
    data = self_labelled(exported.model, 40, size=SIZE)
    options = EvalOptions(metrics=frozenset({Metric.NATURAL, Metric.GRID}), seed=0)
    results = [
        evaluate(Classifier(model, 10, batch_size=64), data, bench, options).metrics
        for model in (exported.model, load_export_model(exported.path))
    ]
    assert {k: v.correct for k, v in results[0].items()} == {
        k: v.correct for k, v in results[1].items()
    }


# --- Programs that are not a pure function of the image, or that carry code ----------------------


def _first_node(program: dict[str, Any]) -> dict[str, Any]:
    return program["graph_module"]["graph"]["nodes"][0]


@pytest.mark.parametrize(
    "target",
    [
        "torch.ops.mylib.evil.default",
        "torch.load",
        "torch.ops.aten.from_file.default",
        "torch.ops.higher_order.cond",
    ],
)
def test_ops_outside_torch_are_refused_by_name(
    exported: Exported, tmp_path: Path, target: str
) -> None:
    def edit(program: dict[str, Any]) -> None:
        _first_node(program)["target"] = target

    path = exported.with_program(tmp_path / "op.pt2", edit)
    with pytest.raises(ModelFormatError, match=target.replace(".", r"\.")):
        check_export_archive(path)


def test_buffer_updates_are_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()).train()
    path = tmp_path / "training.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(2, 3, 8, 8),)), str(path))
    with pytest.raises(ModelFormatError, match="pure function of its input"):
        check_export_archive(path)
    with pytest.raises(ModelFormatError, match="pure function of its input"):
        load_export_model(path)


class _WritesThroughAView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half, _ = self.w.split(2)
        half.mul_(2)  # changes self.w: the next call answers differently
        return x.flatten(1) @ self.w


class _InPlaceOnItsOwnValues(_WritesThroughAView):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.flatten(1).clone()
        y.mul_(2).relu_()
        return y @ self.w


def test_writes_to_a_weight_through_a_view_are_refused_and_own_values_are_not(
    tmp_path: Path,
) -> None:
    paths = {}
    for name, model in (("view", _WritesThroughAView()), ("own", _InPlaceOnItsOwnValues())):
        paths[name] = tmp_path / f"{name}.pt2"
        with torch.no_grad():
            program = torch.export.export(model, (torch.rand(2, 1, 2, 2),))
        torch.export.save(program, str(paths[name]))
    with pytest.raises(ModelFormatError, match=r"aten\.mul_\.Tensor, which writes"):
        check_export_archive(paths["view"])
    check_export_archive(paths["own"])


def test_code_in_a_shape_expression_is_refused(
    exported: Exported, tmp_path: Path, marker: Path
) -> None:
    def edit(node: Any) -> None:
        if isinstance(node, dict):
            if "expr_str" in node:
                node["expr_str"] = f"__import__('builtins').exec({_code(marker)!r})"
            for value in node.values():
                edit(value)
        elif isinstance(node, list):
            for value in node:
                edit(value)

    path = exported.with_program(tmp_path / "sympify.pt2", edit)
    with contextlib.suppress(Exception):
        torch.export.load(path)  # control: sympify evaluates it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ModelFormatError, match="symbolic shape expression"):
        load_export_model(path)
    assert not marker.exists()


def test_guard_code_is_never_run(exported: Exported, tmp_path: Path, marker: Path) -> None:
    def edit(program: dict[str, Any]) -> None:
        # Spelled without double quotes: torch pastes the guard into a double-quoted message.
        code = f"bytes({list(_code(marker).encode())}).decode()"
        program["guards_code"] = [f"__import__('builtins').exec({code}) is None"]

    path = exported.with_program(tmp_path / "guards.pt2", edit)
    x = torch.rand(2, 3, SIZE, SIZE)
    with contextlib.suppress(Exception):
        torch.export.load(path).module()(x)  # control: torch compiles the guards with exec
    assert marker.exists()
    marker.unlink()
    with torch.no_grad():
        assert torch.equal(load_export_model(path)(x), exported.model(x))
    assert not marker.exists()


def test_names_that_would_be_pasted_into_code_are_refused(
    exported: Exported, tmp_path: Path
) -> None:
    evil = 'w"), exec("1"), getattr(self, "w'

    def edit(program: dict[str, Any]) -> None:
        spec = program["graph_module"]["signature"]["input_specs"][0]["parameter"]
        spec["parameter_name"] = evil

    path = exported.with_program(tmp_path / "name.pt2", edit)
    with pytest.raises(ModelFormatError, match="parameter"):
        check_export_archive(path)


def test_two_inputs_are_refused(tmp_path: Path) -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (x + y).flatten(1)

    path = tmp_path / "two.pt2"
    pair = (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4))
    torch.export.save(torch.export.export(Two(), pair), str(path))
    with pytest.raises(ModelFormatError, match="2 inputs"):
        check_export_archive(path)


# --- Through the API -----------------------------------------------------------------------------


def _stored(settings: Settings) -> list[Path]:
    assert settings.storage_dir is not None
    return sorted(p for p in settings.storage_dir.rglob("*") if p.is_file())


def test_upload_strips_pickled_sample_inputs(
    client: TestClient,
    alice: Account,
    settings: Settings,
    exported: Exported,
    tmp_path: Path,
    marker: Path,
) -> None:
    path = pickled_sample_inputs(exported, tmp_path, marker)
    response = upload(client, path, alice, architecture=None)
    assert response.status_code == 202, response.text
    stored = settings.model_path(response.json()["file_sha256"])
    assert _stored(settings) == [stored]
    assert not any("sample_inputs" in name for name in _members(stored))
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(load_export_model(stored)(x), exported.model(x))
    assert not marker.exists()


@pytest.mark.parametrize("attack", sorted(REFUSED))
def test_upload_refuses_pickled_archives(
    client: TestClient,
    alice: Account,
    settings: Settings,
    exported: Exported,
    tmp_path: Path,
    marker: Path,
    attack: str,
) -> None:
    path = REFUSED[attack](exported, tmp_path, marker)
    response = upload(client, path, alice, architecture=None)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "unsupported_model_format"
    assert "pickle" in body["detail"] and "torch.export.export(" in body["detail"]
    assert _stored(settings) == []
    assert not marker.exists()
