"""Write the seed corpora under tests/fuzz/corpus/ (run once; the seeds are committed).

    python tests/fuzz/make_seeds.py
"""

from __future__ import annotations

import struct
from pathlib import Path

from zcore import bitmap, records, wire

HERE = Path(__file__).parent


def seeds() -> dict[str, dict[str, bytes]]:
    hello = wire.control(wire.HELLO, 0, version=1, site="a", nonce="00" * 16)
    write = records.encode_write(1, 1, 4096, bytes(range(256)) * 16, 1, compress=False)
    lz4 = records.encode_write(1, 2, 0, b"\1" * 8192, 1)
    zero = records.encode_write(2, 3, 0, bytes(4096), 1)
    ckpt = records.encode_checkpoint(4, 1, records.CKPT_TAGGED, True, "tag")
    zstd = records.encode_write(1, 5, 8192, b"zcore " * 682 + b"zcor", 1,
                                zstd_level=3)
    bundle_payload = wire.BUNDLE_HEAD.pack(1, 4, 1, 0) + wire.PART_HEAD.pack(0, len(write)) \
        + write
    bm = bitmap.DirtyBitmap(64 << 20)
    bm.mark(0, 1 << 20)
    bm.mark(8 << 20, 4096)
    read = struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096)
    wr = struct.pack(">IHHQQI", 0x25609513, 0, 1, 2, 4096, 512) + b"\5" * 512
    return {
        "wire": {"hello": b"\0" + hello, "bundle": b"\0" + wire.frame(wire.BUNDLE, 1,
                                                                       bundle_payload),
                 "attach": b"\x07" + b'{"vms": [["vm", [[1, "a", 4096]]]]}',
                 "ack": b"\0" + wire.ack(1, 5)},
        "records": {"raw": b"\0" + write + lz4 + zero + ckpt + zstd, "built": b"\1" * 64},
        "bitmap": {"file": b"\0" + bm.serialize(), "payload": b"\1" + bm._bm.serialize()},
        "journal_dir": {"a": bytes(range(64)), "b": b"\xff" * 32},
        "nbd": {"read": b"\1" + read, "write": b"\1" + wr,
                "opts": b"\0" + struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054,
                                                                   3, 0)},
    }


def main() -> None:
    for target, files in seeds().items():
        out = HERE / "corpus" / target
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)


if __name__ == "__main__":
    main()
