"""Wire protocol v2 (zcore.wire; v1 peers are still served): frames, control messages,
bundles and acks, parsed as hostile input.  Every malformed frame is refused with
ProtocolError, lengths are refused before anything is allocated, and no damaged frame is
ever returned as a frame."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zcore import records, wire
from zcore._native.record import crc32c
from zcore.errors import ProtocolError


def _header(ftype=wire.HELLO, channel=0, payload=b"", *, magic=wire.MAGIC, flags=0,
            length=None, pcrc=None, hcrc=None) -> bytes:
    head = wire.HEADER.pack(magic, ftype, flags, channel,
                            len(payload) if length is None else length,
                            crc32c(payload) if pcrc is None else pcrc, 0)
    crc = crc32c(head[:20]) if hcrc is None else hcrc
    return head[:20] + struct.pack("<I", crc)


def _parse(data: bytes, **kw) -> list[wire.Frame]:
    return wire.FrameReader(**kw).feed(data)


# ---- frames ----------------------------------------------------------------------------

frames = st.lists(st.tuples(
    st.sampled_from(sorted(wire.TYPE_NAMES)),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=3000),
), max_size=8)


@given(frames, st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_frames_parse_back_whatever_the_chunking(items, cuts):
    stream = b"".join(wire.frame(t, c, p) for t, c, p in items)
    reader = wire.FrameReader()
    got = []
    at, i = 0, 0
    while at < len(stream):
        n = cuts[i % len(cuts)]
        got += reader.feed(stream[at : at + n])
        at += n
        i += 1
    assert [(f.type, f.channel, bytes(f.payload)) for f in got] == items


def test_the_buffered_protocol_interface_parses_frames_written_into_its_buffers():
    stream = wire.frame(wire.HEARTBEAT, 0, b"x" * 8) + wire.ack(3, 99)
    reader = wire.FrameReader()
    got = []
    view = memoryview(stream)
    while view:
        buf = reader.get_buffer()
        n = min(len(buf), len(view), 7)
        buf[:n] = view[:n]
        view = view[n:]
        got += reader.received(n)
    assert [f.type for f in got] == [wire.HEARTBEAT, wire.ACK]
    assert wire.parse_ack(got[1]) == 99 and got[1].channel == 3


def test_bad_magic_is_refused():
    with pytest.raises(ProtocolError, match="magic"):
        _parse(_header(magic=b"ZCWX"))


def test_plaintext_http_is_refused_as_bad_magic():
    with pytest.raises(ProtocolError, match="magic"):
        _parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def test_header_checksum_mismatch_is_refused():
    head = bytearray(_header())
    head[-1] ^= 1
    with pytest.raises(ProtocolError, match="header checksum"):
        _parse(bytes(head))


def test_header_field_altered_after_its_checksum_is_refused():
    head = bytearray(_header(wire.ATTACH, 1))
    head[8] ^= 0x40  # the channel, under a now stale header checksum
    with pytest.raises(ProtocolError, match="header checksum"):
        _parse(bytes(head))


@pytest.mark.parametrize("ftype", [0, 14, 31, 40, 255, 65535])
def test_unknown_frame_type_is_refused(ftype):
    with pytest.raises(ProtocolError, match="unknown frame type"):
        _parse(_header(ftype))


def test_nonzero_flags_are_refused():
    with pytest.raises(ProtocolError, match="flags"):
        _parse(_header(wire.HEARTBEAT, flags=1))


@pytest.mark.parametrize("ftype", sorted(wire.CONTROL_TYPES))
def test_oversized_control_frame_is_refused_at_its_header(ftype):
    reader = wire.FrameReader()
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed(_header(ftype, length=wire.MAX_CONTROL + 1))
    assert reader.payload_allocated == 0  # nothing was allocated for it


@pytest.mark.parametrize("length", [wire.MAX_PAYLOAD + 1, 2**32 - 1])
def test_oversized_bundle_is_refused_at_its_header(length):
    reader = wire.FrameReader()
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed(_header(wire.BUNDLE, 1, length=length))
    assert reader.payload_allocated == 0


def test_a_reader_with_a_smaller_bound_refuses_above_it():
    with pytest.raises(ProtocolError, match="exceeds"):
        _parse(_header(wire.BUNDLE, 1, length=1025), max_payload=1024)
    assert _parse(wire.frame(wire.BUNDLE, 1, bytes(1024)), max_payload=1024)


def test_payload_checksum_mismatch_is_refused():
    payload = b'{"reason": "x"}'
    data = _header(wire.CLOSE, 0, payload, pcrc=crc32c(payload) ^ 1) + payload
    with pytest.raises(ProtocolError, match="payload checksum"):
        _parse(data)


def test_empty_payload_frame_completes_without_more_bytes():
    got = _parse(wire.frame(wire.HEARTBEAT, 0))
    assert len(got) == 1 and bytes(got[0].payload) == b""


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_give_frames_or_protocol_errors_only(data):
    try:
        for f in _parse(data):
            assert f.type in wire.TYPE_NAMES
    except ProtocolError:
        pass


@given(st.lists(st.tuples(st.sampled_from(sorted(wire.TYPE_NAMES)), st.binary(max_size=300)),
                min_size=1, max_size=4), st.data())
def test_no_flipped_bit_anywhere_ever_yields_a_frame_that_was_not_sent(items, data):
    sent = [wire.frame(t, 1, p) for t, p in items]
    stream = bytearray(b"".join(sent))
    bit = data.draw(st.integers(0, len(stream) * 8 - 1))
    stream[bit // 8] ^= 1 << (bit % 8)
    originals = [(t, 1, p) for t, p in items]
    try:
        got = _parse(bytes(stream))
    except ProtocolError:
        return
    # only frames wholly before the flipped byte may come out, and unchanged
    ends = [sum(map(len, sent[: i + 1])) for i in range(len(sent))]
    intact = sum(1 for e in ends if e <= bit // 8)
    assert [(f.type, f.channel, bytes(f.payload)) for f in got] == originals[: len(got)]
    assert len(got) <= intact


# ---- control messages -------------------------------------------------------------------

def _control(ftype, payload: bytes) -> wire.Frame:
    return wire.Frame(ftype, 0, memoryview(payload))


HELLO = {"protocol": 1, "site_id": "a", "site_name": "b", "role": "protected"}


def test_control_messages_round_trip():
    f = _parse(wire.control(wire.HELLO, **HELLO))[0]
    assert wire.parse_control(f) == HELLO


@pytest.mark.parametrize("payload", [b"{", b"\xff\xfe", b"", b"nul", b'{"a": 1}}'])
def test_malformed_json_is_refused(payload):
    with pytest.raises(ProtocolError, match="not JSON"):
        wire.parse_control(_control(wire.HELLO, payload))


@pytest.mark.parametrize("payload", [b"[" * 60_000, b'{"a": ' * 10_000, b'[{"a": ' * 8_000])
def test_deeply_nested_control_payload_is_a_protocol_error_not_a_recursion_error(payload):
    # issue 9 finding 9: it fits one control frame (even before HELLO), and a
    # RecursionError escaped the connection's handler, so no refusal reason was recorded
    frame = wire.frame(wire.HELLO, 0, payload)
    assert len(payload) <= wire.MAX_CONTROL
    with pytest.raises(ProtocolError, match="nests too deeply"):
        wire.parse_control(_parse(frame)[0])


@pytest.mark.parametrize("doc", [[], "hello", 1, None])
def test_control_payload_that_is_not_an_object_is_refused(doc):
    with pytest.raises(ProtocolError, match="not an object"):
        wire.parse_control(_control(wire.HELLO, json.dumps(doc).encode()))


@pytest.mark.parametrize("key", sorted(HELLO))
def test_control_message_missing_a_key_is_refused(key):
    doc = {k: v for k, v in HELLO.items() if k != key}
    with pytest.raises(ProtocolError, match=key):
        wire.parse_control(_control(wire.HELLO, json.dumps(doc).encode()))


@pytest.mark.parametrize("protocol", ["1", 1.0, True, None, [1]])
def test_control_field_of_the_wrong_type_is_refused(protocol):
    doc = dict(HELLO, protocol=protocol)
    with pytest.raises(ProtocolError, match="protocol"):
        wire.parse_control(_control(wire.HELLO, json.dumps(doc).encode()))


@pytest.mark.parametrize("ftype", [wire.BUNDLE, wire.ACK, wire.HEARTBEAT])
def test_binary_frames_are_not_control_messages(ftype):
    with pytest.raises(ProtocolError, match="not a control message"):
        wire.parse_control(_control(ftype, b"{}"))


def _attach(vms) -> dict:
    return {"vpg": "g", "vms": vms, "journal": {}}


GOOD_VM = {"name": "vm1", "volumes": [{"id": 0, "name": "d0", "size": 1 << 20}]}


def test_attach_volumes_are_parsed():
    vms = [GOOD_VM, {"name": "vm-2", "volumes": [{"id": 1, "name": "d", "size": 512},
                                                 {"id": 2, "name": "e", "size": 4096}]}]
    assert wire.parse_attach_vms(_attach(vms)) == [
        ("vm1", [(0, "d0", 1 << 20)]), ("vm-2", [(1, "d", 512), (2, "e", 4096)])]


@pytest.mark.parametrize("vms", [
    [],
    [GOOD_VM, GOOD_VM],  # the same VM twice
    [{"name": "..", "volumes": GOOD_VM["volumes"]}],
    [{"name": "a/b", "volumes": GOOD_VM["volumes"]}],
    [{"name": "", "volumes": GOOD_VM["volumes"]}],
    [{"name": "x" * 129, "volumes": GOOD_VM["volumes"]}],
    [{"name": 5, "volumes": GOOD_VM["volumes"]}],
    ["vm1"],
    [{"name": "vm1", "volumes": []}],
    [{"name": "vm1", "volumes": "d0"}],
    [{"name": "vm1", "volumes": [{"id": 0, "name": "d0"}]}],
    [{"name": "vm1", "volumes": [{"id": 0, "name": "d0", "size": 1000}]}],
    [{"name": "vm1", "volumes": [{"id": 0, "name": "d0", "size": 0}]}],
    [{"name": "vm1", "volumes": [{"id": -1, "name": "d0", "size": 512}]}],
    [{"name": "vm1", "volumes": [{"id": 65536, "name": "d0", "size": 512}]}],
    [{"name": "vm1", "volumes": [{"id": "x", "name": "d0", "size": 512}]}],
    [{"name": "vm1", "volumes": [{"id": 0, "name": "a", "size": 512},
                                 {"id": 0, "name": "b", "size": 512}]}],
    [GOOD_VM, {"name": "vm2", "volumes": [{"id": 0, "name": "b", "size": 512}]}],
])
def test_malformed_attach_is_refused(vms):
    with pytest.raises(ProtocolError):
        wire.parse_attach_vms(_attach(vms))


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\\b", "a\x00b", "é" * 2 + "/"])
def test_unsafe_names_are_not_path_components(name):
    assert not wire.safe_name(name)


# ---- bundles and acks -------------------------------------------------------------------

def _records(first_seq: int, n: int, volume: int = 0) -> bytes:
    return b"".join(records.encode_write(volume, first_seq + i, 4096 * i, bytes([i]) * 4096,
                                         1, compress=False) for i in range(n))


def _bundle_payload(first, last, parts) -> bytes:
    frame = b"".join(bytes(b) for b in wire.bundle_frames(1, first, last, parts))
    return frame[wire.HEADER.size:]


def test_bundle_frames_parse_back_with_their_parts():
    parts = [(0, _records(1, 3)), (2, _records(4, 2, 1))]
    frame = b"".join(bytes(b) for b in wire.bundle_frames(5, 1, 5, parts))
    f = _parse(frame)[0]
    assert (f.type, f.channel) == (wire.BUNDLE, 5)
    b = wire.parse_bundle(f.payload, 3)
    assert (b.first_seq, b.last_seq) == (1, 5)
    assert [(vm, bytes(p)) for vm, p in b.parts] == parts


@pytest.mark.parametrize("payload, why", [
    (b"", "shorter"),
    (bytes(wire.BUNDLE_HEAD.size - 1), "shorter"),
    (wire.BUNDLE_HEAD.pack(0, 5, 0, 0), "invalid"),  # seq 0 is no seq
    (wire.BUNDLE_HEAD.pack(6, 5, 0, 0), "invalid"),  # last before first
    (wire.BUNDLE_HEAD.pack(1, 5, 0, 7), "invalid"),  # reserved field set
    (wire.BUNDLE_HEAD.pack(1, 5, 3, 0), "invalid"),  # more parts than VMs
    (wire.BUNDLE_HEAD.pack(1, 5, 2, 0) + wire.PART_HEAD.pack(0, 0), "part table"),
    (wire.BUNDLE_HEAD.pack(1, 5, 1, 0) + wire.PART_HEAD.pack(2, 0), "unknown VM"),
    (wire.BUNDLE_HEAD.pack(1, 5, 1, 0) + wire.PART_HEAD.pack(0, 10) + bytes(9), "passes"),
    (wire.BUNDLE_HEAD.pack(1, 5, 2, 0) + wire.PART_HEAD.pack(0, 1)
     + wire.PART_HEAD.pack(0, 1) + b"ab", "unknown VM"),  # the same VM twice
    (wire.BUNDLE_HEAD.pack(1, 5, 1, 0) + wire.PART_HEAD.pack(0, 1) + b"ab", "trailing"),
    (wire.BUNDLE_HEAD.pack(1, 5, 1, 0) + wire.PART_HEAD.pack(0, 2**32 - 1) + b"ab", "passes"),
])
def test_malformed_bundle_is_refused(payload, why):
    with pytest.raises(ProtocolError, match=why):
        wire.parse_bundle(memoryview(payload), 2)


@given(st.binary(max_size=400), st.integers(1, 4))
def test_any_bundle_payload_parses_into_parts_inside_it_or_is_refused(payload, nvms):
    try:
        b = wire.parse_bundle(memoryview(payload), nvms)
    except ProtocolError:
        return
    assert sum(len(p) for _, p in b.parts) <= len(payload)
    assert all(0 <= vm < nvms for vm, _ in b.parts)


@pytest.mark.parametrize("size", [0, 7, 9, 16])
def test_ack_of_the_wrong_size_is_refused(size):
    with pytest.raises(ProtocolError, match="wrong size"):
        wire.parse_ack(wire.Frame(wire.ACK, 1, memoryview(bytes(size))))


def test_ack_round_trips():
    f = _parse(wire.ack(7, 2**64 - 1))[0]
    assert f.channel == 7 and wire.parse_ack(f) == 2**64 - 1


def test_iter_records_walks_record_headers():
    part = _records(10, 4)
    got = list(wire.iter_records(memoryview(part)))
    assert [seq for seq, _ in got] == [10, 11, 12, 13]
    assert [pos for _, pos in got] == sorted(pos for _, pos in got)


@given(st.binary(max_size=2000))
def test_iter_records_ends_on_any_bytes(data):
    positions = [pos for _, pos in wire.iter_records(memoryview(data))]
    assert positions == sorted(set(positions))
    assert all(pos + 64 <= len(data) for pos in positions)
