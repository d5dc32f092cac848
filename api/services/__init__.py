"""Service functions: the logic behind the routes, callable without a server.

They take a SQLAlchemy ``Session`` (and the ``Settings`` where needed), may flush, and never
commit: whoever opened the session owns the transaction. Errors are ``api.errors`` (or the
evaluator's) and carry their HTTP status.
"""

from api.services.benchmarks import (
    architecture_public,
    benchmark_public,
    get_benchmark,
    list_architectures,
    list_benchmarks,
)
from api.services.leaderboard import leaderboard, leaderboard_csv
from api.services.submissions import (
    cancel_submission,
    check_caps,
    count_by_status,
    get_submission,
    list_submissions,
    mark_baseline,
    submission_public,
    submit,
)
from api.services.users import authenticate, create_token, create_user, revoke_token

# The name the issue uses for "accept an upload".
create_submission = submit

__all__ = [
    "architecture_public",
    "authenticate",
    "benchmark_public",
    "cancel_submission",
    "mark_baseline",
    "check_caps",
    "count_by_status",
    "create_submission",
    "create_token",
    "create_user",
    "get_benchmark",
    "get_submission",
    "leaderboard",
    "leaderboard_csv",
    "list_architectures",
    "list_benchmarks",
    "list_submissions",
    "revoke_token",
    "submission_public",
    "submit",
]
