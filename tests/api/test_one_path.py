"""The API's prefix and the storage layout of example images are each written once: every other
module builds them through `api.urls` and `storage.keys` (a second spelling drifts the day one
of them changes)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

from api.pages.submission import example_url
from api.urls import API_PREFIX, api_path
from storage.keys import example_key, example_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "worker", "db", "evaluator", "spatialbench", "storage", "scripts")
# A string that starts a statement is a docstring: prose about the URL, not a URL built.
_STATEMENT_START = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string literals of ``path`` that are not docstrings, with their line numbers."""
    found = []
    previous = tokenize.ENCODING
    for token in tokenize.tokenize(io.BytesIO(path.read_bytes()).readline):
        if token.type == tokenize.STRING and previous not in _STATEMENT_START:
            found.append((token.start[0], token.string))
        if token.type not in (tokenize.COMMENT, tokenize.NL):
            previous = token.type
    return found


def _spellings(spelling: str, owner: str) -> list[str]:
    """Where a string literal outside ``owner`` matches the regular expression ``spelling``."""
    pattern = re.compile(spelling)
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative == owner:
                continue
            out += [f"{relative}:{line}" for line, s in _code_strings(path) if pattern.search(s)]
    return out


def test_the_api_prefix_is_written_only_in_api_urls() -> None:
    assert _spellings("/api/v1", "api/urls.py") == []


def test_the_examples_key_is_written_only_in_storage_keys() -> None:
    # A literal that starts with the key's folder (the pages' URLs have it in the middle).
    assert _spellings(r"^[rbfuRBFU]*['\"]+examples/", "storage/keys.py") == []


def test_api_path_puts_the_prefix_before_the_path() -> None:
    assert API_PREFIX == "/api/v1"
    assert api_path("/leaderboard/digits") == "/api/v1/leaderboard/digits"


def test_example_name_reads_back_only_this_submissions_example_keys() -> None:
    key = example_key("3f2a", "00_original")
    assert key == "examples/3f2a/00_original.png"
    assert example_name("3f2a", key) == "00_original"
    assert example_name("other", key) is None
    assert example_name("3f2a", "examples/3f2a/../secret.png") is None
    assert example_name("3f2a", "examples/3f2a/00_original.jpg") is None
    assert example_name("3f2a", "examples/3f2a/model.png") is None


@pytest.mark.parametrize("name", ["00_original", "07_transformed"])
def test_example_url_is_the_route_the_page_serves(name: str) -> None:
    assert example_url("3f2a", name) == f"/submissions/3f2a/examples/{name}.png"
