"""Write the golden fixture of journal format version 2 into tests/data/golden-v2/.

    python tests/data/make_golden_v2.py [OUTDIR]

Journal format v2 (docs/format.md 7.3, 7.7) adds journal.manifest and v2 segments with
a durable-length mark; records are unchanged, so only the journal directory is frozen
here.  It is the journal of make_golden.py (same seeded inputs, fake clock, journal id
and tiny segments) written by the v2 code.  Once committed it is never regenerated: a
change that breaks it is a format change.

Files:
- journal/: a journal directory (journal.meta v2, journal.manifest, sealed v2 segments
  with .zci files, an active segment whose mark covers every record, replicas holding
  promoted data);
- journal.json: its checkpoints and the sha256 of every volume at each of them.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _maker():
    spec = importlib.util.spec_from_file_location("make_golden", HERE / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else HERE / "golden-v2"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _maker().make_journal(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total} bytes)")


if __name__ == "__main__":
    main(sys.argv)
