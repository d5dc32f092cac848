"""Numbers that belong to a benchmark are read from it: on an operator's benchmark with a
5 x 3 x 3 grid and worst-of-4, every page, plot and client table says 45 points and worst-of-4,
never the built-in benchmarks' 775 and worst-of-10. Also the model page's sharding line."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from config.settings import Settings
from evaluator.vocabulary import BenchmarkCounts, MetricKey, metric_texts
from spatialbench import client as cli
from tests.api.conftest import Account
from tests.factories import create_finished
from tests.fixtures_db import TestDatabase
from tests.pages import seed
from tests.pages.test_pages import get_html, table

TINY = "tiny"
TINY_TOML = f"""
[benchmarks.{TINY}]
base = "digits"
title = "Tiny grid"
grid = [5, 3, 3]
worst_of_k = 4
vote_samples = 3
"""
THETAS = [-30.0, -15.0, 0.0, 15.0, 30.0]
SHIFTS = [-3.0, 0.0, 3.0]


def no_default_numbers(text: str) -> None:
    """Neither the built-in grid's size nor its k (ids are hex, so 775 is matched whole)."""
    assert not re.search(r"\b775\b", text), re.search(r".{80}\b775\b.{80}", text, re.S)
    assert "of-10" not in text.lower()


@pytest.fixture(name="settings")
def settings_fixture(test_db: TestDatabase, tmp_path: Path) -> Settings:
    benchmarks = tmp_path / "benchmarks.toml"
    benchmarks.write_text(TINY_TOML)
    return test_db.settings(tmp_path, benchmarks_file=benchmarks)


def tiny_fields(**config: Any) -> dict[str, Any]:
    """A full evaluation record on the tiny benchmark, as the worker stores it."""
    fields = seed.evaluation_fields(0.95, 0.70, 0.50, 0.30, 0.90, 0.40)
    images = fields["images"]
    fields["landscape"] = seed.landscape(0.95, 1.0, images - 40, thetas=THETAS, shifts=SHIFTS)
    fields["per_image"] = seed.per_image(images, robust=0.3, grid_points=45)
    fields["config"] = {
        **fields["config"], "grid": [5, 3, 3], "worst_of_k": 4, "vote_samples": 3, **config
    }  # fmt: skip
    fields["cost"] = {**fields["cost"], "full_grid_forward_passes": images * 45}
    return fields


@pytest.fixture(name="tiny")
def tiny_fixture(test_db: TestDatabase, alice: Account) -> str:
    created = create_finished(
        test_db.session, alice.user, display_name="Tiny model", benchmark=TINY,
        evaluation=tiny_fields(),
    )  # fmt: skip
    test_db.session.commit()
    return created.id


def test_vocabulary_words_the_metrics_with_the_counts_given() -> None:
    counts = BenchmarkCounts.of({"grid": [5, 3, 3], "worst_of_k": 4, "vote_samples": 3})
    assert counts == BenchmarkCounts(worst_of_k=4, grid_points=45, vote_samples=3)
    texts = metric_texts(counts)
    assert texts[MetricKey.WORST_OF_K].label == "Worst-of-4"
    assert "all 4 independent uniform draws" in texts[MetricKey.WORST_OF_K].description
    assert "every one of the 45 grid points" in texts[MetricKey.GRID].description
    assert "all 45 grid points" in texts[MetricKey.GRID_VOTE].description
    assert "3 random transformations" in texts[MetricKey.VOTE_NATURAL].description
    # Without counts (several benchmarks, or a record without them): no number at all.
    unknown = metric_texts(None)
    assert unknown[MetricKey.WORST_OF_K].short == "worst-of-k"
    assert not any(re.search(r"\d", t.label + t.description) for t in unknown.values())


@pytest.mark.parametrize(
    "record",
    [None, {}, {"grid": [5, 3], "worst_of_k": 4}, {"grid": [5, "x", 3], "worst_of_k": 4,
     "vote_samples": 3}, {"grid_points": 45, "worst_of_k": True, "vote_samples": 3},
     {"grid_points": -45, "worst_of_k": 4, "vote_samples": 3}],
)  # fmt: skip
def test_counts_of_a_malformed_record_are_unknown(record: Any) -> None:
    assert BenchmarkCounts.of(record) is None


def test_leaderboard_of_the_tiny_benchmark_states_its_own_numbers(
    client: TestClient, tiny: str
) -> None:
    page = get_html(client, f"/leaderboard/{TINY}?sort=worst_of_k")
    no_default_numbers(page)
    assert "5 × 3 × 3 = <strong>45</strong>" in page
    head = table(page).split("<tbody>")[0]
    assert ">Worst-of-4" in head and "every one of the 45 grid points" in head
    assert "sorted by worst-of-4, best first" in page
    assert f'href="/submissions/{tiny}"' in page


def test_model_page_plots_and_json_of_a_tiny_evaluation(client: TestClient, tiny: str) -> None:
    page = get_html(client, f"/submissions/{tiny}")
    no_default_numbers(page)
    assert "Worst-of-4" in page and "every one of the 45 grid points" in page
    assert "5 × 3 × 3 grid points" in page
    svg = client.get(f"/submissions/{tiny}/fool-histogram.svg")
    assert svg.status_code == 200
    no_default_numbers(svg.text)
    assert "grid points (of 45)" in svg.text


def test_the_histogram_falls_back_to_the_benchmarks_grid_not_the_default(
    client: TestClient, test_db: TestDatabase, alice: Account
) -> None:
    fields = tiny_fields()
    fields["config"].pop("grid")
    fields["landscape"] = None
    created = create_finished(
        test_db.session, alice.user, benchmark=TINY, evaluation=fields
    )  # fmt: skip
    test_db.session.commit()
    svg = client.get(f"/submissions/{created.id}/fool-histogram.svg")
    assert svg.status_code == 200
    assert "grid points (of 45)" in svg.text


def test_home_page_card_states_each_benchmarks_grid(client: TestClient, tiny: str) -> None:
    page = get_html(client, "/")
    card = page[page.index(f'id="bench-{TINY}"') :]
    card = card[: card.index("</article>")]
    assert "5 × 3 × 3 = 45 transformations" in card and "worst-of-4" in card
    # The benchmarks differ, so the prose claims no one grid or k for all of them.
    assert "775 transformations per image" not in page
    assert "<dt>Worst-of-k" in page and "<dt>Worst-of-10" not in page


def test_client_tables_of_the_tiny_benchmark(
    client: TestClient, tiny: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = client.get(f"/api/v1/leaderboard/{TINY}").json()
    record = next(b for b in client.get("/api/v1/benchmarks").json() if b["name"] == TINY)
    buffer = io.StringIO()
    Console(file=buffer, width=220).print(
        cli.leaderboard_table(body, TINY, "grid", BenchmarkCounts.of(record))
    )
    board = buffer.getvalue()
    assert "worst-of-4" in board and "Tiny model" in board
    no_default_numbers(board)
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=220))
    cli.print_state(client.get(f"/api/v1/submissions/{tiny}").json())
    assert "worst-of-4" in buffer.getvalue()
    no_default_numbers(buffer.getvalue())


def test_model_page_says_how_a_sharded_evaluation_was_split(
    client: TestClient, test_db: TestDatabase, alice: Account, tiny: str
) -> None:
    sharding = {"shards": 12, "shard_images": 45, "workers": 3,
                "worker_names": ["gpu-a", "gpu-b", "<b>gpu-c</b>"]}  # fmt: skip
    created = create_finished(
        test_db.session, alice.user, benchmark=TINY, evaluation=tiny_fields(sharding=sharding)
    )  # fmt: skip
    test_db.session.commit()
    page = get_html(client, f"/submissions/{created.id}")
    record = page[page.index('id="sharding"') :]
    record = record[: record.index("</div>")]
    assert "Evaluated in 12 shards by 3 workers" in record
    assert "up to 45 images a shard" in record
    assert "gpu-a, gpu-b, &lt;b&gt;gpu-c&lt;/b&gt;" in record
    # Run in one piece: nothing is said about shards.
    assert 'id="sharding"' not in get_html(client, f"/submissions/{tiny}")
