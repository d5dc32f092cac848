"""The S3-compatible backend (AWS S3, MinIO, Ceph, ...), through obstore.

obstore is a thin binding of the Rust ``object_store`` crate: uploads larger than one chunk go
up as multipart uploads (which S3 makes visible only once complete, so every write is atomic),
downloads come down as a stream of chunks, and nothing is held whole in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import S3Store

from storage.base import CHUNK_BYTES, write_atomically
from storage.errors import (
    InvalidKeyError,
    ObjectNotFoundError,
    StorageConfigError,
    StorageError,
)
from storage.keys import validate_key, validate_prefix

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

__all__ = ["S3Credentials", "S3Storage"]

# S3's bucket naming rules (lowercase, digits, dots, hyphens; 3 to 63 characters).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


class S3Storage:
    """Objects in ``bucket`` under ``prefix``: key ``a/b`` is the S3 key ``prefix/a/b``.

    ``endpoint`` is the server's URL for anything but AWS itself (``http://minio:9000``);
    plain ``http`` is allowed only when the endpoint says so. Without ``credentials`` the usual
    AWS sources apply (``AWS_ACCESS_KEY_ID``..., an instance role).
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str | None = None,
        credentials: S3Credentials | None = None,
        region: str = "us-east-1",
    ) -> None:
        if not _BUCKET.fullmatch(bucket):
            raise StorageConfigError(
                f"{bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, '.', '-')"
            )
        self.bucket = bucket
        try:
            self.prefix = validate_prefix(prefix)
        except InvalidKeyError as exc:
            raise StorageConfigError(f"S3 prefix {prefix!r}: {exc}") from exc
        self.endpoint = endpoint
        config: S3Config = {"region": region}
        client: ClientConfig = {}
        if endpoint is not None:
            if not endpoint.startswith(("http://", "https://")):
                raise StorageConfigError(
                    f"S3 endpoint {endpoint!r} must be an http:// or https:// URL"
                )
            config["endpoint"] = endpoint
            # Self-hosted servers (MinIO) are addressed by path, not by bucket subdomain.
            config["virtual_hosted_style_request"] = False
            client["allow_http"] = endpoint.startswith("http://")
        if credentials is not None:
            config["access_key_id"] = credentials.access_key_id
            config["secret_access_key"] = credentials.secret_access_key
            if credentials.session_token:
                config["session_token"] = credentials.session_token
        self._store = S3Store(
            bucket, prefix=self.prefix or None, config=config, client_options=client
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self.endpoint!r})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _call(self, key: str, operation: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one obstore call, turning its errors into this package's."""
        try:
            return operation(self._store, key, *args, **kwargs)
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.url}") from exc
        except (ObstoreError, OSError) as exc:
            raise StorageError(f"{self.url}: {key!r}: {exc}") from exc

    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        key = validate_key(key)
        source = Path(source)
        with source.open("rb") as handle:
            self._call(key, obstore.put, handle, chunk_size=CHUNK_BYTES)
        if move:
            source.unlink()

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(validate_key(key), obstore.put, data, use_multipart=False)

    def read_bytes(self, key: str) -> bytes:
        return bytes(self._call(validate_key(key), obstore.get).bytes())

    def stream(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        result = self._call(validate_key(key), obstore.get)

        def chunks() -> Iterator[bytes]:
            for chunk in result.stream(min_chunk_size=chunk_bytes):
                yield bytes(chunk)

        return chunks()

    def fetch(self, key: str, target: Path) -> Path:
        key = validate_key(key)
        target = Path(target)
        result = self._call(key, obstore.get)
        expected = int(result.meta["size"])
        try:
            return write_atomically(
                target, result.stream(min_chunk_size=CHUNK_BYTES), expected=expected
            )
        except OSError as exc:
            raise StorageError(f"{self.url}: {key!r}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._call(validate_key(key), obstore.head)["size"])

    def delete(self, key: str) -> None:
        self._call(validate_key(key), obstore.delete)

    def list(self, prefix: str = "") -> list[str]:
        folder = validate_prefix(prefix)
        try:
            pages = obstore.list(self._store, folder or None)
            return sorted(meta["path"] for page in pages for meta in page)
        except (ObstoreError, OSError) as exc:
            raise StorageError(f"{self.url}: listing {folder!r}: {exc}") from exc
