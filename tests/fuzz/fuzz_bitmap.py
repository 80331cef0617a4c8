"""atheris target: persisted dirty bitmaps (zcore.bitmap.DirtyBitmap.deserialize, which
`load` reads files with).  The input is a payload; half the time it gets a header with
correct CRCs so pyroaring's decoder and the range checks see it."""

import struct
import sys

import atheris

with atheris.instrument_imports():
    from zcore import bitmap
    from zcore._native.record import crc32c
    from zcore.errors import ZcoreError

VOLUME = 64 << 20


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        block = bitmap.BLOCK << (mode >> 1 & 3)
        head = bitmap.HEADER.pack(bitmap.MAGIC, bitmap.VERSION, bitmap.HEADER.size, VOLUME,
                                  block, 0, len(body), crc32c(body), 0)
        body = head[:60] + struct.pack("<I", crc32c(head[:60])) + body
    try:
        bm = bitmap.DirtyBitmap.deserialize(body, volume_size=VOLUME)
    except ZcoreError:
        return
    # a bitmap that loads must behave: its extents lie inside the volume
    for offset, length in bm.extents(1 << 20):
        assert 0 <= offset and offset + length <= VOLUME, (offset, length)
    bm.serialize()


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
