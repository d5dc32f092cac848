"""The storage contract, run against both backends: the local directory and S3 (a real server
process). Each test does one thing; the same test must pass on both."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import (
    CHUNK_BYTES,
    InvalidKeyError,
    ObjectNotFoundError,
    Storage,
)

BAD_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "a/../../outside",
    "a/./b",
    "a//b",
    "a/b/",
    ".partial/x",
    "a/.hidden",
    "a\\..\\b",
    "a b",
    "a/b\x00c",
    "x" * 1025,
]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _large_file(path: Path, size: int) -> Path:
    """Incompressible bytes, so a wrong chunk boundary shows as a wrong hash."""
    with path.open("wb") as out:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 2**20))
            out.write(block)
            remaining -= len(block)
    return path


def test_both_backends_implement_the_interface(store: Storage) -> None:
    assert isinstance(store, Storage)


def test_bytes_round_trip_and_overwrite(store: Storage) -> None:
    store.put_bytes("shards/s1/000000.json", b'{"shard": 0}')
    assert store.read_bytes("shards/s1/000000.json") == b'{"shard": 0}'
    store.put_bytes("shards/s1/000000.json", b"{}")
    assert store.read_bytes("shards/s1/000000.json") == b"{}"
    assert store.size("shards/s1/000000.json") == 2


def test_empty_object(store: Storage) -> None:
    store.put_bytes("empty", b"")
    assert store.exists("empty")
    assert store.size("empty") == 0
    assert store.read_bytes("empty") == b""


def test_a_large_file_goes_up_and_comes_back_in_chunks(store: Storage, tmp_path: Path) -> None:
    # Over two chunks: the S3 backend sends it as a multipart upload.
    size = 2 * CHUNK_BYTES + 12345
    source = _large_file(tmp_path / "model.safetensors", size)
    store.put_file("ab/model", source)
    assert store.size("ab/model") == size
    assert source.exists()  # a copy, not a move

    fetched = store.fetch("ab/model", tmp_path / "fetched")
    assert fetched == tmp_path / "fetched"
    assert _sha256(fetched) == _sha256(source)

    digest, chunks = hashlib.sha256(), 0
    for chunk in store.stream("ab/model", chunk_bytes=2**20):
        assert len(chunk) <= CHUNK_BYTES  # never the whole object at once
        digest.update(chunk)
        chunks += 1
    assert digest.hexdigest() == _sha256(source)
    assert chunks > 1


def test_put_file_with_move_consumes_the_source(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "upload.partial"
    source.write_bytes(b"weights")
    store.put_file("cd/weights", source, move=True)
    assert not source.exists()
    assert store.read_bytes("cd/weights") == b"weights"


def test_exists_size_and_delete(store: Storage) -> None:
    assert not store.exists("examples/s1/00.png")
    store.put_bytes("examples/s1/00.png", b"\x89PNG")
    assert store.exists("examples/s1/00.png")
    assert store.size("examples/s1/00.png") == 4
    store.delete("examples/s1/00.png")
    assert not store.exists("examples/s1/00.png")
    store.delete("examples/s1/00.png")  # deleting what is gone is not an error


@pytest.mark.parametrize("operation", ["read_bytes", "stream", "size"])
def test_a_missing_object_is_not_found(store: Storage, operation: str) -> None:
    with pytest.raises(ObjectNotFoundError):
        getattr(store, operation)("no/such/object")


def test_a_missing_object_is_not_fetched_and_leaves_no_file(store: Storage, tmp_path: Path) -> None:
    target = tmp_path / "downloads"
    target.mkdir()
    with pytest.raises(ObjectNotFoundError):
        store.fetch("no/such/object", target / "model")
    assert list(target.iterdir()) == []


def test_a_missing_object_is_also_a_file_not_found_error(store: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nothing")


def test_list_by_prefix_goes_by_whole_segments(store: Storage) -> None:
    for key in ("shards/s1/000001.json", "shards/s1/000000.json", "shards/s10/000000.json",
                "shards/s1/deep/x", "examples/s1/00.png"):  # fmt: skip
        store.put_bytes(key, b"x")
    assert store.list("shards/s1") == [
        "shards/s1/000000.json",
        "shards/s1/000001.json",
        "shards/s1/deep/x",
    ]
    assert store.list("shards/s1/") == store.list("shards/s1")
    assert store.list("shards/s") == []
    assert store.list("nothing/here") == []
    assert store.list() == sorted(
        [
            "examples/s1/00.png",
            "shards/s1/000000.json",
            "shards/s1/000001.json",
            "shards/s1/deep/x",
            "shards/s10/000000.json",
        ]  # fmt: skip
    )


@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_bad_key_is_refused_before_anything_is_touched(
    store: Storage, key: str, tmp_path: Path
) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    operations: list[Callable[[], object]] = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, source),
        lambda: store.read_bytes(key),
        lambda: store.stream(key),
        lambda: store.fetch(key, tmp_path / "out"),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.delete(key),
    ]
    for operation in operations:
        with pytest.raises(InvalidKeyError):
            operation()
    assert store.list() == []
    # Nothing written anywhere: not in the store (the local one's root is tmp_path/store, never
    # created), not beside it, not at the fetch target.
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("prefix", ["../", "/abs", "a//b"])
def test_a_bad_prefix_is_refused(store: Storage, prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.list(prefix)


def test_keys_may_carry_dots_dashes_and_equals_inside_names(store: Storage) -> None:
    store.put_bytes("a-b/c_d/e=f/model.v2.safetensors", b"x")
    assert store.list("a-b") == ["a-b/c_d/e=f/model.v2.safetensors"]
