"""Object keys: one checked form for both backends, and where each kind of object lives.

A key is a relative, ``/``-separated path such as ``ab/ab12...ef`` or ``examples/ID/00.png``.
Every segment is made of letters, digits, ``_``, ``-``, ``=`` and ``.`` and does not start with
a dot, so a key can never name a parent (``..``), the current folder, a hidden file or the
local backend's staging folder, and it reads the same as a file path and as an S3 key.
"""

from __future__ import annotations

import re
from typing import Any

from storage.errors import InvalidKeyError

__all__ = [
    "EXAMPLE_NAME",
    "example_key",
    "example_name",
    "model_key",
    "shard_example_key",
    "shard_result_key",
    "shards_prefix",
    "validate_key",
    "validate_prefix",
]

MAX_KEY_LENGTH = 1024  # S3's limit on a key, in bytes (keys here are ASCII)
_SEGMENT = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]*")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key; raise InvalidKeyError saying why if not."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError("an object key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"an object key is at most {MAX_KEY_LENGTH} characters")
    if key.startswith("/"):
        raise InvalidKeyError(f"object key {key!r} is absolute; keys are relative to the store")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(
                f"object key {key!r} has an empty, '.' or '..' segment; use plain names "
                "separated by single slashes"
            )
        if not _SEGMENT.fullmatch(segment):
            raise InvalidKeyError(
                f"object key {key!r}: segment {segment!r} may use only letters, digits, "
                "'_', '-', '=' and '.', and may not start with '.'"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty (everything) or a key, with or without a trailing slash.
    Returned without the trailing slash."""
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    return validate_key(stripped) if stripped else ""


def model_key(sha256: str) -> str:
    """An uploaded model, stored by its hash (the local layout the service has always used:
    ``<storage_dir>/<sha256[:2]>/<sha256>``)."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InvalidKeyError(f"{sha256!r} is not a lowercase hex sha256")
    return f"{sha256[:2]}/{sha256}"


# The names the worker gives example images: ``NN_original`` and ``NN_transformed``.
EXAMPLE_NAME = re.compile(r"[0-9]{2}_(original|transformed)")
_EXAMPLES = "examples"


def example_key(submission_id: str, name: str) -> str:
    """An example image of an evaluation (``examples/<id>/<name>.png``, as the pages read it)."""
    return validate_key(f"{_EXAMPLES}/{submission_id}/{name}.png")


def example_name(submission_id: str, key: Any) -> str | None:
    """The name of the example image ``key`` of ``submission_id`` (the inverse of
    `example_key`), or None for anything else: another submission's key, another layout, a
    name the worker does not give (a stored record is only trusted this far)."""
    if not isinstance(key, str):
        return None
    prefix, suffix = f"{_EXAMPLES}/{submission_id}/", ".png"
    if not key.startswith(prefix) or not key.endswith(suffix):
        return None
    name = key[len(prefix) : -len(suffix)]
    return name if EXAMPLE_NAME.fullmatch(name) else None


def shards_prefix(submission_id: str) -> str:
    """Where the shards of an evaluation keep their results and example images until the
    merged result is recorded."""
    return validate_key(f"shards/{submission_id}")


def shard_result_key(submission_id: str, shard: int) -> str:
    """The result of one shard of an evaluation; zero-padded so listings sort by shard."""
    if shard < 0:
        raise InvalidKeyError(f"shard index {shard} is negative")
    return validate_key(f"{shards_prefix(submission_id)}/{shard:06d}.json")


def shard_example_key(submission_id: str, shard: int, name: str) -> str:
    """An example image one shard chose (the merge copies the chosen ones to `example_key`)."""
    if shard < 0:
        raise InvalidKeyError(f"shard index {shard} is negative")
    return validate_key(f"{shards_prefix(submission_id)}/{shard:06d}/{name}.png")
