"""The one interface both backends implement."""

from __future__ import annotations

from collections.abc import Iterator
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
