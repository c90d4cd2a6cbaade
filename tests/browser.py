"""A headless system Chromium driven by Playwright, for the report's browser tests.

Playwright's own browser download (``playwright install``) is never used: the
tests drive the Chromium of the system, ``/usr/bin/chromium`` or the binary
named by ``$PATCHMOSAIC_CHROMIUM``. Without it, or without the ``playwright``
package, the tests are skipped with instructions (``make browser`` installs
Chromium with apt-get where it can, see ``scripts/install_chromium.sh``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM_ENV = "PATCHMOSAIC_CHROMIUM"
REQUIRE_ENV = "PATCHMOSAIC_REQUIRE_BROWSER"  # "1" (CI): a missing browser fails the test instead of skipping it
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Headless, offline and quiet: no sandbox (containers run as root), no GPU, no background requests.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """The Chromium binary the tests use: ``$PATCHMOSAIC_CHROMIUM`` or ``/usr/bin/chromium``."""
    return os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM


@contextmanager
def launch_chromium() -> Iterator[Any]:
    """Yield a launched headless Playwright ``Browser``; ``pytest.skip`` if none is available.

    With ``$PATCHMOSAIC_REQUIRE_BROWSER=1`` (set by ``.ci/run``) a missing browser is a failure.
    """
    skip = pytest.fail if os.environ.get(REQUIRE_ENV) == "1" else pytest.skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip("the browser test needs playwright: `make install` (requirements-dev.txt pins "
                    "playwright==1.65.2; its browsers are not needed, never run `playwright install`)")
    path = chromium_path()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        skip(f"no Chromium at {path}: run `make browser` (or `sudo apt-get install chromium`), or set "
                    f"{CHROMIUM_ENV} to a Chromium/Chrome binary")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
