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
This module reads the zip and its members; the checks of the program live in
`evaluator.models.pt2_program`, those of the tensors and their reading in
`evaluator.models.pt2_tensors`, and the member count in `evaluator.models.zips`.

Layout of a torch 2.14 ``torch.export.save`` archive: a zip of stored entries under one top
folder ``<top>``: ``archive_format`` (``pt2``), ``archive_version``, ``byteorder``,
``.data/version``, ``.data/serialization_id``, ``models/model.json``,
``data/weights/model_weights_config.json`` and ``weight_<i>``,
``data/constants/model_constants_config.json`` and ``tensor_<i>``, and
``data/sample_inputs/model.pt``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch.export.pt2_archive import constants as pt2

from evaluator.models.pt2_program import check_program
from evaluator.models.pt2_rules import refuse
from evaluator.models.pt2_tensors import check_payloads, load_pickled_tensor, read_payloads
from evaluator.models.zips import check_member_count

__all__ = [
    "ArchiveContents",
    "inspect_archive",
    "load_exported_program",
    "strip_sample_inputs",
]

StrPath = str | os.PathLike[str]

_MODEL = "model"
_MAX_JSON_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ArchiveContents:
    """What ``inspect_archive`` found: the program and where each tensor's bytes are."""

    top: str
    program: Any  # torch._export.serde.schema.ExportedProgram
    weights: Mapping[str, Any]  # fqn -> schema.PayloadMeta
    constants: Mapping[str, Any]
    sample_inputs: tuple[str, ...]  # members never read; stripped from stored uploads


# --- The members --------------------------------------------------------------------------------


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
        raise refuse(f"{what} is {info.file_size} bytes, more than the {limit} allowed")
    return zf.read(info)


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise refuse(f"{what} is not valid JSON ({type(exc).__name__})") from None


def _to_dataclass(cls: Any, data: Any, what: str) -> Any:
    from torch._export.serde.serialize import _dict_to_dataclass

    try:
        return _dict_to_dataclass(cls, data)
    except Exception as exc:  # the data is hostile: any failure means "not a program"
        raise refuse(f"{what} does not follow torch.export's schema ({exc!s:.200})") from None


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
        raise refuse(f"it is not a readable zip archive ({exc})") from exc


def _index(zf: zipfile.ZipFile, max_bytes: int | None) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The archive's top folder and its members by name, refusing unsafe or oversized zips."""
    infos = zf.infolist()
    if not infos:
        raise refuse("it is an empty zip")
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        # ``orig_filename`` is the name as stored, before zipfile cuts it at a NUL.
        name = info.orig_filename
        reason = _unsafe_member_reason(name)
        if reason is not None:
            raise refuse(f"member name {name!r} {reason}")
        if name in by_name:
            raise refuse(f"member {name!r} appears more than once")
        if info.flag_bits & 0x1:
            raise refuse(f"member {name!r} is encrypted")
        by_name[name] = info
    tops = {name.split("/", 1)[0] for name in by_name}
    if len(tops) != 1 or any("/" not in name for name in by_name):
        shown = ", ".join(sorted(tops)[:10])
        raise refuse(
            f"its members must all live under one top folder, as torch.export.save writes them "
            f"(found {shown})"
        )
    total = sum(info.file_size for info in infos)
    if max_bytes is not None and total > max_bytes:
        raise refuse(f"it unpacks to {total} bytes, more than the limit of {max_bytes} bytes")
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
            raise refuse(f"member {name!r} is {_unknown_member_reason(rel)}")
        kinds.setdefault(kind, name)
    for kind, rel in (
        (_Member.FORMAT, pt2.ARCHIVE_FORMAT_PATH),
        (_Member.VERSION, pt2.ARCHIVE_VERSION_PATH),
        (_Member.PROGRAM, pt2.MODELS_FILENAME_FORMAT.format(_MODEL)),
    ):
        if kind not in kinds:
            raise refuse(f"it lacks {top}/{rel}")
    return kinds


def _check_markers(zf: zipfile.ZipFile, kinds: Mapping[_Member, str]) -> None:
    if _read_small(zf, zf.getinfo(kinds[_Member.FORMAT]), 16, "archive_format") != b"pt2":
        raise refuse(f"{kinds[_Member.FORMAT]} does not read 'pt2'")
    version = _read_small(zf, zf.getinfo(kinds[_Member.VERSION]), 16, "archive_version")
    if version != pt2.ARCHIVE_VERSION_VALUE.encode():
        raise refuse(
            f"its archive version {version!r} is not the {pt2.ARCHIVE_VERSION_VALUE!r} that "
            f"PyTorch {torch.__version__.split('+')[0]} reads; re-save it with this version"
        )
    if _Member.BYTEORDER in kinds:
        order = _read_small(zf, zf.getinfo(kinds[_Member.BYTEORDER]), 16, "byteorder")
        if order != b"little":
            raise refuse(
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
        raise refuse(f"{kinds[kind]} is not a mapping of tensors")
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
        check_payloads(label, config, prefix, directory, by_name, top, allow_pickled)
    program = _read_json(zf, kinds[_Member.PROGRAM], schema.ExportedProgram)
    check_program(program, weights, constants)
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
            raise refuse(f"it is not a readable zip archive ({exc})") from exc
        weights = read_payloads(
            zf, contents.top, pt2.WEIGHTS_DIR, contents.weights, load_pickled_tensor
        )
        constants = read_payloads(
            zf, contents.top, pt2.CONSTANTS_DIR, contents.constants, load_pickled_tensor
        )
    program = ExportedProgramDeserializer().deserialize(
        _sanitized(contents.program), weights, constants, None
    )
    # Moves the constants baked into the graph as well as parameters and buffers.
    return move_to_device_pass(program, torch.device(device))
