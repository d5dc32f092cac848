"""Recognising, checking and loading submitted models, without ever unpickling untrusted data.

Two formats are accepted (see ``ModelFormat``):

- **safetensors** weights for a registry architecture. The header is plain JSON and the data
  raw tensor bytes, so the trusted service can check keys, shapes, dtypes and finiteness
  (``check_safetensors``) and load them anywhere.
- **torch.export archives** (``.pt2``) for any other architecture, read as their program
  (JSON) and raw weight bytes by ``evaluator.models.pt2``: ``check_export_archive`` checks one
  without building anything (the API, at upload), ``load_export_model`` builds it through
  torch's own deserializer (the sandboxed model process). Neither ever unpickles: sample
  inputs are never read, and weights, constants or objects stored with pickle are refused.

Everything else is refused with ``ModelFormatError`` and a message that says how to convert.
This module never unpickles: no ``torch.export.load``, TorchScript or ``pickle``; the one
``torch.load`` (with ``weights_only=True``) is behind the local CLI's opt-in for an author's
own file (``allow_pickled_weights``), which the service never passes.

Layout of a torch 2.14 ``torch.export.save`` archive: a zip of *stored* (uncompressed) entries,
all under one top folder named after the file's stem (``<top>``)::

    <top>/archive_format                            b"pt2"
    <top>/archive_version                           b"0"
    <top>/byteorder                                 b"little"
    <top>/.data/version, <top>/.data/serialization_id
    <top>/models/model.json                         the serialized graph (JSON)
    <top>/data/weights/model_weights_config.json    tensor metadata (JSON)
    <top>/data/weights/weight_<i>                   raw tensor bytes
    <top>/data/constants/model_constants_config.json
    <top>/data/sample_inputs/model.pt               sample inputs, pickled with torch.save
                                                    (never read; stripped at upload)

Recognising, checking and loading stay in one module past the usual length: they share the
refusal messages that say how to convert, and `evaluator.models` exports them as one entry
point. Reading an archive's members is `evaluator.models.pt2`'s.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

import torch
from torch import Tensor, nn

import evaluator.models.pt2 as pt2
from evaluator.errors import (
    EvaluatorError,
    ModelFormatError,
    UnknownArchitectureError,
    WeightsMismatchError,
)
from evaluator.models.registry import get_architecture, list_architectures
from evaluator.models.zips import check_member_count
from evaluator.vocabulary import ModelFormat

__all__ = [
    "HOW_TO_CONVERT",
    "ExportedModule",
    "ModelFormat",
    "Normalized",
    "check_export_archive",
    "check_safetensors",
    "detect_format",
    "load_export_model",
    "load_model",
    "load_safetensors_model",
    "wrap_normalization",
]

StrPath = str | os.PathLike[str]


HOW_TO_CONVERT = (
    "Upload either safetensors weights for a registry architecture "
    "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors') and pick the "
    "architecture), or a torch.export archive for any architecture "
    "(torch.export.save(torch.export.export(model.eval(), (example,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2'))."
)

_PICKLE_MESSAGE = (
    "This is a pickled PyTorch checkpoint (torch.save or pickle); pickles can run code when "
    "loaded and are refused. Save the state dict with "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') and pick an "
    "architecture, or export with torch.export.save(torch.export.export(model.eval(), "
    "(example,), dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')."
)

# The safetensors library refuses headers above 100 MB; so do we, before reading one.
_MAX_SAFETENSORS_HEADER = 100_000_000

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Weights may be stored at reduced precision; they are converted to float32 on load.
_ACCEPTED_FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_MAX_LISTED = 10


# --- Format detection -------------------------------------------------------------------------


def detect_format(path: StrPath) -> ModelFormat:
    """Which accepted format the file at ``path`` is, from its content (never its extension).

    safetensors: an 8-byte little-endian header length ``n``, then ``n`` bytes of JSON that
    index exactly the rest of the file. torch.export: a zip with ``<top>/archive_format``
    reading ``pt2``. Anything else, including pickles, ``torch.save`` zips, TorchScript,
    other zips and empty or truncated files, raises ``ModelFormatError`` saying how to convert.
    Does not validate an export archive's members; ``check_export_archive`` does.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ModelFormatError(f"The model file is empty. {HOW_TO_CONVERT}")
    with path.open("rb") as f:
        head = f.read(9)
        if _looks_like_safetensors(head):
            _validate_safetensors_header(f, head, size)
            return ModelFormat.SAFETENSORS
    if zipfile.is_zipfile(path):
        # Before zipfile parses the directory: 400,000 members cost seconds and 200 MB.
        check_member_count(path)
        return _classify_zip(path)
    if head.startswith(b"PK\x03\x04"):
        raise ModelFormatError(
            "The model file starts like a zip archive but has no end: it is truncated or "
            f"damaged. Upload it again. {HOW_TO_CONVERT}"
        )
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        # PROTO opcode: a pickle of protocol 1-5, including legacy (non-zip) torch.save files.
        raise ModelFormatError(_PICKLE_MESSAGE)
    raise ModelFormatError(
        f"The model file is neither safetensors nor a torch.export archive. {HOW_TO_CONVERT}"
    )


def _looks_like_safetensors(head: bytes) -> bool:
    # The spec requires the JSON header to start with "{". A pickle or a zip has other bytes
    # at offset 8 (a frame length, a zip compression method), so this does not misfire.
    return len(head) == 9 and head[8:9] == b"{"


def _validate_safetensors_header(f: BinaryIO, head: bytes, size: int) -> None:
    (header_len,) = struct.unpack("<Q", head[:8])

    def truncated(detail: str) -> ModelFormatError:
        return ModelFormatError(
            f"The safetensors file is truncated or corrupt ({detail}); upload it again, or "
            f"re-save it with safetensors.torch.save_file. {HOW_TO_CONVERT}"
        )

    if header_len > _MAX_SAFETENSORS_HEADER:
        raise truncated(f"header length {header_len} exceeds 100 MB")
    if 8 + header_len > size:
        raise truncated(f"header claims {header_len} bytes, the file has {size - 8} after it")
    f.seek(8)
    try:
        header = json.loads(f.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise truncated(f"header is not JSON: {exc}") from exc
    except RecursionError:
        raise truncated("header nests lists or objects too deeply") from None
    if not isinstance(header, dict):
        raise truncated("header is not a JSON object")
    data_len = size - 8 - header_len
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise truncated(f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    # The format requires the header to index the data exactly, without holes or a tail.
    if end != data_len:
        raise truncated(f"header indexes {end} bytes of tensor data, the file holds {data_len}")


def _top_folder(name: str) -> str:
    return name.split("/", 1)[0]


def _classify_zip(path: Path) -> ModelFormat:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            names = {info.filename for info in infos}
            for info in infos:
                parts = info.filename.split("/")
                if len(parts) == 2 and parts[1] == "archive_format" and info.file_size <= 16:
                    if zf.read(info) == b"pt2":
                        return ModelFormat.EXPORT
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, RuntimeError) as exc:
        # RuntimeError: encrypted members; BadZipFile also covers CRC mismatches.
        raise ModelFormatError(
            f"The model file is a damaged zip archive ({exc}). {HOW_TO_CONVERT}"
        ) from exc
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    if "constants.pkl" in rel or any(r.startswith("code/") for r in rel):
        raise ModelFormatError(
            "This is a TorchScript archive (torch.jit.save); TorchScript is deprecated and its "
            "loader unpickles, so it is refused. Export the original nn.Module instead: "
            "torch.export.save(torch.export.export(model.eval(), (example,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2'), or save its "
            "state dict with safetensors.torch.save_file(model.state_dict(), "
            "'model.safetensors') and pick an architecture."
        )
    if "data.pkl" in rel or "data.pkl" in names:
        raise ModelFormatError(_PICKLE_MESSAGE)
    if "serialized_exported_program.json" in names:
        raise ModelFormatError(
            "This is a torch.export archive in an older layout, which SpatialBench does not "
            "accept. Re-save it with torch.export.save from PyTorch "
            f"{torch.__version__.split('+')[0]}. {HOW_TO_CONVERT}"
        )
    raise ModelFormatError(
        "The model file is a zip archive but not a torch.export archive (no "
        f"<top>/archive_format entry reading 'pt2'). {HOW_TO_CONVERT}"
    )


# --- torch.export archives ----------------------------------------------------------------------


def check_export_archive(path: StrPath, max_bytes: int | None = None) -> None:
    """Check that ``path`` is a torch.export archive that loads without pickle; never runs it.

    Reads the zip directory and the JSON members only (``pt2.inspect_archive``): one top
    folder, no unsafe, encrypted, duplicate or unknown members, no weights or constants
    stored with pickle, tensor bytes that cover their declared shapes, and a program that is
    a pure function of one image batch calling only torch's own ops. With ``max_bytes``, the
    members' declared total size must not exceed it (torch writes stored entries, whose
    declared size is their size on disk; the sandbox's memory limit backs this up against a
    zip that lies). Raises ``ModelFormatError`` saying how to re-export.
    """
    pt2.inspect_archive(path, max_bytes=max_bytes)


class ExportedModule(nn.Module):
    """A module loaded from a torch.export archive, usable like any classifier.

    ``ExportedProgram.module()`` returns a GraphModule whose train/eval behaviour was fixed
    when it was exported (batch norm statistics, dropout) and which raises on ``.eval()``. This
    wrapper makes ``.eval()`` a no-op for it so it can sit inside other modules; export your
    model after ``model.eval()``. It also turns the shape-guard failure of an archive exported
    with a fixed batch size into a ``ModelFormatError`` that says how to re-export.
    """

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.program = graph_module
        self.training = False

    def train(self, mode: bool = True) -> ExportedModule:
        if mode:
            raise NotImplementedError(
                "An exported program cannot switch to training mode; its train/eval "
                "behaviour was fixed when it was exported."
            )
        self.training = False
        return self

    def forward(self, x: Tensor) -> Tensor:
        try:
            return self.program(x)
        except (AssertionError, RuntimeError) as exc:
            # torch's shape checks: a generated guard (AssertionError) or the input-constraint
            # pre-hook (RuntimeError), depending on how the archive was exported.
            if "Guard failed" not in str(exc) and not str(exc).startswith("Expected input at"):
                raise
            raise ModelFormatError(
                f"The exported model does not accept inputs of shape {tuple(x.shape)} ({exc}). "
                "Export it for this benchmark's image size with a dynamic batch dimension: "
                "torch.export.export(model.eval(), (example,), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},))."
            ) from exc


def load_export_model(
    path: StrPath,
    device: str | torch.device = "cpu",
    *,
    allow_pickled_weights: bool = False,
) -> nn.Module:
    """Load a torch.export archive as an ``ExportedModule`` on ``device``, without pickle.

    The archive is checked as by ``check_export_archive`` (without a size cap) and built from
    its program and raw weight bytes (``pt2.load_exported_program``); its sample inputs are
    never read. Running the result runs the uploaded program, so the service calls this only
    in the sandboxed model process. ``allow_pickled_weights`` is the local CLI's opt-in for
    an author's own file (weights stored with pickle, read by torch's ``weights_only``
    unpickler); the service never passes it.

    The program runs with the train/eval semantics it was exported with: export after
    ``model.eval()``, and with a dynamic batch dimension.
    """
    program = pt2.load_exported_program(
        path, torch.device(device), allow_pickled_weights=allow_pickled_weights
    )
    return ExportedModule(program.module()).to(device)


# --- safetensors --------------------------------------------------------------------------------


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _prefix_hint(missing: Iterable[str], unexpected: Sequence[str]) -> str:
    missing = set(missing)
    for prefix in ("module.", "model.", "_orig_mod.", "net."):
        if unexpected and all(k.startswith(prefix) for k in unexpected):
            if {k[len(prefix) :] for k in unexpected} & missing:
                return (
                    f" (the file's keys carry a {prefix!r} prefix, e.g. from DataParallel, "
                    "torch.compile or a wrapper; strip it before saving)"
                )
    return ""


@functools.lru_cache(maxsize=64)
def _expected_state(arch_name: str, num_classes: int) -> Mapping[str, Tensor]:
    """The architecture's state dict as meta tensors (shapes and dtypes, no memory)."""
    spec = get_architecture(arch_name)
    try:
        with torch.device("meta"):
            state = spec.build(num_classes).state_dict()
    except (NotImplementedError, RuntimeError):
        # torchvision's RegNets compute their widths from tensor values while constructing,
        # which the meta device cannot; build them for real once (hence the cache).
        state = {k: v.to("meta") for k, v in spec.build(num_classes).state_dict().items()}
    return MappingProxyType(state)


def check_safetensors(path: StrPath, arch_name: str, num_classes: int | None = None) -> None:
    """Check that the safetensors file at ``path`` fits architecture ``arch_name``.

    Compares the file's tensors with the architecture's state dict: the same keys (a missing
    ``num_batches_tracked`` is allowed), the same shapes, a float dtype (float32, float16 or
    bfloat16) where the model has a float tensor and exactly the model's dtype elsewhere
    (``num_batches_tracked`` is int64), and only finite values. Raises
    ``WeightsMismatchError`` naming the offending tensors (up to ten per kind of problem),
    ``ModelFormatError`` when the file is not safetensors, and ``UnknownArchitectureError``
    for an unknown ``arch_name``. The expected tensors are built on the meta device where
    possible, and cached per process.
    """
    from safetensors import SafetensorError, safe_open

    spec = get_architecture(arch_name)
    fmt = detect_format(path)
    if fmt is not ModelFormat.SAFETENSORS:
        raise ModelFormatError(
            "This is a torch.export archive, not safetensors weights; submit it without an "
            "architecture."
        )
    classes = spec.default_num_classes if num_classes is None else num_classes
    expected = _expected_state(arch_name, classes)
    what = f"architecture {arch_name!r} with {classes} classes"
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            keys = set(f.keys())
            # BatchNorm fills in a missing counter itself (it is unused in eval mode), and
            # many converted checkpoints lack it.
            missing = sorted(
                k for k in expected.keys() - keys if not k.endswith(".num_batches_tracked")
            )
            unexpected = sorted(keys - expected.keys())
            problems = []
            if missing:
                problems.append(
                    f"missing {len(missing)} tensor(s): {_listing(missing)}"
                    + _prefix_hint(missing, unexpected)
                )
            if unexpected:
                problems.append(f"unexpected {len(unexpected)} tensor(s): {_listing(unexpected)}")
            bad_shapes, bad_dtypes = [], []
            for key in sorted(keys & expected.keys()):
                want = expected[key]
                tensor_slice = f.get_slice(key)
                shape = tuple(tensor_slice.get_shape())
                if shape != tuple(want.shape):
                    bad_shapes.append(f"{key} is {list(shape)}, expected {list(want.shape)}")
                stored = tensor_slice.get_dtype()
                dtype = _SAFETENSORS_DTYPES.get(stored)
                if want.is_floating_point():
                    if dtype not in _ACCEPTED_FLOAT_DTYPES:
                        bad_dtypes.append(f"{key} is {stored}, expected a float (F32, F16 or BF16)")
                elif dtype != want.dtype:
                    bad_dtypes.append(f"{key} is {stored}, expected {want.dtype}")
            if bad_shapes:
                problems.append(f"wrong shape: {_listing(bad_shapes)}")
            if bad_dtypes:
                problems.append(f"wrong dtype: {_listing(bad_dtypes)}")
            if problems:
                raise WeightsMismatchError(f"The weights do not fit {what}: {'; '.join(problems)}.")
            non_finite = []
            for key in sorted(keys):
                if not expected[key].is_floating_point():
                    continue
                tensor = f.get_tensor(key)
                n_bad = int((~torch.isfinite(tensor)).sum())
                if n_bad:
                    non_finite.append(f"{key} ({n_bad} NaN/inf values)")
    except SafetensorError as exc:
        raise ModelFormatError(
            f"The safetensors file could not be read ({exc}). {HOW_TO_CONVERT}"
        ) from exc
    if non_finite:
        raise WeightsMismatchError(
            f"The weights for {what} contain non-finite values: {_listing(non_finite)}."
        )


def load_safetensors_model(
    path: StrPath,
    arch_name: str,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build ``arch_name`` and load the safetensors weights at ``path`` into it.

    Runs ``check_safetensors`` first, then loads strictly, converts floating-point tensors to
    float32, moves the model to ``device`` and returns it in eval mode. Safe on untrusted
    files: safetensors holds no code.
    """
    from safetensors.torch import load_file

    check_safetensors(path, arch_name, num_classes)
    model = get_architecture(arch_name).build(num_classes)
    state = load_file(os.fspath(path), device="cpu")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# --- Normalisation ------------------------------------------------------------------------------


class Normalized(nn.Module):
    """``model((x - mean) / std)`` with per-channel ``mean`` and ``std``.

    The evaluator transforms images in ``[0, 1]`` pixel space and then calls this module, so
    normalisation happens after the spatial transform, as the threat model requires. With
    ``mean`` and ``std`` both None it calls ``model`` on ``x`` unchanged. ``mean`` and ``std``
    need one entry per input channel; ``std`` must be positive.
    """

    mean: Tensor | None
    std: Tensor | None

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        if (mean is None) != (std is None):
            raise EvaluatorError("Give both mean and std for input normalisation, or neither.")
        if mean is None or std is None:
            self.register_buffer("mean", None)
            self.register_buffer("std", None)
            return
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise EvaluatorError(
                f"mean and std must be non-empty lists of one value per channel and of equal "
                f"length; got {len(mean_t)} and {len(std_t)} values."
            )
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()):
            raise EvaluatorError("mean and std must be finite numbers.")
        if not (std_t > 0).all():
            raise EvaluatorError(f"std must be positive; got {std_t.tolist()}.")
        # Not persistent: the wrapped model's state dict stays what the user uploaded.
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.mean is not None and self.std is not None:
            if x.shape[1] != self.mean.shape[1]:
                raise EvaluatorError(
                    f"mean and std have {self.mean.shape[1]} channel(s) but the images have "
                    f"{x.shape[1]}; give one value per channel."
                )
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.model(x)


def wrap_normalization(
    model: nn.Module,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> nn.Module:
    """``Normalized(model, mean, std)``, or ``model`` itself when both are None."""
    if mean is None and std is None:
        return model
    return Normalized(model, mean, std)


# --- One entry point ----------------------------------------------------------------------------


def load_model(
    path: StrPath,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    allow_export: bool = True,
    allow_pickled_weights: bool = False,
) -> nn.Module:
    """Load a submitted model for evaluation: eval mode, on ``device``, normalising inputs.

    Dispatches on ``detect_format``. safetensors needs ``arch`` (and uses ``num_classes``,
    default the architecture's). A torch.export archive ignores ``arch`` and ``num_classes``
    (the evaluator checks the logits' shape) and is refused with ``allow_export=False``, which
    processes that must not run uploaded code pass (loading never unpickles, but the program
    runs when called). ``allow_pickled_weights`` is the local CLI's opt-in (see
    ``load_export_model``); the service never passes it.
    """
    fmt = detect_format(path)
    model: nn.Module
    if fmt is ModelFormat.SAFETENSORS:
        if arch is None:
            raise UnknownArchitectureError(
                "safetensors files hold weights only; name the architecture they belong to "
                f"(one of: {', '.join(list_architectures())}), or upload a torch.export "
                "archive (.pt2) instead."
            )
        model = load_safetensors_model(path, arch, num_classes, device=device)
    else:
        if not allow_export:
            raise ModelFormatError(
                "torch.export archives are loaded only inside the sandboxed model process, "
                "not here."
            )
        model = load_export_model(path, device=device, allow_pickled_weights=allow_pickled_weights)
    return wrap_normalization(model, mean, std).to(device).eval()
