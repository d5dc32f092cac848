"""What can go wrong with stored objects, as types a caller can catch one by one."""

from __future__ import annotations


class StorageError(Exception):
    """Anything the object storage refused or could not do."""


class InvalidKeyError(StorageError, ValueError):
    """A key (or prefix) that could escape the store or that a backend could read differently."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object is stored under the key."""


class StorageConfigError(StorageError, ValueError):
    """A storage URL or setting that names no usable backend."""
