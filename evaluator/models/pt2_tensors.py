"""The tensors of a torch.export archive: each weight's and constant's dtype, shape, strides
and offset checked against its member's size, and read back as a strided view of its raw
bytes, never unpickled (the one exception, ``use_pickle`` entries, is the local CLI's opt-in
and goes through torch's ``weights_only`` unpickler).
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evaluator.models.pt2_rules import MAX_NAME, refuse, refuse_pickle

__all__ = ["check_payloads", "load_pickled_tensor", "read_payloads"]


# Plain dtypes a classifier's weights may have: no complex, float8 or unsigned wider types.
_DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
_STRIDED = 7  # schema.Layout.Strided
# Module paths as torch writes them: ``layer1.0.conv1.weight``.
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _as_ints(values: Iterable[Any], what: str) -> tuple[int, ...]:
    out = []
    for value in values:
        if getattr(value, "type", None) != "as_int" or type(value.value) is not int:
            raise refuse(f"{what} is not a list of fixed integers")
        out.append(value.value)
    return tuple(out)


@dataclass(frozen=True)
class _TensorLayout:
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    requires_grad: bool

    def bytes_needed(self) -> int:
        """Bytes of storage the strided view reaches (0 for an empty tensor)."""
        if any(s == 0 for s in self.sizes):
            return 0
        last = self.offset + sum(
            (s - 1) * st for s, st in zip(self.sizes, self.strides, strict=True)
        )
        return (last + 1) * self.dtype.itemsize


def _layout(fqn: str, meta: Any) -> _TensorLayout:
    what = f"tensor {fqn!r}"
    tensor_meta = meta.tensor_meta
    if tensor_meta is None:
        raise refuse(f"{what} has no dtype and shape in the archive's config")
    if tensor_meta.layout != _STRIDED:
        raise refuse(f"{what} is not a dense (strided) tensor; call .to_dense() before export")
    dtype = _DTYPES.get(tensor_meta.dtype)
    if dtype is None:
        raise refuse(f"{what} has dtype code {tensor_meta.dtype!r}, which is not accepted")
    sizes = _as_ints(tensor_meta.sizes, f"the shape of {what}")
    strides = _as_ints(tensor_meta.strides, f"the strides of {what}")
    (offset,) = _as_ints([tensor_meta.storage_offset], f"the storage offset of {what}")
    if len(sizes) != len(strides) or len(sizes) > 8:
        raise refuse(f"{what} has {len(sizes)} sizes and {len(strides)} strides")
    if min((*sizes, *strides, offset), default=0) < 0:
        raise refuse(f"{what} has a negative size, stride or offset")
    return _TensorLayout(dtype, sizes, strides, offset, bool(tensor_meta.requires_grad))


def check_payloads(
    kind: str,
    config: Mapping[str, Any],
    prefix: str,
    directory: str,
    infos: Mapping[str, zipfile.ZipInfo],
    top: str,
    allow_pickled: bool,
) -> None:
    for fqn, meta in config.items():
        if not isinstance(fqn, str) or not _FQN.fullmatch(fqn) or len(fqn) > MAX_NAME:
            raise refuse(f"the {kind} name {str(fqn)[:80]!r} is not a plain module path")
        if meta.use_pickle and not allow_pickled:
            raise refuse_pickle(f"the {kind} {fqn!r}")
        path_name = meta.path_name
        if not isinstance(path_name, str) or not re.fullmatch(
            re.escape(prefix) + "[0-9]+", path_name
        ):
            raise refuse(f"the {kind} {fqn!r} points at {str(path_name)[:80]!r}")
        member = f"{top}/{directory}{path_name}"
        info = infos.get(member)
        if info is None:
            raise refuse(f"the {kind} {fqn!r} points at {member}, which is missing")
        if meta.use_pickle:
            continue  # the local opt-in: read later by the restricted unpickler
        layout = _layout(fqn, meta)
        if info.file_size % layout.dtype.itemsize:
            raise refuse(f"{member} is not a whole number of {layout.dtype} elements")
        if layout.bytes_needed() > info.file_size:
            raise refuse(
                f"the {kind} {fqn!r} needs {layout.bytes_needed()} bytes but {member} holds "
                f"{info.file_size}"
            )


def read_payloads(
    zf: zipfile.ZipFile,
    top: str,
    directory: str,
    config: Mapping[str, Any],
    pickled: Any = None,
) -> dict[str, torch.Tensor]:
    """Tensors from raw bytes: one flat tensor per member, a strided view per entry."""
    flat: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.items():
        member = f"{top}/{directory}{meta.path_name}"
        if meta.use_pickle:
            # Only reached with ``allow_pickled_weights`` (the local CLI's opt-in): the checks
            # refuse such archives otherwise.
            out[fqn] = pickled(zf.read(member), fqn)
            continue
        layout = _layout(fqn, meta)
        if meta.path_name not in flat:
            data = bytearray(zf.read(member))
            flat[meta.path_name] = (
                torch.frombuffer(data, dtype=layout.dtype)
                if data
                else torch.empty(0, dtype=layout.dtype)
            )
        storage = flat[meta.path_name]
        if storage.dtype != layout.dtype:
            storage = storage.view(layout.dtype)
        tensor = torch.as_strided(storage, layout.sizes, layout.strides, layout.offset)
        if meta.is_param:
            tensor = torch.nn.Parameter(tensor, requires_grad=layout.requires_grad)
        out[fqn] = tensor
    return out


def load_pickled_tensor(data: bytes, fqn: str) -> torch.Tensor:
    # torch's restricted unpickler: it rebuilds plain tensors and refuses to call anything else.
    tensor = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(tensor, torch.Tensor):
        raise refuse(f"the pickled tensor {fqn!r} holds a {type(tensor).__name__}")
    return tensor
