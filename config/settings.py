"""The one settings object of the service (API, worker, admin commands).

Read once from the environment (prefix ``SPATIALBENCH_``) or a ``.env`` file, then passed
down. The defaults are the embedded mode: SQLite and a broker that needs no server, everything
under ``./var``. Production sets ``SPATIALBENCH_ENV=production`` and real URLs; the embedded
defaults (a SQLite database, a broker without a server) are refused there, since several
processes on several machines must share them.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPATIALBENCH_", env_file=".env", extra="ignore")

    env: Environment = Environment.DEVELOPMENT

    # Where the embedded mode keeps its database, broker and uploads.
    state_dir: Path = Path("var")
    database_url: str | None = None
    broker_url: str | None = None
    storage_dir: Path | None = None
    # Object storage for models, example images and shard results: file:///absolute/path (a
    # folder; by default storage_dir) or s3://bucket/prefix (S3-compatible, so workers on other
    # machines need no shared disk), with the s3_* settings for the server and its credentials.
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    data_dir: Path = Path("data")
    benchmarks_file: Path | None = None

    # Uploads and per-user caps.
    max_upload_bytes: int = 512 * 2**20
    daily_limit: int = 50
    concurrent_limit: int = 3

    # Run the database migrations when the API starts; None: only in the embedded (SQLite)
    # mode, where nobody else would. Production runs `spatialbench db upgrade` once per deploy.
    auto_migrate: bool | None = None

    # Workers.
    task_soft_time_limit_s: int = 6 * 3600
    task_hard_time_limit_s: int = 6 * 3600 + 600
    # A running job whose worker wrote no heartbeat for this long is queued again (in its old
    # place). Heartbeats come from the worker's own loop every progress_interval_s, whatever
    # the model does, so this can be short.
    heartbeat_timeout_s: float = 30.0
    # A queued job whose id was handed to the broker this long ago is handed again (its
    # message may be lost); duplicates are harmless.
    republish_after_s: float = 60.0
    # How long a worker waits for an unreachable database (before taking a message, and to
    # record a finished result) before giving the message back / leaving the result stored.
    database_wait_s: float = 3600.0
    max_attempts: int = 3
    progress_interval_s: float = 2.0
    device: str = "auto"
    batch_size: int = 512
    bf16: bool = False
    sandbox_memory_bytes: int = 16 * 2**30
    # A root worker runs each evaluation's sandboxes (bubblewrap) as this unprivileged user;
    # never as root, and there is no fallback: if the sandbox cannot start, the job fails.
    sandbox_user: str = "nobody"
    eval_limit: int | None = Field(default=None, description="evaluate only N images (testing)")
    # How often the worker's reaper looks for jobs whose heartbeat stopped.
    reaper_interval_s: float = 5.0
    # The sandboxed evaluation's wall-clock limit; None: a minute under the soft time limit.
    sandbox_deadline_s: float | None = None
    # CPU threads of the sandboxed evaluation (OMP_NUM_THREADS); None: all cores.
    sandbox_threads: int | None = None
    # Where the sandbox's private working folders go; None: the system temp folder.
    sandbox_tmp_dir: Path | None = None
    # Example images kept per evaluation for the model page (fooled ones; a few robust ones).
    example_images: int = 8
    # An evaluation is cut into shards of at most this many images (even sizes), each a task
    # any worker may take; a benchmark smaller than this is one shard. The expensive subsets
    # (landscape, vote, first-order, ablations) are the first images of the order, so shards
    # well under their sizes spread that work over several workers.
    shard_images: int = Field(default=250, ge=1)

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        state = self.state_dir.resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{state / 'spatialbench.db'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{state / 'broker.db'}"
        if self.storage_dir is None:
            self.storage_dir = state / "models"
        if self.storage_url is None:
            self.storage_url = self.storage_dir.resolve().as_uri()
        if self.env is Environment.PRODUCTION:
            self._refuse_embedded_defaults()
        return self

    def _refuse_embedded_defaults(self) -> None:
        if self.is_sqlite:
            raise ValueError(
                "SPATIALBENCH_DATABASE_URL is a SQLite file, the embedded default; production "
                "needs a PostgreSQL URL (postgresql+psycopg://user:password@host/db)"
            )
        if str(self.broker_url).startswith(("sqla+", "sqlalchemy+", "filesystem:")):
            raise ValueError(
                "SPATIALBENCH_BROKER_URL is a broker without a server, the embedded default; "
                "production needs a Redis URL (redis://:password@host:6379/0)"
            )

    @property
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")

    @property
    def migrate_on_start(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    def model_path(self, sha256: str) -> Path:
        """Where the uploaded model file with this sha256 is stored."""
        assert self.storage_dir is not None
        return self.storage_dir / sha256[:2] / sha256

    def ensure_dirs(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        assert self.storage_dir is not None
        self.storage_dir.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
