"""docker-compose.yml: the services, health checks, volumes and GPU reservation are there."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from spatialbench.settings import Settings
from tests.worker.helpers import ROOT


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """volume name -> mount point (with any mode)."""
    out = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":", 1)
        out[source] = target
    return out


def test_the_services_are_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"postgres", "redis", "api", "worker"}
    assert compose["services"]["postgres"]["image"].startswith("postgres:15")
    assert compose["services"]["redis"]["image"].startswith("redis")


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_the_api_waits_for_healthy_backends_and_serves_on_8000(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "8000:8000" in api["ports"]
    assert "serve" in api["command"]  # which runs the migrations first


def test_the_worker_reserves_one_gpu_and_runs_one_job_at_a_time(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    command = worker["command"]
    assert command[:2] == ["spatialbench", "worker"]
    assert command[command.index("--concurrency") + 1] == "1"
    assert worker["environment"]["SPATIALBENCH_DEVICE"] == "cuda"


def test_api_and_worker_share_the_model_storage_and_read_datasets(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    api, worker = _mounts(services["api"]), _mounts(services["worker"])
    assert api["models"] == worker["models"] == "/var/lib/spatialbench"
    assert worker["datasets"] == "/data:ro"
    assert set(compose["volumes"]) >= {"postgres-data", "redis-data", "models", "datasets"}
    assert _mounts(services["postgres"])["postgres-data"] == "/var/lib/postgresql/data"
    storage = services["worker"]["environment"]["SPATIALBENCH_STORAGE_DIR"]
    assert storage.startswith("/var/lib/spatialbench/")


def test_every_environment_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name in ("api", "worker"):
        env = compose["services"][name]["environment"]
        names = [key for key in env if key.startswith("SPATIALBENCH_")]
        assert {"SPATIALBENCH_DATABASE_URL", "SPATIALBENCH_BROKER_URL"} <= set(names)
        for key in names:
            assert key.removeprefix("SPATIALBENCH_").lower() in fields, key
    assert compose["services"]["api"]["environment"]["SPATIALBENCH_BROKER_URL"].startswith(
        "redis://"
    )


def test_the_dockerfiles_exist_and_pin_torch() -> None:
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        text = (ROOT / "docker" / name).read_text()
        assert "torch==2.14.1" in text
        assert "pip install ." in text
