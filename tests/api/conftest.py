"""API test fixtures: the app on a real database (Postgres and SQLite), model files, users."""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from api.app import create_app
from api.deps import get_enqueuer
from config.settings import Settings
from db.models import Submission, User
from evaluator.models.architectures import small_cnn
from tests.factories import auth, create_token, create_user
from tests.fixtures_db import (  # noqa: F401  (fixtures)
    TestDatabase,
    pg_connection_fixture,
    pg_test_db_fixture,
    test_db_fixture,
)

# --- Model files ------------------------------------------------------------------------------


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in small_cnn().state_dict().items()}


class ModelFiles:
    """Real model files for the ``digits`` benchmark (small_cnn), good and bad, made once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @functools.cache  # noqa: B019  (one instance per session)
    def weights(self, seed: int = 0) -> Path:
        """Good safetensors weights; a different file per seed."""
        path = self.folder / f"weights-{seed}.safetensors"
        save_file(_state(seed), str(path))
        return path

    def _bad(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        path = self.folder / name
        save_file(state, str(path))
        return path

    @functools.cached_property
    def truncated(self) -> Path:
        data = self.weights().read_bytes()
        path = self.folder / "truncated.safetensors"
        path.write_bytes(data[: len(data) - 1000])
        return path

    @functools.cached_property
    def wrong_keys(self) -> Path:
        state = _state(0)
        key = next(iter(state))
        state["renamed." + key] = state.pop(key)
        return self._bad("wrong-keys.safetensors", state)

    @functools.cached_property
    def wrong_shapes(self) -> Path:
        # Weights for 5 classes instead of the benchmark's 10.
        torch.manual_seed(0)
        return self._bad("wrong-shapes.safetensors", small_cnn(num_classes=5).state_dict())

    @functools.cached_property
    def nan(self) -> Path:
        state = _state(0)
        key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
        return self._bad("nan.safetensors", state)

    @functools.cached_property
    def pickle(self) -> Path:
        path = self.folder / "model.pt"
        torch.save(_state(0), path)
        return path

    @functools.cached_property
    def torchscript(self) -> Path:
        path = self.folder / "model.ts"
        # small_cnn checks shapes in Python, which tracing warns about; any module will do.
        torch.jit.script(torch.nn.Linear(4, 2)).save(str(path))
        return path

    @functools.cached_property
    def plain_zip(self) -> Path:
        path = self.folder / "not-an-export.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("model/weights.txt", "these are not weights")
        return path

    @functools.cached_property
    def export(self) -> Path:
        path = self.folder / "model.pt2"
        torch.manual_seed(0)
        program = torch.export.export(
            small_cnn().eval(),
            (torch.rand(2, 3, 32, 32),),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        torch.export.save(program, str(path))
        return path


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    torch.set_num_threads(1)  # the test machine has two cores; keep it responsive
    return ModelFiles(tmp_path_factory.mktemp("models"))


# --- The app ----------------------------------------------------------------------------------


@pytest.fixture
def settings(test_db: TestDatabase, tmp_path: Path) -> Settings:
    return test_db.settings(tmp_path)


@dataclass
class Enqueued:
    """Records the ids the app enqueues, and whether each row was already committed then."""

    ids: list[str]
    committed: list[bool]


@pytest.fixture
def enqueued(test_db: TestDatabase) -> Enqueued:
    return Enqueued([], [])


def make_client(
    settings: Settings, test_db: TestDatabase, enqueued: Enqueued
) -> tuple[FastAPI, TestClient]:
    app = create_app(settings, database=test_db.database)

    def enqueue(submission_id: str) -> None:
        from sqlalchemy import select

        from db.models import Submission

        # A separate session: on SQLite it sees committed rows only.
        with test_db.sessions() as other:
            found = other.scalar(select(Submission.id).where(Submission.id == submission_id))
        enqueued.ids.append(submission_id)
        enqueued.committed.append(found is not None)

    app.dependency_overrides[get_enqueuer] = lambda: enqueue
    return app, TestClient(app)


@pytest.fixture
def client(settings: Settings, test_db: TestDatabase, enqueued: Enqueued) -> Iterator[TestClient]:
    _, test_client = make_client(settings, test_db, enqueued)
    with test_client:
        yield test_client


@dataclass
class Account:
    user: User
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.token)


@pytest.fixture
def make_account(test_db: TestDatabase) -> Callable[..., Account]:
    def make(**overrides: Any) -> Account:
        user = create_user(test_db.session, **overrides)
        account = Account(user, create_token(test_db.session, user))
        test_db.session.commit()  # the app's sessions must see the user and the token
        return account

    return make


@pytest.fixture
def alice(make_account: Callable[..., Account]) -> Account:
    return make_account(name="alice")


@pytest.fixture
def bob(make_account: Callable[..., Account]) -> Account:
    return make_account(name="bob")


def change_row(test_db: TestDatabase, submission_id: str, **fields: Any) -> None:
    """Set fields of a stored submission and commit, as a worker's run would have left it."""
    row = test_db.session.get(Submission, submission_id)
    assert row is not None
    for name, value in fields.items():
        setattr(row, name, value)
    test_db.session.commit()


# --- Uploading ----------------------------------------------------------------------------------

DEFAULT_FIELDS = {"display_name": "Test model", "benchmark": "digits", "architecture": "small_cnn"}


def upload(
    client: TestClient,
    model: Path | bytes,
    account: Account | None,
    filename: str | None = None,
    **fields: Any,
) -> httpx2.Response:
    """POST a model with the default metadata; a field given as None is left out."""
    data = {**DEFAULT_FIELDS, **fields}
    data = {k: str(v) for k, v in data.items() if v is not None}
    content = model.read_bytes() if isinstance(model, Path) else model
    name = filename or (model.name if isinstance(model, Path) else "model.bin")
    return client.post(
        "/api/v1/submissions",
        data=data,
        files={"file": (name, io.BytesIO(content), "application/octet-stream")},
        headers=account.headers if account else {},
    )
