"""A durable-overlay writer run as its own process, so a test can kill -9 it: it opens
the journal, a view at a checkpoint and a DurableOverlay, runs the operations of a JSON
file one by one and prints `A <index>` once each has returned (for a flush: once it is
acknowledged).  Run: python helpers/overlay.py JOURNAL CHECKPOINT_ID VOLUME DIR OPS.json

An operation is [kind, offset, length, fill]: kind "w" writes `length` bytes of
`fill_bytes(fill, offset, length)`, "z" zeroes, "t" trims, "f" flushes."""

from __future__ import annotations

import json
import sys

SECTOR = 512


def fill_bytes(fill: int, offset: int, length: int) -> bytes:
    """Distinct bytes for each (operation, sector): sector i of the write holds its fill
    byte and its absolute sector number."""
    out = bytearray()
    for s in range(offset // SECTOR, (offset + length) // SECTOR):
        out += (bytes([fill % 251 + 1]) + s.to_bytes(8, "little")) * (SECTOR // 9) + \
            bytes(SECTOR % 9)
    return bytes(out)


def main(argv: list[str]) -> None:
    from zcore.journal import Journal
    from zcore.recovery import DurableOverlay

    path, cid, volume, directory, ops_path = argv
    ops = json.loads(open(ops_path).read())
    journal = Journal.open(path)
    overlay = DurableOverlay(journal.view(int(cid)), volume, directory, owns_view=True)
    print("R", flush=True)
    for i, (kind, offset, length, fill) in enumerate(ops):
        if kind == "w":
            overlay.write(offset, fill_bytes(fill, offset, length))
        elif kind == "z":
            overlay.write_zeroes(offset, length)
        elif kind == "t":
            overlay.trim(offset, length)
        else:
            overlay.flush()
        print(f"A {i}", flush=True)
    sys.stdin.read()  # wait to be killed


if __name__ == "__main__":
    main(sys.argv[1:])
