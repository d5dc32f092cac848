"""Recognising, checking and loading submitted models; refusing everything that unpickles."""

from __future__ import annotations

import ast
import math
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import evaluator.models
from evaluator.errors import (
    EvaluatorError,
    ModelFormatError,
    UnknownArchitectureError,
    WeightsMismatchError,
)
from evaluator.models import (
    ExportedModule,
    ModelFormat,
    Normalized,
    check_export_archive,
    check_safetensors,
    detect_format,
    get_architecture,
    load_export_model,
    load_model,
    load_safetensors_model,
    small_cnn,
    wrap_normalization,
)

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def _trained_looking(model: nn.Module) -> nn.Module:
    """Give batch norms non-trivial running statistics, so eval mode matters."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            assert m.num_batches_tracked is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(100)
    return model.eval()


def _images(n: int, size: int = 32, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)).to(device)


@pytest.fixture
def reference() -> nn.Module:
    return _trained_looking(small_cnn())


@pytest.fixture
def state(reference: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reference.state_dict().items()}


def _save(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "w.safetensors") -> Path:
    path = tmp_path / name
    save_file(state, str(path))
    return path


# --- safetensors: round trip and accepted variants -------------------------------------------


def test_safetensors_round_trip_gives_identical_outputs(
    tmp_path: Path, reference: nn.Module, state: dict[str, torch.Tensor], device: torch.device
) -> None:
    model = load_safetensors_model(_save(tmp_path, state), "small_cnn", 10, device=device)
    x = _images(4, device=device)
    with torch.no_grad():
        assert torch.equal(model(x), reference.to(device)(x))


def test_loaded_model_is_in_eval_mode(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    model = load_safetensors_model(_save(tmp_path, state), "small_cnn")
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_weights_load_as_float32(
    tmp_path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model = load_safetensors_model(_save(tmp_path, half), "small_cnn")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_weights_without_batch_counters_load(
    tmp_path: Path, reference: nn.Module, state: dict[str, torch.Tensor]
) -> None:
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = load_safetensors_model(_save(tmp_path, kept), "small_cnn")
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_torchvision_weights_pass_the_check(tmp_path: Path) -> None:
    state = get_architecture("torchvision/resnet18").build(num_classes=4).state_dict()
    check_safetensors(_save(tmp_path, state), "torchvision/resnet18", 4)  # raises if not


def test_check_works_for_architectures_that_cannot_be_built_on_meta(tmp_path: Path) -> None:
    # RegNets read tensor values while constructing; the check falls back to a real build.
    with pytest.raises(WeightsMismatchError, match="missing .* stem.0.weight"):
        check_safetensors(_save(tmp_path, {}), "torchvision/regnet_x_400mf")


def test_check_safetensors_accepts_matching_weights(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    check_safetensors(_save(tmp_path, state), "small_cnn", 10)  # raises if not


def test_safetensors_is_detected_by_content_not_extension(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    assert detect_format(_save(tmp_path, state, name="model.pt2")) is ModelFormat.SAFETENSORS


# --- safetensors: mismatches name the tensor ---------------------------------------------------


def _mismatch(tmp_path: Path, state: dict[str, torch.Tensor], num_classes: int = 10) -> str:
    with pytest.raises(WeightsMismatchError) as info:
        check_safetensors(_save(tmp_path, state), "small_cnn", num_classes)
    return str(info.value)


def test_missing_key_is_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    del state["classifier.bias"]
    assert "classifier.bias" in _mismatch(tmp_path, state)


def test_unexpected_key_is_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    state["extra.weight"] = torch.zeros(3)
    assert "extra.weight" in _mismatch(tmp_path, state)


def test_wrong_shape_is_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    state["classifier.weight"] = torch.zeros(10, 5)
    assert "classifier.weight is [10, 5], expected [10, 1024]" in _mismatch(tmp_path, state)


def test_wrong_num_classes_names_the_head(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    assert "classifier.weight is [10, 1024], expected [7, 1024]" in _mismatch(
        tmp_path, state, num_classes=7
    )


def test_integer_weight_is_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    state["features.0.weight"] = state["features.0.weight"].to(torch.int32)
    assert "features.0.weight is I32" in _mismatch(tmp_path, state)


def test_float64_weight_is_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    state["classifier.bias"] = state["classifier.bias"].double()
    assert "classifier.bias is F64" in _mismatch(tmp_path, state)


def test_float_batch_counter_is_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    state["features.1.num_batches_tracked"] = torch.tensor(100.0)
    assert "features.1.num_batches_tracked is F32" in _mismatch(tmp_path, state)


def test_nan_weight_is_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    state["features.4.weight"][0, 0, 0, 0] = math.nan
    assert "features.4.weight (1 NaN/inf values)" in _mismatch(tmp_path, state)


def test_inf_weight_is_named(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    state["classifier.weight"][3, 7] = math.inf
    assert "classifier.weight (1 NaN/inf values)" in _mismatch(tmp_path, state)


def test_prefixed_keys_get_a_hint(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    prefixed = {f"module.{k}": v for k, v in state.items()}
    assert "prefix" in _mismatch(tmp_path, prefixed)


def test_long_key_lists_are_cut_short(tmp_path: Path) -> None:
    many = {f"junk.{i}": torch.zeros(1) for i in range(25)}
    assert "and 15 more" in _mismatch(tmp_path, many)


def test_unknown_architecture_is_refused(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(UnknownArchitectureError, match="small_cnn"):
        check_safetensors(_save(tmp_path, state), "lenet")


def test_safetensors_without_architecture_is_refused(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(UnknownArchitectureError, match="resnet32"):
        load_model(_save(tmp_path, state))


# --- refused formats --------------------------------------------------------------------------


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _torch_save_state_dict(path: Path) -> None:
    torch.save(small_cnn().state_dict(), path)


def _torch_save_module(path: Path) -> None:
    torch.save(small_cnn(), path)


def _legacy_torch_save(path: Path) -> None:
    torch.save(small_cnn().state_dict(), path, _use_new_zipfile_serialization=False)


def _raw_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))


def _torchscript(path: Path) -> None:
    torch.jit.script(_Linear()).save(str(path))


def _random_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("weights/readme.txt", "hello")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_safetensors(path: Path) -> None:
    save_file({"w": torch.ones(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])


def _truncated_safetensors_header(path: Path) -> None:
    save_file({"w": torch.ones(64)}, str(path))
    path.write_bytes(path.read_bytes()[:20])


def _text(path: Path) -> None:
    path.write_bytes(b"definitely not a model\n")


REFUSED: dict[str, Callable[[Path], None]] = {
    "torch.save state dict": _torch_save_state_dict,
    "torch.save module": _torch_save_module,
    "legacy torch.save": _legacy_torch_save,
    "raw pickle": _raw_pickle,
    "torchscript": _torchscript,
    "random zip": _random_zip,
    "empty file": _empty,
    "truncated safetensors": _truncated_safetensors,
    "truncated safetensors header": _truncated_safetensors_header,
    "text": _text,
}


@pytest.mark.parametrize("make", REFUSED.values(), ids=REFUSED.keys())
def test_refused_format_says_how_to_convert(tmp_path: Path, make: Callable[[Path], None]) -> None:
    path = tmp_path / "upload.pt2"
    make(path)
    with pytest.raises(ModelFormatError) as info:
        detect_format(path)
    assert "safetensors" in str(info.value) and "torch.export" in str(info.value)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_torch_save_state_dict, "pickles can run code"),
        (_raw_pickle, "pickles can run code"),
        (_torchscript, "TorchScript"),
        (_truncated_safetensors, "truncated"),
    ],
)
def test_refusal_names_what_the_file_is(
    tmp_path: Path, make: Callable[[Path], None], says: str
) -> None:
    path = tmp_path / "upload.bin"
    make(path)
    with pytest.raises(ModelFormatError, match=says):
        detect_format(path)


def test_load_model_refuses_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _torch_save_module(path)
    with pytest.raises(ModelFormatError):
        load_model(path, arch="small_cnn")


def _calls(package: Path) -> list[ast.Call]:
    return [
        node
        for source in package.rglob("*.py")
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Call)
    ]


def test_no_unpickling_loader_is_called_anywhere() -> None:
    forbidden = {
        "torch.export.load", "export.load", "torch.jit.load", "jit.load", "pickle.load",
        "pickle.loads", "torch._C._pickle_load_obj",
    }  # fmt: skip
    root = Path(evaluator.models.__file__).parents[2]
    for package in ("evaluator", "api", "worker"):
        for call in _calls(root / package):
            name = ast.unparse(call.func)
            assert name not in forbidden, f"{package}: {ast.unparse(call)}"
            if name == "torch.load":
                # torch's restricted unpickler only, and only behind the local CLI's opt-in.
                safe = [k for k in call.keywords if k.arg == "weights_only"]
                assert safe and ast.unparse(safe[0].value) == "True", ast.unparse(call)


# --- torch.export archives --------------------------------------------------------------------


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(1)
    return _trained_looking(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
    )


def _export(model: nn.Module, path: Path, dynamic_batch: bool = True) -> Path:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    program = torch.export.export(model, (_images(2, size=8),), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = _tiny_classifier()
    return _export(model, tmp_path_factory.mktemp("export") / "tiny.pt2"), model


def _rewrite(src: Path, dst: Path, extra: dict[str, bytes], drop: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename not in drop:
                zout.writestr(info, zin.read(info))
        for name, data in extra.items():
            zout.writestr(name, data)
    return dst


def test_export_archive_is_detected(exported: tuple[Path, nn.Module]) -> None:
    assert detect_format(exported[0]) is ModelFormat.EXPORT


def test_export_archive_is_detected_by_content_not_extension(
    tmp_path: Path, exported: tuple[Path, nn.Module]
) -> None:
    renamed = tmp_path / "3f9a.bin"
    renamed.write_bytes(exported[0].read_bytes())
    assert detect_format(renamed) is ModelFormat.EXPORT


def test_truncated_export_archive_is_refused(
    tmp_path: Path, exported: tuple[Path, nn.Module]
) -> None:
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(exported[0].read_bytes()[:2000])
    with pytest.raises(ModelFormatError, match="truncated"):
        detect_format(cut)


def test_export_archive_passes_the_structural_check(exported: tuple[Path, nn.Module]) -> None:
    check_export_archive(exported[0], max_bytes=10_000_000)  # raises if not


@pytest.mark.parametrize("batch", [1, 3])
def test_export_archive_loads_with_identical_outputs(
    exported: tuple[Path, nn.Module], device: torch.device, batch: int
) -> None:
    path, model = exported
    loaded = load_export_model(path, device=device)
    x = _images(batch, size=8, device=device)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.to(device)(x))


def test_loaded_export_can_be_put_in_eval_mode(exported: tuple[Path, nn.Module]) -> None:
    loaded = Normalized(load_export_model(exported[0]), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert not loaded.eval().training


def test_loaded_export_refuses_training_mode(exported: tuple[Path, nn.Module]) -> None:
    with pytest.raises(NotImplementedError):
        load_export_model(exported[0]).train()


def test_export_with_fixed_batch_says_how_to_re_export(tmp_path: Path) -> None:
    path = _export(_tiny_classifier(), tmp_path / "fixed.pt2", dynamic_batch=False)
    with pytest.raises(ModelFormatError, match="dynamic_shapes"):
        load_export_model(path)(_images(5, size=8))


def test_load_model_normalises_export_inputs(exported: tuple[Path, nn.Module]) -> None:
    path, model = exported
    loaded = load_model(path, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    x = _images(2, size=8)
    expected = model(
        (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        / torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


def test_load_model_can_refuse_export_archives(exported: tuple[Path, nn.Module]) -> None:
    with pytest.raises(ModelFormatError, match="sandbox"):
        load_model(exported[0], allow_export=False)


def test_check_safetensors_refuses_an_export_archive(exported: tuple[Path, nn.Module]) -> None:
    with pytest.raises(ModelFormatError, match="not safetensors"):
        check_safetensors(exported[0], "small_cnn")


@pytest.mark.parametrize("name", ["../evil", "tiny/../evil", "/etc/evil", "tiny/a\\..\\evil"])
def test_export_member_escaping_the_archive_is_refused(
    tmp_path: Path, exported: tuple[Path, nn.Module], name: str
) -> None:
    evil = _rewrite(exported[0], tmp_path / "evil.pt2", {name: b"x"})
    with pytest.raises(ModelFormatError, match="evil"):
        check_export_archive(evil)


def test_export_member_outside_the_top_folder_is_refused(
    tmp_path: Path, exported: tuple[Path, nn.Module]
) -> None:
    other = _rewrite(exported[0], tmp_path / "other.pt2", {"other/readme.txt": b"x"})
    with pytest.raises(ModelFormatError, match="one top folder"):
        check_export_archive(other)


def test_oversize_export_archive_is_refused(exported: tuple[Path, nn.Module]) -> None:
    with pytest.raises(ModelFormatError, match="more than the limit of 1000 bytes"):
        check_export_archive(exported[0], max_bytes=1000)


def test_export_archive_without_a_model_is_refused(
    tmp_path: Path, exported: tuple[Path, nn.Module]
) -> None:
    hollow = _rewrite(exported[0], tmp_path / "hollow.pt2", {}, drop=("tiny/models/model.json",))
    with pytest.raises(ModelFormatError, match="models/model.json"):
        check_export_archive(hollow)


def test_export_archive_with_duplicate_members_is_refused(
    tmp_path: Path, exported: tuple[Path, nn.Module]
) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):  # zipfile's own warning
        twice = _rewrite(exported[0], tmp_path / "twice.pt2", {"tiny/models/model.json": b"{}"})
    with pytest.raises(ModelFormatError, match="more than once"):
        check_export_archive(twice)


# --- normalisation ----------------------------------------------------------------------------


def test_normalized_applies_per_channel_mean_and_std() -> None:
    x = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = Normalized(nn.Identity(), mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 2.0))(x)
    assert torch.equal(out, torch.tensor([1.0, 0.0, -0.25]).view(1, 3, 1, 1).expand(1, 3, 2, 2))


def test_normalized_without_mean_and_std_is_the_identity() -> None:
    x = _images(2)
    assert torch.equal(Normalized(nn.Identity())(x), x)


def test_normalized_keeps_the_input_dtype() -> None:
    x = _images(1).half()
    assert Normalized(nn.Identity(), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))(x).dtype == torch.float16


def test_normalized_adds_nothing_to_the_state_dict() -> None:
    model = nn.Linear(2, 2)
    wrapped = Normalized(model, (0.5, 0.5), (0.2, 0.2))
    assert set(wrapped.state_dict()) == {"model.weight", "model.bias"}


def test_normalized_refuses_a_channel_mismatch() -> None:
    with pytest.raises(EvaluatorError, match="1 channel"):
        Normalized(nn.Identity(), (0.5,), (0.2,))(_images(1))


def test_normalized_refuses_non_positive_std() -> None:
    with pytest.raises(EvaluatorError, match="positive"):
        Normalized(nn.Identity(), (0.5, 0.5, 0.5), (0.2, 0.0, 0.2))


def test_normalized_needs_both_mean_and_std() -> None:
    with pytest.raises(EvaluatorError, match="both"):
        Normalized(nn.Identity(), mean=(0.5, 0.5, 0.5))


def test_wrap_normalization_without_statistics_returns_the_model() -> None:
    model = nn.Identity()
    assert wrap_normalization(model, None, None) is model


def test_load_model_normalises_safetensors_inputs(
    tmp_path: Path, reference: nn.Module, state: dict[str, torch.Tensor]
) -> None:
    model = load_model(_save(tmp_path, state), arch="small_cnn", mean=(0.5,) * 3, std=(0.25,) * 3)
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(model(x), reference((x - 0.5) / 0.25))


def test_exported_module_is_the_public_wrapper(exported: tuple[Path, nn.Module]) -> None:
    assert isinstance(load_export_model(exported[0]), ExportedModule)


# --- Hostile containers -------------------------------------------------------------------------


def test_zip_members_are_counted_from_the_end_record(tmp_path: Path) -> None:
    from evaluator.models.zips import count_zip_members

    path = tmp_path / "three.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(3):
            zf.writestr(f"m/{i}", b"x")
        zf.comment = b"PK\x05\x06 inside a comment is skipped"
    assert count_zip_members(path) == 3
    path.write_bytes(b"not a zip at all")
    assert count_zip_members(path) is None


def test_deeply_nested_safetensors_header_is_refused(tmp_path: Path) -> None:
    header = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path = tmp_path / "nested.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ModelFormatError, match="nests"):
        detect_format(path)
