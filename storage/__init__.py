"""Object storage for models, example images and shard results, behind one interface.

Two backends: ``LocalStorage`` (a directory: the embedded default, or a volume shared by the
API and the workers) and ``S3Storage`` (S3-compatible object storage, so workers on other
machines need no shared disk). ``open_storage(url)`` picks one from ``file:///path`` or
``s3://bucket/prefix``; ``storage_from_settings`` from the service's settings. This package is
the bottom layer: it imports nothing of the project but the settings' type.
"""

from storage.base import CHUNK_BYTES, Storage
from storage.errors import (
    InvalidKeyError,
    ObjectNotFoundError,
    StorageConfigError,
    StorageError,
)
from storage.keys import (
    example_key,
    model_key,
    shard_example_key,
    shard_result_key,
    shards_prefix,
    validate_key,
)
from storage.local import LocalStorage
from storage.s3 import S3Credentials, S3Storage
from storage.url import open_storage, storage_from_settings

__all__ = [
    "CHUNK_BYTES",
    "InvalidKeyError",
    "LocalStorage",
    "ObjectNotFoundError",
    "S3Credentials",
    "S3Storage",
    "Storage",
    "StorageConfigError",
    "StorageError",
    "example_key",
    "model_key",
    "open_storage",
    "shard_example_key",
    "shard_result_key",
    "shards_prefix",
    "storage_from_settings",
    "validate_key",
]
