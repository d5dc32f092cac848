"""POST /api/v1/submissions: accepted uploads, duplicates, and every refusal leaving no trace."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.routes.submissions import MAX_OFFSET
from config.settings import Settings
from db.models import Submission, SubmissionStatus, utcnow
from evaluator.vocabulary import ModelFormat, TrainingMethod
from tests.api.conftest import Account, Enqueued, ModelFiles, change_row, make_client, upload
from tests.factories import create_submission
from tests.fixtures_db import TestDatabase


def stored_files(settings: Settings) -> list[Path]:
    assert settings.storage_dir is not None
    if not settings.storage_dir.exists():
        return []
    return sorted(p for p in settings.storage_dir.rglob("*") if p.is_file())


def submission_count(test_db: TestDatabase) -> int:
    test_db.session.expire_all()
    return test_db.session.scalar(select(func.count()).select_from(Submission)) or 0


# --- Accepted ---------------------------------------------------------------------------------


def test_safetensors_upload_is_stored_by_hash_and_queued(
    client: TestClient,
    alice: Account,
    model_files: ModelFiles,
    settings: Settings,
    test_db: TestDatabase,
    enqueued: Enqueued,
) -> None:
    path = model_files.weights()
    response = upload(
        client, path, alice, mean="0.5,0.5,0.5", std="[0.25, 0.25, 0.25]",
        training_method="worst-of-k", extra_data="true", is_public="false",
        paper_url="https://arxiv.org/abs/1712.02779", description="ResNet, worst of 10",
    )  # fmt: skip
    assert response.status_code == 202, response.text
    body = response.json()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["status"] == "queued" and body["duplicate"] is False
    assert body["status_url"] == f"http://testserver/api/v1/submissions/{body['id']}"
    assert body["file_sha256"] == digest and body["file_size"] == path.stat().st_size
    assert body["model_format"] == "safetensors" and body["owner"] == "alice"
    assert body["mean"] == [0.5, 0.5, 0.5] and body["std"] == [0.25, 0.25, 0.25]
    assert body["training_method"] == "worst-of-k" and body["extra_data"] is True
    assert body["is_public"] is False and body["evaluation"] is None
    # Stored by hash, atomically (no temporary file left behind).
    assert stored_files(settings) == [settings.model_path(digest)]
    assert settings.model_path(digest).read_bytes() == path.read_bytes()
    row = test_db.session.get(Submission, body["id"])
    assert row is not None and row.status is SubmissionStatus.QUEUED
    assert row.training_method is TrainingMethod.WORST_OF_K
    assert enqueued.ids == [body["id"]]


def test_export_archive_is_accepted_without_architecture(
    client: TestClient, alice: Account, model_files: ModelFiles, enqueued: Enqueued
) -> None:
    response = upload(client, model_files.export, alice, architecture=None)
    assert response.status_code == 202, response.text
    assert response.json()["model_format"] == ModelFormat.EXPORT.value
    assert response.json()["architecture"] is None
    assert enqueued.ids == [response.json()["id"]]


def test_enqueue_happens_after_the_commit(
    client: TestClient, alice: Account, model_files: ModelFiles, enqueued: Enqueued,
    test_db: TestDatabase,
) -> None:  # fmt: skip
    if test_db.backend != "sqlite":
        pytest.skip("on Postgres the test's transaction is never committed")
    response = upload(client, model_files.weights(), alice)
    assert response.status_code == 202
    assert enqueued.committed == [True]


def test_same_file_same_benchmark_returns_the_existing_submission(
    client: TestClient,
    alice: Account,
    bob: Account,
    model_files: ModelFiles,
    test_db: TestDatabase,
    enqueued: Enqueued,
    settings: Settings,
) -> None:
    first = upload(client, model_files.weights(), alice, display_name="First")
    again = upload(client, model_files.weights(), alice, display_name="Second")
    by_bob = upload(client, model_files.weights(), bob, display_name="Bob's")
    assert first.status_code == 202
    assert again.status_code == 200 and by_bob.status_code == 200
    for response in (again, by_bob):
        assert response.json()["duplicate"] is True
        assert response.json()["id"] == first.json()["id"]
        assert response.json()["display_name"] == "First"
    assert submission_count(test_db) == 1
    assert enqueued.ids == [first.json()["id"]]
    assert len(stored_files(settings)) == 1


def test_same_file_other_benchmark_is_a_new_submission(
    client: TestClient, alice: Account, model_files: ModelFiles, test_db: TestDatabase,
    settings: Settings,
) -> None:  # fmt: skip
    first = upload(client, model_files.weights(), alice)
    other = upload(client, model_files.weights(), alice, benchmark="cifar10")
    assert first.status_code == other.status_code == 202
    assert first.json()["id"] != other.json()["id"]
    assert submission_count(test_db) == 2
    assert len(stored_files(settings)) == 1  # one copy of the bytes


def test_own_failed_duplicate_is_queued_again(
    client: TestClient, alice: Account, model_files: ModelFiles, test_db: TestDatabase,
    enqueued: Enqueued,
) -> None:  # fmt: skip
    first = upload(client, model_files.weights(), alice).json()
    change_row(
        test_db, first["id"], status=SubmissionStatus.FAILED, message="out of memory", attempts=3
    )
    response = upload(client, model_files.weights(), alice, display_name="Retry")
    assert response.status_code == 202
    body = response.json()
    assert body["id"] == first["id"] and body["duplicate"] is True
    assert body["status"] == "queued" and body["message"] is None and body["attempts"] == 0
    assert body["display_name"] == "Retry"
    assert enqueued.ids == [first["id"], first["id"]]


# --- Refused files: status, message, and nothing kept -----------------------------------------

BAD_FILES: list[tuple[str, dict[str, str | None], int, str, list[str]]] = [
    # (attribute of ModelFiles, form overrides, status, error code, words in the message)
    ("truncated", {}, 422, "unsupported_model_format", ["truncated", "save_file"]),
    ("pickle", {}, 422, "unsupported_model_format", ["pickle", "safetensors", "torch.export"]),
    ("torchscript", {}, 422, "unsupported_model_format", ["TorchScript", "torch.export"]),
    ("plain_zip", {"architecture": None}, 422, "unsupported_model_format", ["not a torch.export"]),
    ("wrong_keys", {}, 422, "weights_mismatch", ["missing", "unexpected", "renamed."]),
    ("wrong_shapes", {}, 422, "weights_mismatch", ["wrong shape", "expected"]),
    ("nan", {}, 422, "weights_mismatch", ["non-finite", "NaN"]),
    ("weights", {"architecture": None}, 422, "invalid_input", ["architecture"]),
    ("export", {}, 422, "invalid_input", ["leave the field 'architecture' empty"]),
    ("weights", {"benchmark": "cifar100"}, 422, "unknown_benchmark", ["cifar100", "digits"]),
    ("weights", {"architecture": "resnet33"}, 422, "unknown_architecture", ["resnet32"]),
    ("weights", {"architecture": "torchvision/resnet18"}, 422, "incompatible_architecture",
     ["3x224x224", "3x32x32", ".pt2"]),
    ("weights", {"training_method": "magic"}, 422, "invalid_input", ["training_method"]),
    ("weights", {"mean": "0.5,0.5,0.5"}, 422, "invalid_input", ["both mean and std"]),
    ("weights", {"mean": "0.5", "std": "0.2"}, 422, "invalid_input", ["one value per channel"]),
    ("weights", {"mean": "0,0,0", "std": "1,0,1"}, 422, "invalid_input", ["positive"]),
    ("weights", {"mean": "a,b,c", "std": "1,1,1"}, 422, "invalid_input", ["mean"]),
    # 1e-320 is 0 in float32: accepted, it failed inside the evaluation.
    ("weights", {"mean": "0,0,0", "std": "1e-320,1,1"}, 422, "invalid_input", ["std", "1e-06"]),
    ("weights", {"mean": "1e39,0,0", "std": "1,1,1"}, 422, "invalid_input", ["mean", "1000"]),
    ("weights", {"paper_url": "not a url"}, 422, "invalid_input", ["paper_url"]),
    ("weights", {"display_name": ""}, 422, "invalid_input", ["display_name"]),
    ("weights", {"arch": "small_cnn"}, 422, "invalid_input", ["arch"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("attribute", "fields", "status", "error", "words"),
    BAD_FILES,
    ids=[f"{a}-{'-'.join(f) or 'file'}" for a, f, *_ in BAD_FILES],
)
def test_refused_upload_leaves_no_trace(
    client: TestClient,
    alice: Account,
    model_files: ModelFiles,
    settings: Settings,
    test_db: TestDatabase,
    enqueued: Enqueued,
    attribute: str,
    fields: dict[str, str | None],
    status: int,
    error: str,
    words: list[str],
) -> None:
    existing = create_submission(test_db.session)
    test_db.session.commit()
    model = getattr(model_files, attribute)
    path = model() if callable(model) else model
    response = upload(client, path, alice, **fields)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    for word in words:
        assert word in body["detail"], body["detail"]
    assert stored_files(settings) == []
    assert submission_count(test_db) == 1
    assert test_db.session.get(Submission, existing.id) is not None
    assert enqueued.ids == []


def test_validation_errors_name_each_field(
    client: TestClient, alice: Account, model_files: ModelFiles
) -> None:
    response = upload(client, model_files.weights(), alice, display_name=None, benchmark=None)
    assert response.status_code == 422
    fields = {f["field"] for f in response.json()["fields"]}
    assert fields == {"display_name", "benchmark"}


def test_upload_without_a_file_is_refused(
    client: TestClient, alice: Account, settings: Settings
) -> None:
    response = client.post(
        "/api/v1/submissions",
        files={"display_name": (None, "x"), "benchmark": (None, "digits")},
        headers=alice.headers,
    )
    assert response.status_code == 422
    assert "form field 'file'" in response.json()["detail"]
    assert stored_files(settings) == []


def test_not_multipart_is_a_bad_request(client: TestClient, alice: Account) -> None:
    response = client.post("/api/v1/submissions", json={"display_name": "x"}, headers=alice.headers)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert "multipart/form-data" in response.json()["detail"]


# --- Size cap ----------------------------------------------------------------------------------


@pytest.fixture
def small_cap_client(
    test_db: TestDatabase, tmp_path: Path, enqueued: Enqueued
) -> Iterator[tuple[TestClient, Settings]]:
    settings = test_db.settings(tmp_path, max_upload_bytes=50_000)
    _, client = make_client(settings, test_db, enqueued)
    with client:
        yield client, settings


def test_oversized_upload_is_refused_before_reading_it(
    small_cap_client: tuple[TestClient, Settings], alice: Account, model_files: ModelFiles,
    test_db: TestDatabase,
) -> None:  # fmt: skip
    client, settings = small_cap_client
    big = model_files.weights().read_bytes() * 20  # declared length is far over the cap
    response = upload(client, big, alice)
    assert response.status_code == 413
    assert response.json()["error"] == "upload_too_large"
    assert "50000 bytes" in response.json()["detail"]
    assert stored_files(settings) == []
    assert submission_count(test_db) == 0


BOUNDARY = "sbtestboundary"


def _post_streamed(client: TestClient, account: Account, size: int) -> httpx2.Response:
    """Upload a model of ``size`` zero bytes as a generator body: sent chunked, without
    Content-Length, so that only streaming can catch one over the cap."""

    def body() -> Iterator[bytes]:
        for name, value in {"display_name": "x", "benchmark": "digits"}.items():
            yield (
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            ).encode()
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="m.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        payload = b"\0" * size
        for start in range(0, size, 8192):
            yield payload[start : start + 8192]
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    return client.post(
        "/api/v1/submissions",
        content=body(),
        headers={**account.headers, "Content-Type": content_type},
    )


def test_streamed_upload_is_cut_off_at_the_cap_without_a_temp_file(
    small_cap_client: tuple[TestClient, Settings], alice: Account, test_db: TestDatabase,
) -> None:  # fmt: skip
    client, settings = small_cap_client
    response = _post_streamed(client, alice, 200_000)
    assert response.status_code == 413
    assert stored_files(settings) == []
    # Received in the API's own staging folder, outside the store.
    assert (settings.state_dir / "incoming").is_dir()
    assert submission_count(test_db) == 0


def test_upload_just_under_the_cap_streams_through(
    small_cap_client: tuple[TestClient, Settings], alice: Account
) -> None:
    client, settings = small_cap_client
    response = _post_streamed(client, alice, 49_999)
    # Under the cap, so it is read whole and then refused for what it is.
    assert response.status_code == 422
    assert response.json()["error"] == "unsupported_model_format"
    assert stored_files(settings) == []


# --- Auth --------------------------------------------------------------------------------------


def test_missing_token_is_refused(
    client: TestClient, model_files: ModelFiles, settings: Settings
) -> None:
    response = upload(client, model_files.weights(), None)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["detail"]
    assert stored_files(settings) == []


def test_unknown_token_is_refused(client: TestClient, model_files: ModelFiles) -> None:
    response = client.post(
        "/api/v1/submissions", headers={"Authorization": "Bearer sb_nope"}, files={"file": b"x"}
    )
    assert response.status_code == 401
    assert "Unknown API token" in response.json()["detail"]


def test_revoked_token_is_refused(
    client: TestClient, alice: Account, model_files: ModelFiles, test_db: TestDatabase,
    settings: Settings,
) -> None:  # fmt: skip
    from api.services.users import revoke_token

    revoke_token(test_db.session, alice.token)
    test_db.session.commit()
    response = upload(client, model_files.weights(), alice)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]
    assert stored_files(settings) == []
    assert submission_count(test_db) == 0


# --- Caps --------------------------------------------------------------------------------------


def test_daily_cap_says_when_to_retry(
    client: TestClient, make_account: Callable[..., Account], model_files: ModelFiles,
    test_db: TestDatabase, settings: Settings,
) -> None:  # fmt: skip
    carol = make_account(name="carol", daily_limit=2)
    now = utcnow()
    # One from yesterday no longer counts; two in the last 24 hours do.
    create_submission(test_db.session, carol.user, created_at=now - timedelta(hours=25))
    create_submission(test_db.session, carol.user, created_at=now - timedelta(hours=20),
                      status=SubmissionStatus.FINISHED)  # fmt: skip
    create_submission(test_db.session, carol.user, created_at=now - timedelta(hours=1),
                      status=SubmissionStatus.FINISHED)  # fmt: skip
    test_db.session.commit()
    response = upload(client, model_files.weights(), carol)
    assert response.status_code == 429
    assert response.json()["error"] == "rate_limited"
    retry = int(response.headers["Retry-After"])
    assert 4 * 3600 - 60 <= retry <= 4 * 3600 + 60  # the one from 20 h ago frees up in 4 h
    assert "daily limit is 2" in response.json()["detail"]
    assert "UTC" in response.json()["detail"]
    assert stored_files(settings) == []
    assert submission_count(test_db) == 3


def test_concurrent_cap_counts_queued_and_running(
    client: TestClient, make_account: Callable[..., Account], model_files: ModelFiles,
    test_db: TestDatabase,
) -> None:  # fmt: skip
    dave = make_account(name="dave", concurrent_limit=2)
    create_submission(test_db.session, dave.user, status=SubmissionStatus.QUEUED)
    create_submission(test_db.session, dave.user, status=SubmissionStatus.RUNNING)
    test_db.session.commit()
    response = upload(client, model_files.weights(), dave)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "60"
    assert "2 submissions queued or running" in response.json()["detail"]


def test_finished_jobs_do_not_count_against_the_concurrent_cap(
    client: TestClient, make_account: Callable[..., Account], model_files: ModelFiles,
    test_db: TestDatabase,
) -> None:  # fmt: skip
    erin = make_account(name="erin", concurrent_limit=1)
    create_submission(test_db.session, erin.user, status=SubmissionStatus.FAILED)
    test_db.session.commit()
    assert upload(client, model_files.weights(), erin).status_code == 202


def test_admins_are_not_capped(
    client: TestClient, make_account: Callable[..., Account], model_files: ModelFiles,
    test_db: TestDatabase,
) -> None:  # fmt: skip
    root = make_account(name="root", is_admin=True, concurrent_limit=0, daily_limit=0)
    assert upload(client, model_files.weights(), root).status_code == 202


# --- Listing --------------------------------------------------------------------------------------


def test_an_offset_past_any_list_is_refused_with_a_message(
    client: TestClient, alice: Account
) -> None:
    # 2**63: one past the largest 64-bit offset a database can take.
    response = client.get("/api/v1/submissions?offset=9223372036854775808", headers=alice.headers)
    assert response.status_code == 422, response.text
    field = response.json()["fields"][0]
    assert field["field"] == "offset" and "less than or equal to" in field["message"]
    at_limit = client.get(f"/api/v1/submissions?offset={MAX_OFFSET}", headers=alice.headers)
    assert at_limit.status_code == 200 and at_limit.json()["items"] == []


# --- Hostile files --------------------------------------------------------------------------------


def _many_members(count: int) -> bytes:
    """A zip of ``count`` empty members (zip64 end records), built without zipfile's slowness."""
    local, central, offset = [], [], 0
    for i in range(count):
        name = b"m/%d" % i
        header = (b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0)
        local.append(struct.pack("<4s5H3L2H", *header) + name)
        entry = (b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, offset)
        central.append(struct.pack("<4s6H3L5H2L", *entry) + name)
        offset += 30 + len(name)
    directory = b"".join(central)
    size = len(directory)
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, offset + size, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, size, offset, 0)
    return b"".join(local) + directory + end64 + locator + end


def test_a_zip_of_400000_members_is_refused_from_its_end_record(
    client: TestClient, alice: Account, settings: Settings
) -> None:
    response = upload(client, _many_members(400_000), alice, architecture=None)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "unsupported_model_format"
    assert "declares 400000 members" in response.json()["detail"]
    assert stored_files(settings) == []


def test_a_deeply_nested_safetensors_header_is_refused(
    client: TestClient, alice: Account, settings: Settings
) -> None:
    header = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    response = upload(client, struct.pack("<Q", len(header)) + header, alice)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "unsupported_model_format"
    assert "nests" in response.json()["detail"]
    assert stored_files(settings) == []
