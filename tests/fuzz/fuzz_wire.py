"""atheris target: wire frames and control messages (zcore.wire).

The input is fed to a FrameReader in chunks; every frame it yields goes to the decoder of
its type.  A second mode builds a frame around the input directly (type from the first
byte) so the decoders see payloads that did not need a valid CRC.  Anything but a
zcore.errors refusal is a crash."""

import sys

import atheris

with atheris.instrument_imports():
    from zcore import wire
    from zcore.errors import ZcoreError


def decode(frame: "wire.Frame") -> None:
    if frame.type in wire.CONTROL_TYPES:
        msg = wire.parse_control(frame)
        if frame.type == wire.ATTACH:
            wire.parse_attach_vms(msg)
    elif frame.type == wire.BUNDLE:
        wire.parse_bundle(frame.payload, 4)
    elif frame.type == wire.ACK:
        wire.parse_ack(frame)


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    try:
        if mode & 1:
            types = sorted(wire.TYPE_NAMES)
            frame = wire.Frame(types[(mode >> 1) % len(types)], 0, memoryview(body))
            decode(frame)
            return
        reader = wire.FrameReader(max_payload=1 << 20)
        step = 1 + (mode >> 1)
        for i in range(0, len(body), step):
            for frame in reader.feed(body[i : i + step]):
                decode(frame)
    except ZcoreError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
