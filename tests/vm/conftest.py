"""The `vm` marker of the real-VM tests (select them with `pytest -m vm`)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots real guests under QEMU (TCG: a few "
                                       "seconds each); the guest kit comes from "
                                       "tests/vm/fetch_guest.sh")
