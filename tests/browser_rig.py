"""A real headless Chromium for the management page's tests: Debian's
``chromium`` package driven by Playwright's Python package.

Playwright's own browser download cannot work here (no network beyond the
package registries), so the browser is the system one, named by
``executable_path``. Without it the tests fail, with the command that
installs it, rather than skip: `.ci/run` installs it with apt.

Screenshots go to ``tests/artifacts/`` (ignored by git), kept after the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.helpers import ROOT

CHROMIUM = os.environ.get("TALKBRIDGE_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
# No GPU, no sandbox (root in CI), and nothing that reaches for the network by itself.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1440, "height": 900}


def chromium_path() -> str:
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the browser tests need Debian's chromium package "
            "(apt-get install chromium; .ci/run installs it) or TALKBRIDGE_TEST_CHROMIUM=/path/to/chromium",
            pytrace=False,
        )
    return CHROMIUM


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium, closed on exit."""
    path = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> Path:
    """Save the page as tests/artifacts/NAME.png (whole page) and return the path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
