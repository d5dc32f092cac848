"""What only the S3 backend has: a bucket, a key prefix, a server that can be wrong."""

from __future__ import annotations

import re

import httpx
import pytest

from storage import S3Storage, StorageConfigError, StorageError
from tests.storage.conftest import CREDENTIALS, new_bucket, s3_storage


def _raw_keys(endpoint: str, bucket: str) -> list[str]:
    """The keys in the bucket as the server lists them, past this package."""
    listing = httpx.get(f"{endpoint}/{bucket}", timeout=10).text
    return sorted(re.findall(r"<Key>([^<]+)</Key>", listing))


def test_objects_live_under_the_prefix_in_the_bucket(s3_endpoint: str) -> None:
    bucket = new_bucket(s3_endpoint)
    s3_storage(s3_endpoint, bucket, prefix="prod/v1").put_bytes("ab/model", b"x")
    assert _raw_keys(s3_endpoint, bucket) == ["prod/v1/ab/model"]


def test_two_prefixes_in_one_bucket_do_not_see_each_other(s3_endpoint: str) -> None:
    bucket = new_bucket(s3_endpoint)
    one, two = s3_storage(s3_endpoint, bucket, "one"), s3_storage(s3_endpoint, bucket, "two")
    one.put_bytes("k", b"1")
    assert not two.exists("k")
    assert two.list() == []
    assert one.list() == ["k"]


def test_a_missing_bucket_is_a_storage_error(s3_endpoint: str) -> None:
    store = s3_storage(s3_endpoint, "no-such-bucket")
    with pytest.raises(StorageError):
        store.put_bytes("k", b"x")


def test_a_server_that_is_not_there_is_a_storage_error() -> None:
    store = S3Storage("bucket", endpoint="http://127.0.0.1:9", credentials=CREDENTIALS)
    with pytest.raises(StorageError):
        store.list()


@pytest.mark.parametrize("bucket", ["", "UPPER", "a", "under_score", "x" * 64])
def test_a_bad_bucket_name_is_refused(bucket: str) -> None:
    with pytest.raises(StorageConfigError, match="bucket"):
        S3Storage(bucket)


def test_the_endpoint_must_be_an_http_url() -> None:
    with pytest.raises(StorageConfigError, match="endpoint"):
        S3Storage("bucket", endpoint="minio:9000")


def test_the_url_names_bucket_and_prefix_and_never_the_secret() -> None:
    store = S3Storage("bucket", prefix="p/q", endpoint="http://h:1", credentials=CREDENTIALS)
    assert store.url == "s3://bucket/p/q"
    assert CREDENTIALS.secret_access_key not in repr(store)
    assert CREDENTIALS.secret_access_key not in repr(CREDENTIALS)
