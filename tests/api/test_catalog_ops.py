"""Benchmarks, architectures, /me, /healthz, /metrics, OpenAPI and error rendering."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from config.settings import Settings
from db.models import SubmissionStatus
from tests.api.conftest import Account
from tests.factories import create_submission
from tests.fixtures_db import TestDatabase


def test_benchmarks_list_their_compatible_architectures(client: TestClient) -> None:
    response = client.get("/api/v1/benchmarks")
    assert response.status_code == 200
    benchmarks = {b["name"]: b for b in response.json()}
    assert {"cifar10", "imagenet", "mnist", "digits"} <= set(benchmarks)
    digits = benchmarks["digits"]
    assert digits["grid"] == [31, 5, 5] and digits["grid_points"] == 775
    assert digits["max_rotation"] == 30.0 and digits["max_translation"] == [3.0, 3.0]
    assert "small_cnn" in digits["architectures"]
    assert "torchvision/resnet50" in benchmarks["imagenet"]["architectures"]
    assert "small_cnn" not in benchmarks["imagenet"]["architectures"]
    assert digits["leaderboard_url"] == "http://testserver/api/v1/leaderboard/digits"


def test_architectures_list_their_benchmarks(client: TestClient) -> None:
    architectures = {a["name"]: a for a in client.get("/api/v1/architectures").json()}
    assert architectures["small_cnn"]["input_size"] == [32, 32]
    assert set(architectures["resnet32"]["benchmarks"]) == {"cifar10", "digits"}
    assert architectures["torchvision/resnet50"]["benchmarks"] == ["imagenet"]


def test_me_shows_limits_and_usage(
    client: TestClient, alice: Account, test_db: TestDatabase
) -> None:
    create_submission(test_db.session, alice.user)
    create_submission(test_db.session, alice.user, status=SubmissionStatus.FINISHED)
    test_db.session.commit()
    body = client.get("/api/v1/me", headers=alice.headers).json()
    assert body == {
        "name": "alice",
        "is_admin": False,
        "daily_limit": 50,
        "concurrent_limit": 50,
        "submissions_last_24h": 2,
        "active_submissions": 1,
    }


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_metrics_count_requests_by_route_and_submissions_by_status(
    client: TestClient, test_db: TestDatabase
) -> None:
    create_submission(test_db.session, status=SubmissionStatus.RUNNING)
    sub = create_submission(test_db.session)
    test_db.session.commit()
    client.get(f"/api/v1/submissions/{sub.id}")
    client.get("/api/v1/submissions/missing")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    route = 'route="/api/v1/submissions/{submission_id}"'
    assert f'spatialbench_http_requests_total{{method="GET",{route},status="200"}} 1.0' in text
    assert f'spatialbench_http_requests_total{{method="GET",{route},status="404"}} 1.0' in text
    assert "spatialbench_http_request_duration_seconds_bucket" in text
    assert 'spatialbench_submissions{status="running"} 1.0' in text
    assert 'spatialbench_submissions{status="queued"} 1.0' in text
    assert 'spatialbench_submissions{status="finished"} 0.0' in text


def test_openapi_documents_the_upload_form(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    form = spec["paths"]["/api/v1/submissions"]["post"]["requestBody"]["content"]
    schema = form["multipart/form-data"]["schema"]
    assert {"file", "display_name", "benchmark"} <= set(schema["required"])
    assert schema["properties"]["file"]["format"] == "binary"
    assert client.get("/docs").status_code == 200


def test_unknown_url_is_json(client: TestClient) -> None:
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert "/docs" in response.json()["detail"]


def test_wrong_method_is_json(client: TestClient) -> None:
    response = client.delete("/api/v1/benchmarks")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


def test_embedded_mode_builds_its_sqlite_schema_at_start(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, state_dir=tmp_path / "var")  # type: ignore[call-arg]
    assert settings.is_sqlite and settings.migrate_on_start
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/v1/leaderboard/digits").json()["total"] == 0
    assert (tmp_path / "var" / "spatialbench.db").is_file()
    assert (tmp_path / "var" / "models").is_dir()
