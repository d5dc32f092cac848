"""Finished results on the job's storage, written before they are recorded in the database.

A result is the product of minutes or hours of evaluation; the database may be away when it
arrives. It is first written to ``<storage_dir>/results/<submission id>/<claim token>.json``
(with the job configuration it was computed with), then recorded. A worker that takes the job
later, with the same configuration, records the stored result instead of evaluating again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db.lifecycle import JobConfig
from spatialbench.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["StoredResult", "find_stored", "forget_stored", "results_dir", "store_result"]


@dataclass(frozen=True)
class StoredResult:
    path: Path
    # The token of the claim whose run computed it.
    claim_token: str
    job: JobConfig
    result: dict[str, Any]
    examples: list[dict[str, Any]]


def results_dir(settings: Settings, submission_id: str) -> Path:
    assert settings.storage_dir is not None
    return settings.storage_dir / "results" / submission_id


def store_result(
    settings: Settings,
    submission_id: str,
    claim_token: str,
    job: JobConfig,
    result: dict[str, Any],
    examples: list[dict[str, Any]],
) -> StoredResult:
    """Write the result durably (a temporary file, fsync, rename, fsync of the folder)."""
    folder = results_dir(settings, submission_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{claim_token}.json"
    staging = path.with_suffix(".tmp")
    body: dict[str, Any] = {
        "claim_token": claim_token,
        "job": job.to_dict(),
        "result": result,
        "examples": examples,
    }
    with staging.open("w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    staging.replace(path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return StoredResult(path, claim_token, job, result, examples)


def find_stored(settings: Settings, submission_id: str, job: JobConfig) -> StoredResult | None:
    """A stored result of ``submission_id`` computed with exactly ``job``, if there is one."""
    folder = results_dir(settings, submission_id)
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.json")):
        try:
            body = json.loads(path.read_text())
            stored = StoredResult(
                path,
                str(body["claim_token"]),
                JobConfig.from_dict(body["job"]),
                dict(body["result"]),
                list(body.get("examples") or []),
            )
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable stored result %s", path)
            continue
        if stored.job == job:
            return stored
    return None


def forget_stored(settings: Settings, submission_id: str) -> None:
    """Once recorded in the database, the stored results of the submission are not needed."""
    with contextlib.suppress(OSError):
        shutil.rmtree(results_dir(settings, submission_id))
