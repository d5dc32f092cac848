"""Finished results in the storage, written before they are recorded in the database.

A result is the product of minutes or hours of evaluation; the database may be away when it
arrives. It is first put into the storage under ``results/<submission id>/<claim token>.json``
(``<storage_dir>/results/...`` on the local backend, an object in the bucket on S3, so any
worker on any machine finds it), with the job configuration it was computed with, then
recorded. A worker that takes the job later, with the same configuration, records the stored
result instead of evaluating again.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from db.lifecycle import JobConfig
from storage import LocalStorage, Storage, StorageError, validate_key

log = logging.getLogger(__name__)

__all__ = [
    "StoredResult",
    "find_stored",
    "forget_stored",
    "result_key",
    "results_prefix",
    "store_result",
]


@dataclass(frozen=True)
class StoredResult:
    key: str
    # The token of the claim whose run computed it.
    claim_token: str
    job: JobConfig
    result: dict[str, Any]
    examples: list[dict[str, Any]]


def results_prefix(submission_id: str) -> str:
    """The folder of a submission's stored results."""
    return validate_key(f"results/{submission_id}")


def result_key(submission_id: str, claim_token: str) -> str:
    return validate_key(f"{results_prefix(submission_id)}/{claim_token}.json")


def store_result(
    storage: Storage,
    submission_id: str,
    claim_token: str,
    job: JobConfig,
    result: dict[str, Any],
    examples: list[dict[str, Any]],
) -> StoredResult:
    """Write the result durably: both backends write atomically (the local one renames a
    complete file into place; an S3 object appears whole or not at all)."""
    key = result_key(submission_id, claim_token)
    body: dict[str, Any] = {
        "claim_token": claim_token,
        "job": job.to_dict(),
        "result": result,
        "examples": examples,
    }
    storage.put_bytes(key, json.dumps(body).encode())
    return StoredResult(key, claim_token, job, result, examples)


def _read(storage: Storage, key: str) -> StoredResult | None:
    try:
        body = json.loads(storage.read_bytes(key))
        return StoredResult(
            key,
            str(body["claim_token"]),
            JobConfig.from_dict(body["job"]),
            dict(body["result"]),
            list(body.get("examples") or []),
        )
    except (StorageError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable stored result %s", key)
        return None


def find_stored(storage: Storage, submission_id: str, job: JobConfig) -> StoredResult | None:
    """A stored result of ``submission_id`` computed with exactly ``job``, if there is one."""
    for key in storage.list(results_prefix(submission_id)):
        if not key.endswith(".json"):
            continue
        stored = _read(storage, key)
        if stored is not None and stored.job == job:
            return stored
    return None


def forget_stored(storage: Storage, submission_id: str) -> None:
    """Once recorded in the database, the stored results of the submission are not needed."""
    try:
        for key in storage.list(results_prefix(submission_id)):
            storage.delete(key)
        if isinstance(storage, LocalStorage):
            # A folder is not an object, so deleting the keys leaves it: remove it too, or
            # every submission ever evaluated would leave an empty one behind.
            with contextlib.suppress(OSError):
                storage.path(results_prefix(submission_id)).rmdir()
    except StorageError:
        # A leftover is harmless: it is only read for a claim with the same configuration.
        log.warning("could not remove the stored results of %s", submission_id, exc_info=True)
