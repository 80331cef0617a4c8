"""zcore: continuous data protection for virtual disks.

Writes to protected volumes are captured in order, shipped to a recovery site and kept
in a per-VM journal with crash-consistent checkpoints; any checkpoint reads back at once
through the journal on top of the replica volumes.
"""

from importlib.metadata import PackageNotFoundError, version

from zcore.errors import ZcoreError
from zcore.journal import Journal, JournalSettings, View
from zcore.records import Checkpoint

__all__ = ["Checkpoint", "Journal", "JournalSettings", "View", "ZcoreError"]

# the one version source is pyproject.toml; an uninstalled source tree has none
try:
    __version__ = version("zcore")
except PackageNotFoundError:  # pragma: no cover - only outside any installation
    __version__ = "0+unknown"
