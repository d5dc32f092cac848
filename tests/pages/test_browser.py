"""The pages in a real browser: Debian's Chromium, headless, driven by Playwright's Python package.

The app runs with uvicorn on a free loopback port, on a SQLite database built by the Alembic
migrations and seeded with finished submissions (landscape, fool counts, example images). The
test sorts the leaderboard by clicking a header, opens a model's page, checks that the plots
loaded, follows a running submission to its end through the polling script, and takes
screenshots into a temporary folder: the README's own come from a real demo
(``make screenshots``, scripts/screenshots.py), never from this seeded database.

Chromium comes from Debian (``scripts/chromium.sh`` installs it when it is missing); we never
run ``playwright install``. The set-up (its path, arguments, screenshot format) is the one
scripts/screenshots.py uses. Without a way to install it the test is skipped, except under CI,
where it fails.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Environment, Settings
from db.migrate import upgrade
from db.models import Evaluation, Submission, SubmissionStatus
from db.session import make_engine
from evaluator.vocabulary import TrainingMethod
from scripts.screenshots import (
    CHROMIUM_ARGS,
    VIEWPORT,
    ChromiumMissing,
    chromium_path,
    plots_loaded,
    save_screenshot,
)
from tests.factories import create_evaluation, create_finished, create_submission, create_user
from tests.pages import seed

ROOT = Path(__file__).resolve().parents[2]
README_SCREENSHOTS = ROOT / "docs" / "screenshots"


@pytest.fixture(scope="module")
def chromium() -> Path:
    try:
        return chromium_path()
    except ChromiumMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary folder for the screenshots; the README's stay as they are."""
    before = {p.name: p.stat().st_mtime_ns for p in README_SCREENSHOTS.glob("*")}
    yield tmp_path_factory.mktemp("screenshots")
    after = {p.name: p.stat().st_mtime_ns for p in README_SCREENSHOTS.glob("*")}
    assert after == before, "the browser test wrote into docs/screenshots/"


@dataclass
class LiveServer:
    url: str
    sessions: sessionmaker[Session]
    standard: str
    robust: str
    running: str


def _seed(session: Session, storage: Path) -> dict[str, str]:
    lab = create_user(session, name="madry-lab")
    other = create_user(session, name="alice")
    standard = create_finished(
        session,
        lab,
        display_name="Standard CNN",
        is_baseline=True,
        paper_url="https://arxiv.org/abs/1712.02779",
        evaluation=seed.evaluation_fields(0.95, 0.62, 0.21, 0.04, 0.94, 0.09, sensitivity=1.6),
    )
    robust = create_finished(
        session,
        lab,
        display_name="Worst-of-10 CNN",
        is_baseline=True,
        training_method=TrainingMethod.WORST_OF_K,
        paper_url="https://arxiv.org/abs/1712.02779",
        description="Robust optimisation: each step trains on the worst of 10 random transforms.",
        evaluation=seed.evaluation_fields(
            0.93, 0.90, 0.83, 0.71, 0.93, 0.80, sensitivity=0.3, seed=1
        ),
    )
    create_finished(
        session,
        other,
        display_name="Augmented CNN",
        training_method=TrainingMethod.AUGMENTATION,
        evaluation=seed.evaluation_fields(
            0.96, 0.88, 0.70, 0.52, 0.95, 0.66, sensitivity=0.6, seed=2
        ),
    )
    create_finished(
        session,
        other,
        display_name="<script>alert(1)</script>",
        extra_data=True,
        training_method=TrainingMethod.OTHER,
        evaluation=seed.evaluation_fields(
            0.90, 0.75, 0.48, 0.22, 0.91, 0.35, sensitivity=0.9, seed=3
        ),
    )
    running = create_submission(
        session, other, display_name="Running model", status=SubmissionStatus.RUNNING,
        phase="grid", progress=0.4, forward_passes=50_000, eta_seconds=90.0,
    )  # fmt: skip
    for submission in (standard, robust):
        evaluation = session.scalar(
            select(Evaluation).where(Evaluation.submission_id == submission.id)
        )
        assert evaluation is not None
        evaluation.examples = seed.write_examples(storage, submission.id, count=5)
    session.commit()
    return {"standard": standard.id, "robust": robust.id, "running": running.id}


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    import uvicorn

    from api.app import create_app

    folder = tmp_path_factory.mktemp("live")
    url = f"sqlite:///{folder / 'spatialbench.db'}"
    upgrade(url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, env=Environment.TEST, state_dir=folder, storage_dir=folder / "models",
        database_url=url, auto_migrate=True,
    )  # fmt: skip
    assert settings.storage_dir is not None
    engine: Engine = make_engine(url)
    sessions = sessionmaker(bind=engine)
    with sessions() as session:
        ids = _seed(session, settings.storage_dir)

    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), log_level="warning", ws="none", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the app did not start")
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", sessions, **ids)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        engine.dispose()


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _screenshot(page: object, folder: Path, name: str) -> None:
    save_screenshot(page, folder / name)
    assert (folder / name).read_bytes().startswith(b"\x89PNG")


def _grid_column(page: object) -> list[float]:
    cells = page.locator("table.board tbody tr td.num.headline")  # type: ignore[attr-defined]
    return [float(text.strip().split("%")[0]) for text in cells.all_inner_texts()]


def test_sort_open_a_model_and_see_its_landscape(
    live_server: LiveServer, browser: object, screenshots: Path
):
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[attr-defined]
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)

    page.goto(f"{live_server.url}/leaderboard/digits?sort=natural")
    assert page.locator("th[aria-sort]").inner_text().startswith("Natural")

    page.get_by_role("link", name="Grid", exact=True).click()
    page.wait_for_url("**/leaderboard/digits")
    grid = _grid_column(page)
    assert grid == sorted(grid, reverse=True) and grid[0] == 71.0
    assert page.locator("th[aria-sort]").get_attribute("aria-sort") == "descending"
    assert page.locator("th[aria-sort]").inner_text().startswith("Grid")
    # The model named like a script is shown as text (and never ran).
    assert page.get_by_role("link", name="<script>alert(1)</script>").count() == 1
    _screenshot(page, screenshots, "leaderboard.png")

    page.get_by_role("link", name="Worst-of-10 CNN", exact=True).click()
    page.wait_for_url(f"**/submissions/{live_server.robust}")
    assert page.locator("h1").inner_text().startswith("Worst-of-10 CNN")
    page.wait_for_load_state("networkidle")
    assert plots_loaded(page) == []
    examples = page.locator(".examples img")
    assert examples.count() == 10
    assert all(
        page.evaluate("img => img.naturalWidth", examples.nth(i).element_handle()) > 0
        for i in range(examples.count())
    )
    _screenshot(page, screenshots, "model.png")
    assert errors == []
    context.close()


def test_keyboard_skip_link(live_server: LiveServer, browser: object):
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(f"{live_server.url}/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    page.close()


def test_running_submission_updates_live_and_shows_results_when_done(
    live_server: LiveServer, browser: object
):
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(f"{live_server.url}/submissions/{live_server.running}")
    assert page.locator("#progress").get_attribute("value") == "0.4000"
    with live_server.sessions() as session:
        row = session.get(Submission, live_server.running)
        assert row is not None
        row.progress, row.forward_passes, row.phase = 0.75, 90_000, "vote"
        session.commit()
    from playwright.sync_api import expect

    # The page's CSP forbids eval, so wait with a locator rather than wait_for_function.
    expect(page.locator("[data-field=percent]")).to_have_text("75.0%", timeout=15_000)
    assert page.locator("[data-field=phase]").inner_text() == "phase: vote"
    assert page.locator("[data-field=forward_passes]").inner_text() == "90,000"
    with live_server.sessions() as session:
        row = session.get(Submission, live_server.running)
        assert row is not None
        row.status, row.progress = SubmissionStatus.FINISHED, 1.0
        create_evaluation(session, row, **seed.evaluation_fields(0.9, 0.8, 0.7, 0.6, 0.9, 0.7))
        session.commit()
    page.wait_for_selector("#results-heading", timeout=15_000)
    assert page.locator("#progress").count() == 0
    page.close()
