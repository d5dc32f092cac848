"""Receiving a model file: stream it to disk with a size cap, hash it, check it, store it by hash.

The request body is parsed as it arrives (``python-multipart``'s streaming parser), file bytes
go straight into a temporary file in the API's own staging folder (``<state_dir>/incoming``,
outside the store, which may be object storage) and into a sha256, and nothing larger than a
text field is ever held in memory. A file that passes the checks is put into the storage under
``model_key(sha256)`` (a rename on the local backend); any other outcome deletes the temporary
file.

The checks never unpickle: safetensors headers and tensors are read by ``safetensors``, and a
torch.export archive is inspected as a zip plus its JSON program (``check_export_archive``);
archives that would need pickle are refused. Its pickled sample inputs, which nothing reads, are
cut out of the stored copy (``strip_sample_inputs``, zip handling only). The program runs only
inside the worker's sandbox.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import BadRequest, IncompatibleArchitecture, InvalidInput, UploadTooLarge
from api.services.benchmarks import fits
from api.urls import api_path
from evaluator.benchmarks import BenchmarkSpec
from evaluator.models.loading import (
    ModelFormat,
    check_export_archive,
    check_safetensors,
    detect_format,
)
from evaluator.models.pt2 import strip_sample_inputs
from evaluator.models.registry import ArchitectureSpec, get_architecture
from storage import Storage, model_key

__all__ = [
    "FILE_FIELD",
    "StagedUpload",
    "check_architecture_fits",
    "check_model_file",
    "discard",
    "receive_multipart",
    "staging_dir",
    "store_file",
]

FILE_FIELD = "file"
# Text fields are small (the longest is a description); the file is the only big part.
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
# Room for the boundaries, part headers and text fields around the file.
FORM_OVERHEAD_BYTES = MAX_FIELDS * MAX_FIELD_BYTES


@dataclass
class StagedUpload:
    """An uploaded file in the staging folder, with its sha256 and size, and the text fields."""

    fields: dict[str, str]
    path: Path | None = None
    filename: str | None = None
    sha256: str = ""
    size: int = 0
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)


def staging_dir(state_dir: Path) -> Path:
    """Where uploads are received: the API's own disk, never the (maybe remote) store."""
    path = state_dir / "incoming"
    path.mkdir(parents=True, exist_ok=True)
    return path


def discard(upload: StagedUpload | None) -> None:
    """Delete the staged file, if any (idempotent)."""
    if upload is not None and upload.path is not None:
        with contextlib.suppress(FileNotFoundError):
            upload.path.unlink()
        upload.path = None


def _too_large(max_bytes: int) -> UploadTooLarge:
    return UploadTooLarge(
        f"The upload is larger than the limit of {max_bytes} bytes "
        f"({max_bytes / 2**20:.1f} MiB); nothing was stored. Save the weights at reduced "
        "precision (float16 or bfloat16 in safetensors), or ask the operator to raise "
        "SPATIALBENCH_MAX_UPLOAD_BYTES."
    )


class _Receiver:
    """Callbacks for ``MultipartParser``: text fields into memory, the file part to disk."""

    def __init__(self, staging: Path, max_bytes: int) -> None:
        self.staging = staging
        self.max_bytes = max_bytes
        self.upload = StagedUpload(fields={})
        self._file: IO[bytes] | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._data = bytearray()
        self._is_file = False

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._name = ""
        self._data = bytearray()
        self._is_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadRequest("A multipart part has no name in its Content-Disposition header.")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options or self._name == FILE_FIELD:
            if self._name != FILE_FIELD:
                raise InvalidInput(
                    f"Upload the model as the form field {FILE_FIELD!r} "
                    f"(curl -F {FILE_FIELD}=@model.safetensors), not {self._name!r}."
                )
            if self.upload.path is not None:
                raise InvalidInput("Upload exactly one model file per submission.")
            self._is_file = True
            fd, name = tempfile.mkstemp(dir=self.staging, prefix="upload-", suffix=".part")
            self.upload.path = Path(name)
            self._file = os.fdopen(fd, "wb")
            raw_filename = options.get(b"filename")
            self.upload.filename = raw_filename.decode("utf-8", "replace") if raw_filename else None
        else:
            if len(self.upload.fields) >= MAX_FIELDS:
                raise InvalidInput(f"Too many form fields (more than {MAX_FIELDS}).")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            assert self._file is not None
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise _too_large(self.max_bytes)
            self.upload._hash.update(chunk)
            self._file.write(chunk)
        else:
            if len(self._data) + len(chunk) > MAX_FIELD_BYTES:
                raise InvalidInput(
                    f"The form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes."
                )
            self._data.extend(chunk)

    def on_part_end(self) -> None:
        if self._is_file:
            assert self._file is not None
            self._file.close()
            self._file = None
        else:
            if self._name in self.upload.fields:
                raise InvalidInput(f"The form field {self._name!r} is given more than once.")
            self.upload.fields[self._name] = self._data.decode("utf-8", "replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive_multipart(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
    state_dir: Path,
    max_bytes: int,
) -> StagedUpload:
    """Parse a ``multipart/form-data`` body as it streams in.

    The part named ``file`` is written to a temporary file in ``<state_dir>/incoming`` and
    hashed; the other parts are returned as text fields. Raises ``UploadTooLarge`` (413) once
    the file passes ``max_bytes`` (or at once when the declared length says it will),
    ``InvalidInput``/``BadRequest`` for a malformed form; the temporary file is deleted on
    every error. The caller owns the returned file: ``store_file`` or ``discard`` it.
    """
    mime, params = parse_options_header(content_type or "")
    if mime != b"multipart/form-data" or b"boundary" not in params:
        raise BadRequest(
            "Send the model as multipart/form-data: curl -F file=@model.safetensors "
            "-F display_name=... -F benchmark=... (see /docs)."
        )
    if content_length and content_length.isdigit():
        if int(content_length) > max_bytes + FORM_OVERHEAD_BYTES:
            raise _too_large(max_bytes)
    receiver = _Receiver(staging_dir(state_dir), max_bytes)
    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": receiver.on_part_begin,
            "on_part_data": receiver.on_part_data,
            "on_part_end": receiver.on_part_end,
            "on_header_field": receiver.on_header_field,
            "on_header_value": receiver.on_header_value,
            "on_header_end": receiver.on_header_end,
            "on_headers_finished": receiver.on_headers_finished,
        },
    )
    try:
        async for chunk in body:
            if chunk:
                parser.write(chunk)
        parser.finalize()
        if receiver._file is not None:
            raise BadRequest("The multipart body ended in the middle of the file; upload again.")
    except FormParserError as exc:
        receiver.close()
        discard(receiver.upload)
        raise BadRequest(f"The multipart body is malformed ({exc}).") from exc
    except BaseException:
        # Includes the client going away (ClientDisconnect) and our own 413/422.
        receiver.close()
        discard(receiver.upload)
        raise
    upload = receiver.upload
    upload.sha256 = upload._hash.hexdigest()
    return upload


def check_architecture_fits(arch: ArchitectureSpec, benchmark: BenchmarkSpec) -> None:
    """Refuse an architecture whose input does not match the benchmark's images."""
    want = (benchmark.channels, *benchmark.image_size)
    have = (arch.in_channels, *arch.input_size)
    if not fits(arch, benchmark):
        raise IncompatibleArchitecture(
            f"Architecture {arch.name!r} takes {have[0]}x{have[1]}x{have[2]} inputs but "
            f"benchmark {benchmark.name!r} has {want[0]}x{want[1]}x{want[2]} images. Pick an "
            f"architecture for this benchmark (GET {api_path('/benchmarks')} lists them), or "
            "upload a torch.export archive (.pt2) of your model instead."
        )


def check_model_file(
    path: Path,
    benchmark: BenchmarkSpec,
    architecture: str | None,
    max_unpacked_bytes: int | None = None,
) -> ModelFormat:
    """Check a staged model file for ``benchmark``; returns its format.

    safetensors: needs ``architecture``; keys, shapes, dtypes and finiteness must fit it with
    the benchmark's number of classes. torch.export (``architecture`` must be empty): the zip,
    the weights' layout and the program are checked without unpickling or running anything,
    and the pickled sample inputs are then removed from the staged file, so the stored archive
    holds only JSON and raw tensor bytes (the submission keeps the uploaded file's sha256 and
    size, which identify the upload). Raises the evaluator's ``ModelFormatError`` /
    ``WeightsMismatchError`` / ``UnknownArchitectureError`` or ``InvalidInput``. CPU-bound
    (reads every tensor): call it from a worker thread.
    """
    fmt = detect_format(path)
    if fmt is ModelFormat.SAFETENSORS:
        if not architecture:
            raise InvalidInput(
                "safetensors files hold weights only: give the architecture they belong to "
                "in the form field 'architecture' "
                f"(GET {api_path('/architectures')} lists them), or "
                "upload a torch.export archive (.pt2) instead."
            )
        arch = get_architecture(architecture)
        check_architecture_fits(arch, benchmark)
        check_safetensors(path, arch.name, benchmark.num_classes)
        return ModelFormat.SAFETENSORS
    if architecture:
        raise InvalidInput(
            "This is a torch.export archive, which carries its own architecture: leave the "
            "field 'architecture' empty (it applies to safetensors weights only)."
        )
    check_export_archive(path, max_bytes=max_unpacked_bytes)
    strip_sample_inputs(path)
    return ModelFormat.EXPORT


def store_file(upload: StagedUpload, storage: Storage) -> tuple[str, bool]:
    """Put the staged file into ``storage`` under ``model_key(sha256)``.

    Returns the key and whether this call stored it. When an object with that hash is already
    stored (the same bytes), the staged copy is deleted instead.
    """
    assert upload.path is not None and upload.sha256, "store_file needs a received file"
    key = model_key(upload.sha256)
    if storage.exists(key):
        discard(upload)
        return key, False
    # Readable by the worker's user when the store is a shared local folder.
    os.chmod(upload.path, 0o644)
    # The local backend renames (atomic on one file system); S3 uploads then removes the source.
    storage.put_file(key, upload.path, move=True)
    upload.path = None
    return key, True
