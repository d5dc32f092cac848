"""The local-directory backend: the embedded mode's default, and a shared volume's."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from storage.base import CHUNK_BYTES, write_atomically
from storage.errors import ObjectNotFoundError, StorageError
from storage.keys import validate_key, validate_prefix

__all__ = ["LocalStorage"]

# Writes are staged here and renamed into place. Its name starts with a dot, which no key
# segment may, so no key can reach it and listings skip it.
STAGING = ".partial"


class LocalStorage:
    """Objects as files under ``root``: key ``a/b`` is the file ``root/a/b``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def path(self, key: str) -> Path:
        """The file that holds ``key`` (validated; it cannot lie outside the root)."""
        return self.root.joinpath(*validate_key(key).split("/"))

    def _staging_file(self) -> tuple[int, Path]:
        # Staged in the root's own file system, so the final rename is atomic.
        staging = self.root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=staging)
        return fd, Path(name)

    def _commit(self, staged: Path, target: Path) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            _sync_dir(target.parent)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise StorageError(f"could not store {target.relative_to(self.root)}: {exc}") from exc

    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        target = self.path(key)
        source = Path(source)
        if move:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                _sync_dir(target.parent)
                return
            except OSError:
                pass  # another file system: copy through the staging folder, then remove
        fd, staged = self._staging_file()
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
                _sync_file(out)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        self._commit(staged, target)
        if move:
            source.unlink()

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        fd, staged = self._staging_file()
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                _sync_file(out)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        self._commit(staged, target)

    def _existing(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"no object {key!r} in {self.url}")
        return path

    def read_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def stream(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        handle = self._existing(key).open("rb")

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(chunk_bytes):
                    yield chunk

        return chunks()

    def fetch(self, key: str, target: Path) -> Path:
        return write_atomically(target, self.stream(key))

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        folder = validate_prefix(prefix)
        base = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not base.is_dir():
            return []
        keys: list[str] = []
        for directory, subdirs, files in os.walk(base):
            # Staging files and anything else hidden are not objects.
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            rel = Path(directory).relative_to(self.root)
            keys.extend((rel / f).as_posix() for f in files if not f.startswith("."))
        return sorted(keys)


# A stored object must survive a power cut once put returns: a finished result is recorded in
# the database only after it is stored, and a model only after its upload is.
def _sync_file(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
