"""Whatever is stored as a result, the pages stay up: plots draw in bounded time (their axes
and panels are the grid's, not the data's), and a malformed result gives a page that says so.
"""

# The API fixtures are imported from tests.api.conftest, so tests name them as parameters.
# ruff: noqa: F811

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import plots
from tests.api.conftest import (  # noqa: F401  (fixtures)
    client,
    enqueued,
    settings,
)
from tests.factories import create_finished, create_user
from tests.fixtures_db import (  # noqa: F401  (fixtures)
    TestDatabase,
    pg_connection_fixture,
    test_db_fixture,
)
from tests.pages import seed


def test_a_stored_fool_count_far_beyond_the_grid_keeps_the_grids_axis() -> None:
    # A stored count of 300,000 once stretched the axis to 300,000 with a tick every 200:
    # 1,500 ticks and 12 s of rendering behind the global render lock.
    per_image = {"grid_fool_count": [300_000, 5, 0, 0, -1]}
    svg = plots.fool_histogram_svg(per_image, 775).decode()
    assert "300000" not in svg and "300,000" not in svg
    assert ">775<" in svg
    assert svg.count("xtick_") <= plots.MAX_TICKS + 4


def test_a_stored_grid_of_absurd_size_is_not_drawn() -> None:
    # One panel per dx: 40 panels of 31 x 5 cells would be drawn for minutes.
    n_dx = plots.MAX_PANELS + 8
    landscape = {
        "accuracy": [[[0.5] * 5 for _ in range(n_dx)] for _ in range(31)],
        "thetas": list(range(31)),
        "dxs": list(range(n_dx)),
        "dys": list(range(5)),
    }
    with pytest.raises(plots.PlotUnavailable, match="too large"):
        plots.landscape_svg(landscape)
    with pytest.raises(plots.PlotUnavailable, match="too large"):
        plots.rotation_svg(landscape)


def test_non_numbers_in_a_stored_landscape_are_not_drawn() -> None:
    landscape = seed.landscape()
    landscape["accuracy"][0][0][0] = float("nan")
    with pytest.raises(plots.PlotUnavailable):
        plots.landscape_svg(landscape)


MALFORMED: list[dict[str, Any]] = [
    {"versions": ["not", "a", "mapping"]},
    {"config": ["not", "a", "mapping"]},
    {"cost": {"forward_passes_by_phase": 7}},
    {"landscape": "not a landscape"},
    {"examples": [{"original": 1, "transformed": None, "point": "x"}]},
    {"metrics": {"grid": {"correct": "x", "total": []}}, "images": 540},
]


@pytest.mark.parametrize("broken", MALFORMED)
def test_a_malformed_stored_result_gives_a_page_that_says_so(
    client: TestClient, test_db: TestDatabase, broken: dict[str, Any]
) -> None:
    owner = create_user(test_db.session, name="mallory")
    fields = {"landscape": seed.landscape(), "per_image": seed.per_image(), **broken}
    submission = create_finished(test_db.session, owner, evaluation=fields)
    test_db.session.commit()
    page = client.get(f"/submissions/{submission.id}", headers={"accept": "text/html"})
    assert page.status_code == 200
    assert "status-finished" in page.text
    if "cannot be shown" in page.text:
        assert "stored result is malformed" in page.text
    for plot in ("landscape.svg", "rotation.svg", "fool-histogram.svg"):
        answer = client.get(f"/submissions/{submission.id}/{plot}")
        assert answer.status_code in (200, 404), (plot, answer.status_code)


def test_the_page_of_a_malformed_result_names_the_problem(
    client: TestClient, test_db: TestDatabase
) -> None:
    owner = create_user(test_db.session, name="mallory")
    submission = create_finished(test_db.session, owner, evaluation={"versions": [1, 2]})
    test_db.session.commit()
    page = client.get(f"/submissions/{submission.id}", headers={"accept": "text/html"})
    assert page.status_code == 200
    assert "stored result is malformed and cannot be shown" in page.text
