"""torch.export archives (``.pt2``) read as a program plus raw tensor bytes, never unpickled.

``torch.export.load`` is unsafe on an uploaded file: it unpickles the archive's sample inputs
(``torch.export.save`` always writes them with ``torch.save``) and any weight or constant marked
``use_pickle``, falling back to ``weights_only=False`` when the safe unpickler refuses. Its
deserializer also evaluates strings from the program as code: symbolic shapes go through
``sympy.sympify`` (``eval``), ``guards_code`` and node metadata end up in source that
``ExportedProgram.module()`` executes, and parameter names are pasted into generated code.

This module opens the archive with ``zipfile`` and:

- reads ``models/model.json`` and the weight/constant configs as JSON, and each tensor's raw
  bytes from its own member (dtype, shape, stride and offset from the config);
- never reads ``data/sample_inputs/*`` (``strip_sample_inputs`` removes them from a stored
  upload) and refuses any member it does not know, anything marked ``use_pickle``, custom
  objects and opaque constants;
- refuses programs that are not a pure function of one image tensor: buffer, parameter or input
  mutations (in the signature, or an in-place op writing to a parameter, buffer, constant or
  the input, directly or through a view), several inputs or outputs, ops outside torch's own
  namespaces (``aten``, ``prims`` and Python's symbolic-size arithmetic), higher-order ops,
  symbolic expressions outside sympy's arithmetic, and names that are not plain identifiers;
- drops the strings torch would execute or print into code (guards, node metadata) and builds
  the ``ExportedProgram`` with torch's own ``ExportedProgramDeserializer``.

``inspect_archive`` runs every check without building anything (the API calls it at upload);
``load_exported_program`` repeats them and deserializes (the sandboxed model process calls it).

Layout of a torch 2.14 ``torch.export.save`` archive: a zip of stored entries under one top
folder ``<top>``: ``archive_format`` (``pt2``), ``archive_version``, ``byteorder``,
``.data/version``, ``.data/serialization_id``, ``models/model.json``,
``data/weights/model_weights_config.json`` and ``weight_<i>``,
``data/constants/model_constants_config.json`` and ``tensor_<i>``, and
``data/sample_inputs/model.pt``.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch.export.pt2_archive import constants as pt2

from evaluator.errors import ModelFormatError

__all__ = [
    "HOW_TO_EXPORT",
    "MAX_ARCHIVE_MEMBERS",
    "ArchiveContents",
    "count_zip_members",
    "inspect_archive",
    "load_exported_program",
    "strip_sample_inputs",
]

StrPath = str | os.PathLike[str]

HOW_TO_EXPORT = (
    "Export the model in eval mode, as a pure function of one image batch returning one logits "
    "tensor, with plain tensors as weights: torch.export.save(torch.export.export(model.eval(), "
    "(example,), dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')."
)

# A real archive has one member per weight storage plus a handful; a ResNet-152 has under 1,000.
MAX_ARCHIVE_MEMBERS = 10_000
_MODEL = "model"
_MAX_JSON_BYTES = 64 * 2**20
_MAX_NAME = 300
_MAX_EXPR = 1_000

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_EOCD_SIZE = 22
_MAX_COMMENT = 0xFFFF

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

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Module paths as torch writes them: ``layer1.0.conv1.weight``.
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_OP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
# Expressions arrive as sympy's ``srepr``: ``Mul(Integer(2), Symbol('s77', positive=True))``.
_EXPR_TOKEN = re.compile(
    r"\s+|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*"
    r"|'[a-z]+[0-9]+'|'[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?'"
    r"|\*\*|//|<=|>=|==|!=|[-+*/%(),<>&|~=]"
)
# What sympy prints for shape arithmetic, and torch's own sympy functions (see
# ``GraphModuleDeserializer.sympy_functions``); anything else would reach ``eval`` as a name.
_SYMPY_NAMES = frozenset(
    """
    Abs Add Mul Pow Symbol Integer Float Rational True False oo precision
    positive negative nonnegative nonpositive integer real finite infinite zero nonzero even
    odd rational And Or Not Eq Ne Ge Gt Le Lt Max Min Mod ceiling floor sqrt
    CeilDiv CeilToInt CleanDiv FloatPow FloatTrueDiv FloorDiv FloorToInt Identity IntTrueDiv
    IsNonOverlappingAndDenseIndicator LShift ModularIndexing PowByNatural PythonMod RShift
    RoundDecimal RoundToInt ToFloat TruncToFloat TruncToInt Where
    """.split()
)
# Python-level targets torch.export emits for arithmetic on symbolic sizes.
_SYM_TARGETS = frozenset(
    {f"_operator.{n}" for n in (
        "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le",
        "gt", "ge", "and_", "or_", "not_", "getitem",
    )}
    | {f"torch.{n}" for n in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum",
    )}
    | {f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")}
)  # fmt: skip
_OP_NAMESPACES = ("aten", "prims")
# torch's own ops that reach outside the tensor world (files, stdout).
_REFUSED_OPS = frozenset({"from_file", "save", "_print"})
# The program dialects torch.export itself writes.
_DIALECTS = frozenset({"", "ATEN", "TRAINING"})
# Argument kinds that carry code or objects rather than values.
_REFUSED_ARGUMENTS = frozenset({"as_graph", "as_custom_obj", "as_operator"})


@dataclass(frozen=True)
class ArchiveContents:
    """What ``inspect_archive`` found: the program and where each tensor's bytes are."""

    top: str
    program: Any  # torch._export.serde.schema.ExportedProgram
    weights: Mapping[str, Any]  # fqn -> schema.PayloadMeta
    constants: Mapping[str, Any]
    sample_inputs: tuple[str, ...]  # members never read; stripped from stored uploads


def _refuse(reason: str) -> ModelFormatError:
    return ModelFormatError(f"The torch.export archive is refused: {reason}. {HOW_TO_EXPORT}")


def _refuse_pickle(what: str) -> ModelFormatError:
    return ModelFormatError(
        f"The torch.export archive is refused: {what} is stored with pickle, which can run code "
        "when loaded, and SpatialBench never unpickles uploads. torch.export.save pickles "
        "tensor subclasses (quantized, sparse or wrapper tensors) and custom objects: convert "
        "every parameter, buffer and constant to a plain dense tensor "
        "(for example model.float() and .to_dense()) before exporting. " + HOW_TO_EXPORT
    )


# --- The zip ------------------------------------------------------------------------------------


def count_zip_members(path: StrPath) -> int | None:
    """The member count a zip declares in its end-of-central-directory record, or None.

    Reads at most the last 64 KiB (plus the zip64 record when the count does not fit in 16
    bits), so a zip with millions of members is counted without parsing its directory. None
    means no end record was found: not a zip, or a truncated one.
    """
    with Path(path).open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        tail_start = max(0, size - _EOCD_SIZE - _MAX_COMMENT)
        f.seek(tail_start)
        tail = f.read()
        at = _end_record(tail)
        if at is None:
            return None
        (count,) = struct.unpack_from("<H", tail, at + 10)
        if count != 0xFFFF:
            return int(count)
        locator_at = tail_start + at - 20
        if locator_at < 0:
            return int(count)
        f.seek(locator_at)
        locator = f.read(20)
        if locator[:4] != _EOCD64_LOCATOR:
            return int(count)
        (record_at,) = struct.unpack_from("<Q", locator, 8)
        if record_at + 56 > size:
            return None
        f.seek(record_at)
        record = f.read(56)
        if record[:4] != _EOCD64:
            return None
        (count64,) = struct.unpack_from("<Q", record, 32)
        return int(count64)


def _end_record(tail: bytes) -> int | None:
    """Where the end record starts in ``tail``: the last signature whose comment length
    reaches exactly the end of the file (the comment itself may contain the signature)."""
    at = tail.rfind(_EOCD)
    while at >= 0:
        if len(tail) - at >= _EOCD_SIZE:
            (comment,) = struct.unpack_from("<H", tail, at + 20)
            if at + _EOCD_SIZE + comment == len(tail):
                return at
        at = tail.rfind(_EOCD, 0, at)
    return None


def check_member_count(path: StrPath, what: str = "zip archive") -> None:
    """Refuse a zip that declares more than ``MAX_ARCHIVE_MEMBERS`` members, before parsing it."""
    count = count_zip_members(path)
    if count is not None and count > MAX_ARCHIVE_MEMBERS:
        raise ModelFormatError(
            f"The {what} declares {count} members, more than the {MAX_ARCHIVE_MEMBERS} a model "
            f"archive may hold; it was refused without being unpacked. {HOW_TO_EXPORT}"
        )


_DRIVE = re.compile(r"^[A-Za-z]:")


def _unsafe_member_reason(name: str) -> str | None:
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or _DRIVE.match(name):
        return "is an absolute path"
    parts = name.rstrip("/").split("/")
    if any(part in ("..", ".") for part in parts):
        return "contains a '..' or '.' component"
    if any(part == "" for part in parts):
        return "contains an empty path component"
    return None


class _Member(StrEnum):
    """The members a torch.export.save archive holds (paths under its top folder)."""

    FORMAT = "archive_format"
    VERSION = "archive_version"
    BYTEORDER = "byteorder"
    DATA_VERSION = ".data/version"
    SERIALIZATION_ID = ".data/serialization_id"
    PROGRAM = "program"
    WEIGHTS_CONFIG = "weights config"
    CONSTANTS_CONFIG = "constants config"
    SAMPLE_INPUTS = "sample inputs"
    EXTRA = "extra file"  # torch.export.save(extra_files=...): text nothing reads
    WEIGHT = "weight"
    CONSTANT = "constant"


def _member_kind(rel: str) -> _Member | None:
    """Which known part of an archive ``rel`` (a path under the top folder) is, or None."""
    fixed = {
        pt2.ARCHIVE_FORMAT_PATH: _Member.FORMAT,
        pt2.ARCHIVE_VERSION_PATH: _Member.VERSION,
        "byteorder": _Member.BYTEORDER,
        ".data/version": _Member.DATA_VERSION,
        ".data/serialization_id": _Member.SERIALIZATION_ID,
        pt2.MODELS_FILENAME_FORMAT.format(_MODEL): _Member.PROGRAM,
        pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(_MODEL): _Member.WEIGHTS_CONFIG,
        pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(_MODEL): _Member.CONSTANTS_CONFIG,
    }
    if rel in fixed:
        return fixed[rel]
    if rel.startswith(pt2.SAMPLE_INPUTS_DIR):
        return _Member.SAMPLE_INPUTS
    if rel.startswith(pt2.EXTRA_DIR):
        return _Member.EXTRA
    if re.fullmatch(re.escape(pt2.WEIGHTS_DIR + pt2.WEIGHT_FILENAME_PREFIX) + r"[0-9]+", rel):
        return _Member.WEIGHT
    constant = pt2.CONSTANTS_DIR + pt2.TENSOR_CONSTANT_FILENAME_PREFIX
    if re.fullmatch(re.escape(constant) + r"[0-9]+", rel):
        return _Member.CONSTANT
    return None


def _unknown_member_reason(rel: str) -> str:
    if rel.endswith(".pkl"):
        return "a pickle (torch.save or the pickle module), which SpatialBench never loads"
    if rel.startswith(pt2.CONSTANTS_DIR) and (
        rel[len(pt2.CONSTANTS_DIR) :].startswith(
            (pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX)
        )
    ):
        return "a pickled custom object"
    if rel.startswith(pt2.WEIGHTS_DIR) and rel.endswith(".pt"):
        return "pickled weights in the legacy layout"
    if rel.startswith(pt2.CONSTANTS_DIR) and rel.endswith(".pt"):
        return "pickled constants in the legacy layout"
    if rel.startswith(pt2.AOTINDUCTOR_DIR):
        return "compiled AOTInductor code"
    if rel.startswith(pt2.MODELS_DIR):
        return f"a second program (only {pt2.MODELS_FILENAME_FORMAT.format(_MODEL)} is run)"
    return "not part of a torch.export.save archive"


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str) -> bytes:
    if info.file_size > limit:
        raise _refuse(f"{what} is {info.file_size} bytes, more than the {limit} allowed")
    return zf.read(info)


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _refuse(f"{what} is not valid JSON ({type(exc).__name__})") from None


def _to_dataclass(cls: Any, data: Any, what: str) -> Any:
    from torch._export.serde.serialize import _dict_to_dataclass

    try:
        return _dict_to_dataclass(cls, data)
    except Exception as exc:  # the data is hostile: any failure means "not a program"
        raise _refuse(f"{what} does not follow torch.export's schema ({exc!s:.200})") from None


# --- Tensors ------------------------------------------------------------------------------------


def _as_ints(values: Iterable[Any], what: str) -> tuple[int, ...]:
    out = []
    for value in values:
        if getattr(value, "type", None) != "as_int" or type(value.value) is not int:
            raise _refuse(f"{what} is not a list of fixed integers")
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
        raise _refuse(f"{what} has no dtype and shape in the archive's config")
    if tensor_meta.layout != _STRIDED:
        raise _refuse(f"{what} is not a dense (strided) tensor; call .to_dense() before export")
    dtype = _DTYPES.get(tensor_meta.dtype)
    if dtype is None:
        raise _refuse(f"{what} has dtype code {tensor_meta.dtype!r}, which is not accepted")
    sizes = _as_ints(tensor_meta.sizes, f"the shape of {what}")
    strides = _as_ints(tensor_meta.strides, f"the strides of {what}")
    (offset,) = _as_ints([tensor_meta.storage_offset], f"the storage offset of {what}")
    if len(sizes) != len(strides) or len(sizes) > 8:
        raise _refuse(f"{what} has {len(sizes)} sizes and {len(strides)} strides")
    if min((*sizes, *strides, offset), default=0) < 0:
        raise _refuse(f"{what} has a negative size, stride or offset")
    return _TensorLayout(dtype, sizes, strides, offset, bool(tensor_meta.requires_grad))


def _check_payloads(
    kind: str,
    config: Mapping[str, Any],
    prefix: str,
    directory: str,
    infos: Mapping[str, zipfile.ZipInfo],
    top: str,
    allow_pickled: bool,
) -> None:
    for fqn, meta in config.items():
        if not isinstance(fqn, str) or not _FQN.fullmatch(fqn) or len(fqn) > _MAX_NAME:
            raise _refuse(f"the {kind} name {str(fqn)[:80]!r} is not a plain module path")
        if meta.use_pickle and not allow_pickled:
            raise _refuse_pickle(f"the {kind} {fqn!r}")
        path_name = meta.path_name
        if not isinstance(path_name, str) or not re.fullmatch(
            re.escape(prefix) + "[0-9]+", path_name
        ):
            raise _refuse(f"the {kind} {fqn!r} points at {str(path_name)[:80]!r}")
        member = f"{top}/{directory}{path_name}"
        info = infos.get(member)
        if info is None:
            raise _refuse(f"the {kind} {fqn!r} points at {member}, which is missing")
        if meta.use_pickle:
            continue  # the local opt-in: read later by the restricted unpickler
        layout = _layout(fqn, meta)
        if info.file_size % layout.dtype.itemsize:
            raise _refuse(f"{member} is not a whole number of {layout.dtype} elements")
        if layout.bytes_needed() > info.file_size:
            raise _refuse(
                f"the {kind} {fqn!r} needs {layout.bytes_needed()} bytes but {member} holds "
                f"{info.file_size}"
            )


# --- The program --------------------------------------------------------------------------------


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (field name, value) pair in a schema dataclass tree, depth first."""
    import dataclasses

    from torch._export.serde.union import _Union

    stack = [("", node)]
    while stack:
        key, value = stack.pop()
        yield key, value
        if isinstance(value, _Union):
            stack.append((str(value.type), value.value))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            stack.extend((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        elif isinstance(value, list | tuple):
            stack.extend((key, v) for v in value)
        elif isinstance(value, dict):
            stack.extend((key, v) for v in value.values())


def _check_expression(expr: Any) -> None:
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR:
        raise _refuse("a symbolic shape expression is not a short string")
    position = 0
    while position < len(expr):
        match = _EXPR_TOKEN.match(expr, position)
        if match is None:
            raise _refuse(f"the symbolic shape expression {expr[:80]!r} is not plain arithmetic")
        token = match.group()
        if _IDENTIFIER.fullmatch(token) and not (token in _SYMPY_NAMES or _SYMBOL.fullmatch(token)):
            raise _refuse(f"the symbolic shape expression {expr[:80]!r} names {token!r}")
        position = match.end()


def _check_names(program: Any) -> None:
    """Names torch pastes into generated code must be identifiers; expressions arithmetic."""
    for key, value in _walk(program):
        if key == "expr_str":
            _check_expression(value)
        elif key in ("name", "as_name") and value is not None:
            if (
                not isinstance(value, str)
                or not _IDENTIFIER.fullmatch(value)
                or len(value) > _MAX_NAME
            ):
                raise _refuse(f"the value name {str(value)[:80]!r} is not a plain identifier")
    graph = program.graph_module.graph
    for table in (
        graph.tensor_values,
        graph.sym_int_values,
        graph.sym_bool_values,
        graph.sym_float_values,
    ):
        for name in table:
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
                raise _refuse(f"the value name {str(name)[:80]!r} is not a plain identifier")
    for name in program.range_constraints:
        if not isinstance(name, str) or not _SYMBOL.fullmatch(name):
            raise _refuse(f"the shape symbol {str(name)[:80]!r} is not a plain symbol name")


def _resolve_op(target: str) -> Any:
    """The torch op a node's target names, or a refusal naming it."""
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) == 5 and parts[:2] == ["torch", "ops"] and parts[2] in _OP_NAMESPACES:
        namespace, name, overload = parts[2:]
        if _OP_NAME.fullmatch(name) and _OP_NAME.fullmatch(overload):
            if name in _REFUSED_OPS:
                raise _refuse(f"the program calls {target}, which reads or writes outside tensors")
            try:
                return getattr(getattr(getattr(torch.ops, namespace), name), overload)
            except (AttributeError, RuntimeError):
                raise _refuse(
                    f"the program calls {target}, which this PyTorch "
                    f"({torch.__version__.split('+')[0]}) does not have"
                ) from None
    raise _refuse(
        f"the program calls {str(target)[:120]!r}, which is outside torch's own operators "
        f"({', '.join(_OP_NAMESPACES)}); custom ops, higher-order ops (cond, map, while_loop) "
        "and delegates are not run"
    )


def _tensor_names(argument: Any) -> list[str]:
    kind, value = argument.type, argument.value
    if kind == "as_tensor":
        return [value.name]
    if kind == "as_tensors":
        return [t.name for t in value]
    if kind == "as_optional_tensor":
        return [value.value.name] if value.type == "as_tensor" else []
    if kind == "as_optional_tensors":
        return [t.value.name for t in value if t.type == "as_tensor"]
    if kind == "as_nested_tensors":
        return [t.name for group in value for t in group]
    return []


def _check_nodes(program: Any) -> None:
    """Only torch's ops, and none that writes to the model's state or its input."""
    graph = program.graph_module.graph
    # Values that alias a placeholder (weights, buffers, constants, the input): writing to any
    # of them would make the model's answer depend on earlier calls.
    state: set[str] = set()
    for argument in graph.inputs:
        state.update(_tensor_names(argument))
    for node in graph.nodes:
        for named in node.inputs:
            if named.arg.type in _REFUSED_ARGUMENTS:
                raise _refuse(
                    f"the program passes a {named.arg.type[3:]} to {str(node.target)[:120]}, "
                    "which only higher-order ops and custom objects do"
                )
        if node.target in _SYM_TARGETS:
            continue
        op = _resolve_op(node.target)
        schema = op._schema
        by_name = {named.name: named.arg for named in node.inputs}
        aliases_state = False
        for arg in schema.arguments:
            names = _tensor_names(by_name[arg.name]) if arg.name in by_name else []
            touches_state = any(n in state for n in names)
            if arg.alias_info is not None and arg.alias_info.is_write and touches_state:
                raise _refuse(
                    f"the program calls {node.target}, which writes to the model's parameters, "
                    "buffers, constants or input; a model must be a pure function of its input "
                    "(export after model.eval(), without in-place updates of its state)"
                )
            if arg.alias_info is not None and touches_state:
                aliases_state = True
        # An annotated (``Tensor(a)``) input is one the outputs may view: split, view, t...
        if aliases_state:
            for output in node.outputs:
                state.update(_tensor_names(output))


def _check_signature(
    program: Any, contents_weights: Mapping[str, Any], constants: Mapping[str, Any]
) -> None:
    signature = program.graph_module.signature
    user_inputs = 0
    for spec in signature.input_specs:
        kind, value = spec.type, spec.value
        if kind == "user_input":
            if value.arg.type != "as_tensor":
                raise _refuse("the program takes an input that is not a tensor")
            user_inputs += 1
        elif kind == "parameter":
            if value.parameter_name not in contents_weights:
                raise _refuse(f"the parameter {str(value.parameter_name)[:80]!r} has no weights")
        elif kind == "buffer":
            if value.buffer_name not in contents_weights and value.buffer_name not in constants:
                raise _refuse(f"the buffer {str(value.buffer_name)[:80]!r} has no data")
        elif kind == "tensor_constant":
            if value.tensor_constant_name not in constants:
                raise _refuse(f"the constant {str(value.tensor_constant_name)[:80]!r} has no data")
        elif kind == "custom_obj":
            raise _refuse_pickle(f"the custom object {str(value.custom_obj_name)[:80]!r}")
        else:
            raise _refuse(f"the program takes a {kind} input; a classifier takes one image batch")
    if user_inputs != 1:
        raise _refuse(f"the program takes {user_inputs} inputs; it must take one image batch")
    outputs = [spec.type for spec in signature.output_specs]
    mutations = [kind for kind in outputs if kind != "user_output"]
    if mutations:
        raise _refuse(
            f"the program updates state when it runs ({', '.join(sorted(set(mutations)))}); a "
            "model must be a pure function of its input: export after model.eval(), without "
            "in-place updates of buffers or of the input"
        )
    if len(outputs) != 1:
        raise _refuse(
            f"the program returns {len(outputs)} values; it must return one logits tensor"
        )
    root = [entry for entry in program.graph_module.module_call_graph if entry.fqn == ""]
    if len(root) != 1 or root[0].signature is None:
        raise _refuse("the program has no call signature")
    _check_call_spec(root[0].signature)


def _check_call_spec(signature: Any) -> None:
    """One positional tensor in, one tensor out: anything else reaches generated guard code."""
    from torch.utils import _pytree as pytree

    want_in = pytree.tree_flatten(((0,), {}))[1]
    want_out = pytree.tree_flatten(0)[1]
    try:
        have_in = pytree.treespec_loads(signature.in_spec)
        have_out = pytree.treespec_loads(signature.out_spec)
    except Exception:  # hostile text: any failure means "not a plain call"
        raise _refuse("the program's call signature cannot be read") from None
    if have_in != want_in or have_out != want_out:
        raise _refuse("the program must be called as model(images) and return one logits tensor")


def _check_program(program: Any, weights: Mapping[str, Any], constants: Mapping[str, Any]) -> None:
    from torch._export.serde.schema import SCHEMA_VERSION

    if program.schema_version.major != SCHEMA_VERSION[0]:
        raise _refuse(
            f"its program was written with export schema {program.schema_version.major}, not "
            f"the {SCHEMA_VERSION[0]} that PyTorch {torch.__version__.split('+')[0]} reads; "
            "re-export it with this version"
        )
    dialects = [d for d in program.verifiers if d not in _DIALECTS]
    if dialects:
        raise _refuse(f"its program is in the {str(dialects[0])[:40]!r} dialect, not torch's ATen")
    for name, bounds in program.range_constraints.items():
        if not all(v is None or type(v) is int for v in (bounds.min_val, bounds.max_val)):
            raise _refuse(f"the range of shape symbol {str(name)[:40]!r} is not integers")
    graph = program.graph_module.graph
    if graph.custom_obj_values:
        raise _refuse_pickle("a custom object")
    _check_names(program)
    _check_signature(program, weights, constants)
    _check_nodes(program)


# --- Entry points -------------------------------------------------------------------------------


def inspect_archive(path: StrPath, max_bytes: int | None = None) -> ArchiveContents:
    """Check that ``path`` is a torch.export archive SpatialBench can load without pickle.

    Reads only the zip directory and the JSON members. Raises ``ModelFormatError`` saying what
    is wrong and how to re-export; returns what was found. With ``max_bytes``, the members'
    declared total size must not exceed it.
    """
    from torch._export.serde import schema

    check_member_count(path, "torch.export archive")
    try:
        with zipfile.ZipFile(path) as zf:
            return _inspect(zf, schema, max_bytes)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, RuntimeError, EOFError) as exc:
        # RuntimeError: an encrypted member; BadZipFile also covers CRC mismatches.
        raise _refuse(f"it is not a readable zip archive ({exc})") from exc


def _index(zf: zipfile.ZipFile, max_bytes: int | None) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The archive's top folder and its members by name, refusing unsafe or oversized zips."""
    infos = zf.infolist()
    if not infos:
        raise _refuse("it is an empty zip")
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        # ``orig_filename`` is the name as stored, before zipfile cuts it at a NUL.
        name = info.orig_filename
        reason = _unsafe_member_reason(name)
        if reason is not None:
            raise _refuse(f"member name {name!r} {reason}")
        if name in by_name:
            raise _refuse(f"member {name!r} appears more than once")
        if info.flag_bits & 0x1:
            raise _refuse(f"member {name!r} is encrypted")
        by_name[name] = info
    tops = {name.split("/", 1)[0] for name in by_name}
    if len(tops) != 1 or any("/" not in name for name in by_name):
        shown = ", ".join(sorted(tops)[:10])
        raise _refuse(
            f"its members must all live under one top folder, as torch.export.save writes them "
            f"(found {shown})"
        )
    total = sum(info.file_size for info in infos)
    if max_bytes is not None and total > max_bytes:
        raise _refuse(f"it unpacks to {total} bytes, more than the limit of {max_bytes} bytes")
    return tops.pop(), by_name


def _classify(top: str, by_name: Mapping[str, zipfile.ZipInfo]) -> dict[_Member, str]:
    """One member name per kind; refuses members torch.export.save does not write."""
    kinds: dict[_Member, str] = {}
    for name, info in by_name.items():
        if name.endswith("/") and info.file_size == 0:
            continue  # a directory entry
        rel = name[len(top) + 1 :]
        kind = _member_kind(rel)
        if kind is None:
            raise _refuse(f"member {name!r} is {_unknown_member_reason(rel)}")
        kinds.setdefault(kind, name)
    for kind, rel in (
        (_Member.FORMAT, pt2.ARCHIVE_FORMAT_PATH),
        (_Member.VERSION, pt2.ARCHIVE_VERSION_PATH),
        (_Member.PROGRAM, pt2.MODELS_FILENAME_FORMAT.format(_MODEL)),
    ):
        if kind not in kinds:
            raise _refuse(f"it lacks {top}/{rel}")
    return kinds


def _check_markers(zf: zipfile.ZipFile, kinds: Mapping[_Member, str]) -> None:
    if _read_small(zf, zf.getinfo(kinds[_Member.FORMAT]), 16, "archive_format") != b"pt2":
        raise _refuse(f"{kinds[_Member.FORMAT]} does not read 'pt2'")
    version = _read_small(zf, zf.getinfo(kinds[_Member.VERSION]), 16, "archive_version")
    if version != pt2.ARCHIVE_VERSION_VALUE.encode():
        raise _refuse(
            f"its archive version {version!r} is not the {pt2.ARCHIVE_VERSION_VALUE!r} that "
            f"PyTorch {torch.__version__.split('+')[0]} reads; re-save it with this version"
        )
    if _Member.BYTEORDER in kinds:
        order = _read_small(zf, zf.getinfo(kinds[_Member.BYTEORDER]), 16, "byteorder")
        if order != b"little":
            raise _refuse(
                f"its tensors are stored {order!r}-endian; save it on a little-endian machine"
            )


def _read_json(zf: zipfile.ZipFile, name: str, cls: Any) -> Any:
    data = _read_small(zf, zf.getinfo(name), _MAX_JSON_BYTES, name)
    return _to_dataclass(cls, _parse_json(data, name), name)


def _payload_config(
    zf: zipfile.ZipFile, schema: Any, kinds: Mapping[_Member, str], kind: _Member
) -> dict[str, Any]:
    if kind not in kinds:
        return {}
    parsed = _read_json(zf, kinds[kind], schema.PayloadConfig)
    if not isinstance(parsed.config, dict):
        raise _refuse(f"{kinds[kind]} is not a mapping of tensors")
    return parsed.config


def _inspect(
    zf: zipfile.ZipFile, schema: Any, max_bytes: int | None, allow_pickled: bool = False
) -> ArchiveContents:
    top, by_name = _index(zf, max_bytes)
    kinds = _classify(top, by_name)
    _check_markers(zf, kinds)
    weights = _payload_config(zf, schema, kinds, _Member.WEIGHTS_CONFIG)
    constants = _payload_config(zf, schema, kinds, _Member.CONSTANTS_CONFIG)
    for label, config, prefix, directory in (
        ("weight", weights, pt2.WEIGHT_FILENAME_PREFIX, pt2.WEIGHTS_DIR),
        ("constant", constants, pt2.TENSOR_CONSTANT_FILENAME_PREFIX, pt2.CONSTANTS_DIR),
    ):
        _check_payloads(label, config, prefix, directory, by_name, top, allow_pickled)
    program = _read_json(zf, kinds[_Member.PROGRAM], schema.ExportedProgram)
    _check_program(program, weights, constants)
    sample_inputs = tuple(
        sorted(n for n in by_name if n[len(top) + 1 :].startswith(pt2.SAMPLE_INPUTS_DIR))
    )
    return ArchiveContents(top, program, weights, constants, sample_inputs)


def strip_sample_inputs(path: StrPath) -> bool:
    """Rewrite the zip at ``path`` without its ``data/sample_inputs`` members (never read them).

    Copies the other members' bytes as they are (zip handling only, nothing is decoded) into
    a new file beside ``path`` and renames it over ``path``. Returns whether anything was
    removed. Call it on an archive that ``inspect_archive`` accepted.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as src:
        infos = src.infolist()
        top = infos[0].filename.split("/", 1)[0] if infos else ""
        prefix = f"{top}/{pt2.SAMPLE_INPUTS_DIR}"
        keep = [info for info in infos if not info.filename.startswith(prefix)]
        if len(keep) == len(infos):
            return False
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".strip-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as dst:
                for info in keep:
                    with src.open(info) as reader, dst.open(info, "w") as writer:
                        while chunk := reader.read(1 << 20):
                            writer.write(chunk)
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return True


def _read_payloads(
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


def _load_pickled_tensor(data: bytes, fqn: str) -> torch.Tensor:
    # torch's restricted unpickler: it rebuilds plain tensors and refuses to call anything else.
    tensor = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(tensor, torch.Tensor):
        raise _refuse(f"the pickled tensor {fqn!r} holds a {type(tensor).__name__}")
    return tensor


def _sanitized(program: Any) -> Any:
    """The program without the strings torch turns into code or comments (nothing it runs)."""
    program.guards_code = []
    module = program.graph_module
    module.metadata = {}
    module.treespec_namedtuple_fields = {}
    module.module_call_graph = [e for e in module.module_call_graph if e.fqn == ""]
    for node in module.graph.nodes:
        node.metadata = {}
    return program


def load_exported_program(
    path: StrPath,
    device: str | torch.device = "cpu",
    *,
    allow_pickled_weights: bool = False,
) -> torch.export.ExportedProgram:
    """Build the ``ExportedProgram`` in the archive at ``path``, on ``device``, without pickle.

    Runs every check of ``inspect_archive`` first. ``allow_pickled_weights`` (the local CLI's
    opt-in for an author's own file, never used by the service) reads weights and constants
    marked ``use_pickle`` with torch's ``weights_only`` unpickler instead of refusing them;
    sample inputs are never read either way.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer
    from torch.export.passes import move_to_device_pass

    check_member_count(path, "torch.export archive")
    with zipfile.ZipFile(path) as zf:
        try:
            contents = _inspect(zf, schema, None, allow_pickled_weights)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
            raise _refuse(f"it is not a readable zip archive ({exc})") from exc
        weights = _read_payloads(
            zf, contents.top, pt2.WEIGHTS_DIR, contents.weights, _load_pickled_tensor
        )
        constants = _read_payloads(
            zf, contents.top, pt2.CONSTANTS_DIR, contents.constants, _load_pickled_tensor
        )
    program = ExportedProgramDeserializer().deserialize(
        _sanitized(contents.program), weights, constants, None
    )
    # Moves the constants baked into the graph as well as parameters and buffers.
    return move_to_device_pass(program, torch.device(device))
