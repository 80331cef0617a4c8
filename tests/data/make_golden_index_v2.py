"""Write the golden segment index files of index format version 2 into
tests/data/golden-index-v2/.

    python tests/data/make_golden_index_v2.py

Index v2 (docs/format.md 7.4) changed only the .zci files, so its fixtures are the index
files the journal rebuilds for the frozen v1 golden journal's sealed segments: a copy of
tests/data/golden-v1/journal is opened without its .zci files and the rebuilt ones are
kept.  Like every golden fixture they are frozen once committed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from zcore.journal import Journal

DATA = Path(__file__).parent


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else DATA / "golden-index-v2"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "journal"
        shutil.copytree(DATA / "golden-v1" / "journal", copy)
        for zci in copy.glob("seg-*.zci"):
            zci.unlink()
        Journal.open(copy).close()
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for zci in sorted(copy.glob("seg-*.zci")):
            shutil.copy(zci, out / zci.name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv)
