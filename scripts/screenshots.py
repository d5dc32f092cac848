"""Regenerate the README's screenshots from a running demo.

    make demo                 # in one terminal: wait until it prints the leaderboard
    make screenshots          # in another: writes docs/screenshots/{leaderboard,model}.png

The pages are the demo's own: the ``digits`` leaderboard sorted by the grid metric, and the
page of its top model (landscape, rotation plot, fool histogram, example images). The browser
is Debian's Chromium, headless, driven by Playwright's Python package, set up exactly as the
browser test (tests/pages/test_browser.py) sets it up: ``scripts/chromium.sh`` installs it
when missing; ``playwright install`` is never run. The test imports the set-up from here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests and `make` may run as root
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
PLOTS = ("landscape", "rotation", "fool-histogram")


class ChromiumMissing(RuntimeError):
    """Chromium is not installed and scripts/chromium.sh could not install it."""


def chromium_path() -> Path:
    """Debian's Chromium, installed by scripts/chromium.sh when missing (it prints the path)."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "chromium.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    path = Path(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
    if done.returncode != 0 or path is None or not path.exists():
        raise ChromiumMissing(
            f"Chromium is missing and scripts/chromium.sh could not install it:\n{done.stderr}"
        )
    return path


def save_screenshot(page: Any, path: Path) -> None:
    """A full-page screenshot reduced to a 256-colour palette (a third of the size, and the
    pages use few colours)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def plots_loaded(page: Any) -> list[str]:
    """The model page's plots that have not loaded."""
    return [
        plot
        for plot in PLOTS
        if not page.eval_on_selector(f"#{plot}", "img => img.complete && img.naturalWidth > 0")
    ]


def take(url: str, out: Path, benchmark: str, timeout_s: float) -> list[Path]:
    """The leaderboard and its top model's page, as PNG files in ``out``."""
    from playwright.sync_api import sync_playwright

    written = [out / "leaderboard.png", out / "model.png"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium_path()), args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(timeout_s * 1000)
            page.goto(f"{url}/leaderboard/{benchmark}?sort=grid")
            top = page.locator("table.board tbody tr").first.locator("a").first
            if top.count() == 0:
                raise SystemExit(
                    f"the {benchmark} leaderboard at {url} has no model yet: wait until "
                    "`make demo` has printed its leaderboard"
                )
            save_screenshot(page, written[0])
            top.click()
            page.wait_for_url("**/submissions/*")
            page.wait_for_load_state("networkidle")
            missing = plots_loaded(page)
            if missing:
                raise SystemExit(f"the model page's plots did not load: {', '.join(missing)}")
            save_screenshot(page, written[1])
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running demo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--benchmark", default="digits")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per page action")
    args = parser.parse_args(argv)
    try:
        written = take(args.url.rstrip("/"), args.out, args.benchmark, args.timeout)
    except ChromiumMissing as exc:
        print(exc, file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
