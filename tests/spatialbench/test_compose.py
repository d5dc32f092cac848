"""docker-compose.yml: the services, how they are built, and how they are wired together.

Each check reads the file as Compose would (YAML, ``<<`` merges, ``${VAR:-default}``
substitution) and compares it with what the code reads: the settings, the Dockerfiles, the
packages in pyproject.toml. Docker is not needed.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from config.settings import Settings
from storage import S3Storage, storage_from_settings
from tests.worker.helpers import ROOT

APP_SERVICES = ("api", "worker")
_VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def substitute(value: str) -> str:
    """A value as Compose passes it with no variable set: ``${X:-d}`` -> ``d``, a required
    ``${X:?message}`` -> ``required-X`` (a stand-in for what the operator sets), ``${X}`` ->
    empty, ``$$`` -> a literal ``$``."""

    def one(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        if kind == "-":
            return default
        return f"required-{name}" if kind == "?" else ""

    return "$".join(_VARIABLE.sub(one, part) for part in value.split("$$"))


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: substitute(str(value)) for key, value in service.get("environment", {}).items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """volume name -> mount point (with any mode)."""
    out = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":", 1)
        out[source] = target
    return out


def _packages() -> list[str]:
    """The top-level packages pyproject.toml installs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(pattern.rstrip("*") for pattern in include)


def _settings_of(service: dict[str, Any]) -> Settings:
    """The settings the service's process would read from its environment."""
    env = environment(service)
    values: dict[str, Any] = {
        key.removeprefix("SPATIALBENCH_").lower(): value
        for key, value in env.items()
        if key.startswith("SPATIALBENCH_")
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_the_services_are_there(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"postgres", "redis", "minio", "minio-init", "api", "worker"}
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis")
    assert services["minio"]["image"].startswith("minio/minio:")


def test_every_image_is_pinned_or_built_from_a_dockerfile_that_exists(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            build = service["build"]
            context = ROOT / build["context"]
            assert context.resolve() == ROOT, name
            assert (context / build["dockerfile"]).is_file(), (name, build["dockerfile"])
        else:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), (name, image)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_each_image_copies_every_package_it_installs(dockerfile: str) -> None:
    """``pip install .`` in the image installs only what was copied in: a package missing
    from the COPY lines or from the build context (the .dockerignore) is missing at run time."""
    text = (ROOT / "docker" / dockerfile).read_text()
    ignore = (ROOT / "docker" / f"{dockerfile}.dockerignore").read_text().splitlines()
    assert "storage" in _packages()
    for package in _packages():
        assert f"COPY {package} ./{package}" in text, (dockerfile, package)
        assert f"!{package}/**" in ignore, (dockerfile, package)
        assert (ROOT / package / "__init__.py").is_file(), package
    assert "torch==2.14.1" in text
    assert "pip install ." in text


def test_every_service_has_a_health_check(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "minio", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]


def test_every_dependency_exists_and_can_be_met(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, (name, target)
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], (name, target)
            if rule["condition"] == "service_completed_successfully":
                # A one-shot job: restarting it would never let it complete.
                assert services[target]["restart"] == "no", (name, target)


def test_the_api_waits_for_healthy_backends_and_serves_on_8000(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "8000:8000" in api["ports"]
    assert "serve" in api["command"]  # which runs the migrations first
    command = api["command"]
    assert command[command.index("--port") + 1] == "8000"
    assert "127.0.0.1:8000/healthz" in " ".join(api["healthcheck"]["test"])
    assert "EXPOSE 8000" in (ROOT / "docker" / "Dockerfile.api").read_text()


def test_the_worker_reserves_one_gpu_and_runs_one_job_at_a_time(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    command = worker["command"]
    assert command[:2] == ["spatialbench", "worker"]
    assert command[command.index("--concurrency") + 1] == "1"
    assert worker["environment"]["SPATIALBENCH_DEVICE"] == "cuda"


def test_api_and_worker_share_no_folder_and_read_datasets(compose: dict[str, Any]) -> None:
    """Models, examples and results go through object storage, so a worker on another machine
    needs no shared disk: the only volume the API and the worker both mount is the read-only
    datasets, and neither mounts anything over its state folder."""
    services = compose["services"]
    api, worker = _mounts(services["api"]), _mounts(services["worker"])
    assert set(api) & set(worker) == {"datasets"}
    assert api["datasets"] == worker["datasets"] == "/data:ro"
    for name in APP_SERVICES:
        state_dir = _settings_of(services[name]).state_dir.as_posix()
        targets = [target.split(":")[0] for target in _mounts(services[name]).values()]
        assert not any(target.startswith(state_dir) for target in targets), name
    assert _mounts(services["postgres"])["postgres-data"] == "/var/lib/postgresql/data"


def test_every_volume_used_is_declared_and_every_declared_one_used(
    compose: dict[str, Any],
) -> None:
    used = {
        source
        for service in compose["services"].values()
        for source in _mounts(service)
        if not source.startswith((".", "/"))  # bind mounts are not named volumes
    }
    assert used == set(compose["volumes"])


def test_minio_keeps_its_objects_in_a_volume_and_serves_on_9000(compose: dict[str, Any]) -> None:
    minio = compose["services"]["minio"]
    command = minio["command"]
    data_dir = command[command.index("server") + 1]
    assert _mounts(minio)["objects"] == data_dir
    assert command[command.index("--address") + 1] == ":9000"
    assert "9000:9000" in minio["ports"]  # workers on other machines reach it here


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_environment_variable_is_a_setting(compose: dict[str, Any], name: str) -> None:
    fields = set(Settings.model_fields)
    env = compose["services"][name]["environment"]
    names = [key for key in env if key.startswith("SPATIALBENCH_")]
    assert {"SPATIALBENCH_DATABASE_URL", "SPATIALBENCH_BROKER_URL"} <= set(names)
    for key in names:
        assert key.removeprefix("SPATIALBENCH_").lower() in fields, key
    assert env["SPATIALBENCH_BROKER_URL"].startswith("redis://")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_api_and_worker_store_objects_in_the_bucket_minio_init_creates(
    compose: dict[str, Any], name: str
) -> None:
    """The storage the service's own settings open: S3 at the minio service, in the bucket the
    one-shot job creates, with MinIO's credentials; and the service waits for that job."""
    services = compose["services"]
    service = services[name]
    store = storage_from_settings(_settings_of(service))
    assert isinstance(store, S3Storage)

    endpoint = urlsplit(str(store.endpoint))
    assert endpoint.hostname == "minio"
    minio_command = services["minio"]["command"]
    assert f":{endpoint.port}" == minio_command[minio_command.index("--address") + 1]

    init_command = " ".join(services["minio-init"]["command"])
    assert f"mc alias set local http://minio:{endpoint.port} " in init_command
    assert f"mc mb --ignore-existing local/{store.bucket}" in init_command

    settings = _settings_of(service)
    minio_env = environment(services["minio"])
    assert settings.s3_access_key_id == minio_env["MINIO_ROOT_USER"]
    assert settings.s3_secret_access_key is not None
    assert settings.s3_secret_access_key.get_secret_value() == minio_env["MINIO_ROOT_PASSWORD"]
    assert environment(services["minio-init"]) == minio_env

    assert service["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_substitution_follows_compose() -> None:
    assert substitute("${A:-x}/${B:?set B}/$${C}/${D}") == "x/required-B/${C}/"
    assert substitute("no variables") == "no variables"


def test_every_secret_must_be_set_by_the_operator() -> None:
    """A password with a default would run production on a password everyone can read."""
    text = (ROOT / "docker-compose.yml").read_text()
    secrets = [m.groups() for m in _VARIABLE.finditer(text) if "PASSWORD" in m.group(1)]
    assert secrets
    assert [(name, kind) for name, kind, _ in secrets if kind != "?"] == []
