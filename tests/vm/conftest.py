"""The `vm` marker of the real-VM tests (select them with `pytest -m vm`) and their shared
fixtures: the guest kit (tests/helpers/vm.py) and two site services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from helpers.site import SiteProcess, two_sites
from helpers.vm import VMKit, vm_kit


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots real guests under QEMU (TCG: a few "
                                       "seconds each); the guest kit comes from "
                                       "tests/vm/fetch_guest.sh")


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> VMKit:
    require_tool("qemu-system-x86_64")
    return vm_kit(tmp_path_factory.mktemp("vmkit"))


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[SiteProcess, SiteProcess]]:
    """Sites alpha (A) and beta (B), each a `zcore site serve` process."""
    with two_sites(tmp_path) as pair:
        yield pair
