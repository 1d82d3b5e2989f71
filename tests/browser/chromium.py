"""How the browser journeys and the page benchmark start Debian's chromium (never a downloaded
browser): one place for its path and flags."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Playwright

from tests.helpers import DEMO_PASSWORD

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "DEMO_PASSWORD", "launch"]  # DEMO_PASSWORD: bench/bench_web.py reads it here

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
