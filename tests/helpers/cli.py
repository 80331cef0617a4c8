"""Running the installed `zcore` command from tests.

Always the console script of this interpreter's environment (what `pip install .` puts on
PATH), never `python -m zcore.cli` from the test's working directory: run from the
repository root, `-m` would import the source tree, whose extensions are not built after
a plain (non-editable) install such as CI's.
"""

from __future__ import annotations

import sys
from pathlib import Path


def zcore_cmd(*args: str) -> list[str]:
    """argv of `zcore ARGS...`."""
    script = Path(sys.executable).parent / "zcore"
    if not script.exists():
        raise RuntimeError(f"no zcore console script beside {sys.executable}: "
                           "install zcore into this environment (pip install .)")
    return [str(script), *args]
