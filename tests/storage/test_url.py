"""open_storage and storage_from_settings: the URL setting picks and configures the backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import Settings
from storage import (
    LocalStorage,
    S3Storage,
    StorageConfigError,
    open_storage,
    storage_from_settings,
)
from tests.storage.conftest import CREDENTIALS, new_bucket


def test_a_file_url_is_a_local_folder(tmp_path: Path) -> None:
    store = open_storage(tmp_path.as_uri())
    assert isinstance(store, LocalStorage)
    assert store.root == tmp_path.resolve()
    assert store.url == tmp_path.resolve().as_uri()


def test_an_s3_url_is_bucket_and_prefix() -> None:
    store = open_storage("s3://models/prod/v1", endpoint="http://127.0.0.1:9")
    assert isinstance(store, S3Storage)
    assert (store.bucket, store.prefix) == ("models", "prod/v1")
    assert open_storage("s3://models", endpoint="http://127.0.0.1:9").url == "s3://models"


@pytest.mark.parametrize(
    "url",
    [
        "/var/lib/spatialbench",  # a bare path: say which backend
        "file://relative/path",
        "http://minio:9000/bucket",
        "s3:///prefix-without-bucket",
        "s3://bucket/p?endpoint=http://x",
        "s3://bucket/../escape",
    ],
)
def test_a_url_that_names_no_usable_backend_is_refused(url: str) -> None:
    with pytest.raises(StorageConfigError):
        open_storage(url)


def test_the_settings_default_is_the_local_storage_dir(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    store = storage_from_settings(settings)
    assert isinstance(store, LocalStorage)
    assert store.root == tmp_path.resolve() / "models"


def test_settings_from_the_environment_reach_the_s3_server(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket = new_bucket(s3_endpoint)
    for name, value in {
        "STORAGE_URL": f"s3://{bucket}/service",
        "S3_ENDPOINT_URL": s3_endpoint,
        "S3_ACCESS_KEY_ID": CREDENTIALS.access_key_id,
        "S3_SECRET_ACCESS_KEY": CREDENTIALS.secret_access_key,
        "STATE_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(f"SPATIALBENCH_{name}", value)
    settings = Settings()
    assert CREDENTIALS.secret_access_key not in repr(settings)
    store = storage_from_settings(settings)
    assert isinstance(store, S3Storage)
    store.put_bytes("ab/model", b"weights")
    # A second process with the same settings (another worker machine) sees the object.
    assert storage_from_settings(Settings()).read_bytes("ab/model") == b"weights"
