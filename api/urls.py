"""Where the JSON API lives: its prefix, written once, and the paths built from it. A leaf
module (it imports nothing), so the client, the scripts and every layer of the service can
use it."""

__all__ = ["API_PREFIX", "api_path", "submission_path"]

API_PREFIX = "/api/v1"


def api_path(path: str) -> str:
    """The API's path for ``path`` (``/submissions/ID`` -> ``/api/v1/submissions/ID``)."""
    return f"{API_PREFIX}{path}"


def submission_path(submission_id: str) -> str:
    """Where a submission's status is followed (``/api/v1/submissions/ID``)."""
    return api_path(f"/submissions/{submission_id}")
