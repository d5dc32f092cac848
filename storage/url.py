"""The backend named by a URL setting: ``file:///path`` or ``s3://bucket/prefix``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from storage.base import Storage
from storage.errors import StorageConfigError
from storage.local import LocalStorage
from storage.s3 import S3Credentials, S3Storage

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["open_storage", "storage_from_settings"]


def open_storage(
    url: str,
    *,
    endpoint: str | None = None,
    credentials: S3Credentials | None = None,
    region: str = "us-east-1",
) -> Storage:
    """The storage at ``url``; ``endpoint``, ``credentials`` and ``region`` apply to ``s3://``.

    >>> open_storage("file:///var/lib/spatialbench/models").url
    'file:///var/lib/spatialbench/models'
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StorageConfigError(
                f"storage URL {url!r}: a local folder is file:///absolute/path (three slashes)"
            )
        return LocalStorage(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageConfigError(f"storage URL {url!r} names no bucket: use s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise StorageConfigError(
                f"storage URL {url!r}: put the endpoint and credentials in their own settings, "
                "not in the URL"
            )
        return S3Storage(
            parts.netloc,
            prefix=parts.path.lstrip("/"),
            endpoint=endpoint,
            credentials=credentials,
            region=region,
        )
    raise StorageConfigError(
        f"storage URL {url!r}: use file:///absolute/path (a local folder) or s3://bucket/prefix"
    )


def storage_from_settings(settings: Settings) -> Storage:
    """The storage the settings name (``storage_url`` and the ``s3_*`` settings)."""
    assert settings.storage_url is not None  # filled in by the settings' defaults
    credentials = None
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        credentials = S3Credentials(
            settings.s3_access_key_id, settings.s3_secret_access_key.get_secret_value()
        )
    return open_storage(
        settings.storage_url,
        endpoint=settings.s3_endpoint_url,
        credentials=credentials,
        region=settings.s3_region,
    )
