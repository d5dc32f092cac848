"""``scripts/redis.sh stop; start`` brings Redis back at the same URL, so clients reconnect, and
with persistence on, with the queued messages (finding 8 of issue 10). A real redis-server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.worker.helpers import ROOT, wait_for

pytestmark = pytest.mark.timeout(120)

SCRIPT = ROOT / "scripts" / "redis.sh"
QUEUE = "gpu"

Script = Callable[..., str]


@pytest.fixture
def redis_script(tmp_path: Path) -> Iterator[Script]:
    """``redis.sh COMMAND`` in a folder of this test's own; destroyed afterwards."""
    folder = tmp_path / "redis"

    def run(command: str, **env: str) -> str:
        done = subprocess.run(
            ["bash", str(SCRIPT), command],
            env={**os.environ, "REDIS_DIR": str(folder), **env},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    try:
        yield run
    finally:
        run("destroy")


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_restarted_redis_keeps_its_url_and_clients_reconnect(redis_script: Script) -> None:
    url = redis_script("start")
    client = redis.Redis.from_url(url)
    assert client.ping()
    redis_script("stop")
    assert not _answers(client)

    assert redis_script("start") == url
    wait_for(lambda: _answers(client), 10, what="the client to reconnect")
    client.close()


def test_a_persistent_redis_keeps_queued_messages_across_a_restart(redis_script: Script) -> None:
    url = redis_script("start", REDIS_PERSIST="1")
    producer = Celery("producer", broker=url)
    producer.send_task("spatialbench.evaluate_submission", args=["some-id"], queue=QUEUE)
    client = redis.Redis.from_url(url)
    assert client.llen(QUEUE) == 1

    redis_script("stop")
    # Persistence is remembered: a plain start keeps it.
    assert redis_script("start") == url
    wait_for(lambda: _answers(client), 10, what="the client to reconnect")
    assert client.llen(QUEUE) == 1
    message = json.loads(client.lindex(QUEUE, 0))  # type: ignore[arg-type]
    assert message["headers"]["task"] == "spatialbench.evaluate_submission"
    client.close()


def test_a_port_taken_meanwhile_gives_a_new_url(redis_script: Script) -> None:
    url = redis_script("start")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    redis_script("stop")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        other = redis_script("start")
        assert other != url
        client = redis.Redis.from_url(other)
        assert client.ping()
        client.close()
