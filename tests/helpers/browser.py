"""A real browser for the UI tests: Debian's Chromium driven headless by Playwright
(`playwright install` cannot download browsers here, so the system one is used), a
watcher that fails a test on any console error it did not expect, and screenshots.

Missing Playwright or Chromium skips, except in CI (CI=true), where .ci/run installs both
and their absence fails (the rule of conftest's require_tool)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def chromium_path() -> str:
    """The system Chromium (ZCORE_CHROMIUM names another)."""
    named = os.environ.get("ZCORE_CHROMIUM")
    if named:
        return named
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    _missing("chromium is not installed (apt-get install chromium; .ci/run does)")
    raise AssertionError  # unreachable: _missing raised


def playwright_module() -> Any:
    try:
        from playwright import sync_api
    except ImportError:
        _missing("playwright is not installed (pip install '.[test]')")
    return sync_api


@dataclass
class Console:
    """Console errors and uncaught exceptions of every page watched.  A page load the
    flow expects to be refused (Chromium logs it as an error) is declared with `expect`."""

    errors: list[str] = field(default_factory=list)
    expected: list[tuple[str, int]] = field(default_factory=list)

    def watch(self, page: Any) -> Any:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        return page

    def _console(self, message: Any) -> None:
        if message.type not in ("error", "assert"):
            return
        url = str(message.location.get("url", ""))
        text = str(message.text)
        for path, status in self.expected:
            if path in url and f"status of {status}" in text:
                return
        self.errors.append(f"{text} ({url})")

    def expect(self, path: str, status: int) -> None:
        self.expected.append((path, status))

    def take(self) -> list[str]:
        found, self.errors, self.expected = self.errors, [], []
        return found


def screenshot_dir(default: Path) -> Path:
    """$ZCORE_UI_SCREENSHOTS, else `default` (under the test's temporary directory)."""
    path = Path(os.environ.get("ZCORE_UI_SCREENSHOTS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path
