"""The one interface both backends implement."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["Storage", "CHUNK_BYTES"]

# Models are up to hundreds of MB: every read and write moves them in pieces of this size, so
# memory stays flat whatever the object's size.
CHUNK_BYTES = 8 * 2**20


@runtime_checkable
class Storage(Protocol):
    """Objects (models, example images, shard results) stored under validated keys.

    Writes are atomic: a reader sees the whole new object or the old one (or none), never a
    part. Keys are checked by ``storage.keys.validate_key``; a bad one raises
    ``InvalidKeyError`` before anything is touched. A missing object raises
    ``ObjectNotFoundError``. A key must not also be the folder of other keys (``a`` and
    ``a/b``): S3 allows it, a directory does not.
    """

    @property
    def url(self) -> str:
        """Where the objects are (``file:///...`` or ``s3://bucket/prefix``), no credentials."""
        ...

    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        """Store the file at ``source`` under ``key``, streamed. ``move=True`` consumes the
        source (a rename where the backend can), so a large upload is not copied twice."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The whole object in memory (for small objects: shard results, images)."""
        ...

    def stream(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The object in chunks of about ``chunk_bytes``. A missing key raises here, not on
        the first ``next``."""
        ...

    def fetch(self, key: str, target: Path) -> Path:
        """Copy the object to the local file ``target`` (atomically: a partial download never
        appears under that name) and return ``target``."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """The object's size in bytes."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; removing one that is not there is not an error (as in S3)."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under the folder ``prefix`` (by whole segments: ``a/b`` lists ``a/b/c``
        but not ``a/bc``); ``""`` lists everything."""
        ...


def write_atomically(target: Path, chunks: Iterable[bytes], expected: int | None = None) -> Path:
    """Write ``chunks`` to ``target`` through a hidden file beside it, renamed into place only
    once complete (``expected`` bytes, when given), so a reader never sees a partial file."""
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        written = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
        if expected is not None and written != expected:
            raise OSError(f"the copy stopped at {written} of {expected} bytes")
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return target
