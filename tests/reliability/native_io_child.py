"""Child process of test_native_io: runs one scenario on a journal under the LD_PRELOAD
fail shim (tests/native/fail_shim.c) and prints what happened as one JSON line.

    python native_io_child.py JOURNAL SCENARIO

Scenarios arm the shim (ZC_SHIM_ARM, through os.environ) only around the call under test:
"read" (a view read: the native read-through's pread), "commit" (the group commit's
fdatasync), "append" (the segment pwrite)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

from zcore.journal import Journal


def _error(fn) -> str | None:
    os.environ["ZC_SHIM_ARM"] = "1"
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    finally:
        os.environ["ZC_SHIM_ARM"] = "0"
    return None


def _digest(journal: Journal) -> str:
    h = hashlib.sha256()
    with journal.view(journal.latest_checkpoint()) as view:
        for vid, spec in sorted(journal.volumes.items()):
            h.update(view.read(vid, 0, spec.size))
    return h.hexdigest()


def main(path: str, scenario: str) -> None:
    out: dict[str, object] = {}
    journal = Journal.open(path)
    journal.wait_loaded()
    if scenario == "read":
        def read() -> None:
            with journal.view(journal.latest_checkpoint()) as view:
                for vid, spec in journal.volumes.items():
                    view.read(vid, 0, spec.size)
        out["error"] = _error(read)
        out["after"] = _digest(journal)
    elif scenario == "commit":
        journal.append([(1, 0, os.urandom(8192))], compress=False)
        out["error"] = _error(journal.commit)
        try:
            journal.commit()
            out["again"] = None
        except Exception as exc:
            out["again"] = type(exc).__qualname__
    elif scenario == "append":
        out["error"] = _error(lambda: journal.append([(1, 4096, os.urandom(8192))],
                                                     compress=False))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    try:
        journal.close()
    except Exception as exc:
        out["close"] = type(exc).__qualname__
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
