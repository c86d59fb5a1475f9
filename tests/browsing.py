"""Driving Debian's Chromium with Playwright in the browser tests (fixtures ``browser``, ``console``, ``context`` in
conftest.py). ``playwright install`` cannot download browsers here: the tests launch /usr/bin/chromium."""

from __future__ import annotations

from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 15_000
Page = Any  # playwright.sync_api.Page


class Console:
    """What the pages logged as errors (a CSP violation among them), and every request they made."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []

    def watch(self, opened: Page) -> None:
        opened.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        opened.on("pageerror", lambda e: self.errors.append(str(e)))
        opened.on("request", lambda r: self.requests.append(f"{r.method} {r.url}"))
