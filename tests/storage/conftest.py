"""Fixtures of the storage tests: every test runs against both backends, the S3 one against a
real S3 server process (moto's server mode) started here on a free loopback port."""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from storage import LocalStorage, S3Credentials, S3Storage, Storage

# moto accepts any credentials; they are passed anyway, so requests are signed as in production.
CREDENTIALS = S3Credentials("test-access-key", "test-secret-key")
_buckets = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(endpoint: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the S3 server exited with {server.returncode}: {log.read_text()}")
        try:
            if httpx.get(endpoint, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the S3 server did not answer at {endpoint} within 60 s: {log.read_text()}")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of an S3 server (moto in server mode) running for this test session."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(endpoint, server, log)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def new_bucket(endpoint: str) -> str:
    """An empty bucket of its own for one test."""
    name = f"test-bucket-{next(_buckets)}"
    response = httpx.put(f"{endpoint}/{name}", timeout=10)
    assert response.status_code == 200, response.text
    return name


def s3_storage(endpoint: str, bucket: str, prefix: str = "") -> S3Storage:
    return S3Storage(bucket, prefix=prefix, endpoint=endpoint, credentials=CREDENTIALS)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """An empty store of each backend; the S3 one under a prefix, as production may use."""
    if backend == "local":
        return LocalStorage(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return s3_storage(endpoint, new_bucket(endpoint), prefix="spatialbench")
