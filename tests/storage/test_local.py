"""What only the local backend has: files on disk, a staging folder, renames."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from config.settings import Settings
from storage import LocalStorage, example_key, model_key, open_storage

SHA = "ab" + "0" * 62


def test_a_failed_write_leaves_the_old_object_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStorage(tmp_path / "store")
    store.put_bytes("ab/model", b"old weights")
    source = tmp_path / "new"
    source.write_bytes(b"new weights" * 1000)

    def copy_half_then_fail(src, dst, length=0):
        dst.write(src.read(100))
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", copy_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.put_file("ab/model", source)
    assert store.read_bytes("ab/model") == b"old weights"
    assert list((tmp_path / "store" / ".partial").iterdir()) == []


def test_staged_files_are_not_objects(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("a/b", b"x")
    (tmp_path / ".partial" / "tmp123").write_bytes(b"half")
    assert store.list() == ["a/b"]


def test_a_key_is_the_file_of_the_same_path_under_the_root(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("examples/s1/00.png", b"png")
    assert (tmp_path / "examples" / "s1" / "00.png").read_bytes() == b"png"
    assert store.path("examples/s1/00.png") == tmp_path / "examples" / "s1" / "00.png"


def test_the_default_store_keeps_the_layout_the_service_already_has(tmp_path: Path) -> None:
    """Wiring the storage into the upload path and the pages moves no existing file: by
    default it is the storage_dir, a model's key is its old path there, and so is an example's."""
    settings = Settings(state_dir=tmp_path)
    store = open_storage(str(settings.storage_url))
    assert isinstance(store, LocalStorage)
    assert store.path(model_key(SHA)) == settings.model_path(SHA)
    assert settings.storage_dir is not None
    assert store.path(example_key("s1", "00_original")) == (
        settings.storage_dir / "examples" / "s1" / "00_original.png"
    )


def test_fetch_replaces_an_existing_target(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    store.put_bytes("m", b"new")
    target = tmp_path / "m"
    target.write_bytes(b"stale")
    store.fetch("m", target)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "store"]
