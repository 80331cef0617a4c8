"""Hostile peers at the recovery site: a second, paired protected site speaking raw TLS
with its pinned certificate sends every kind of malformed or unauthorized frame.  Each
gets its connection closed with a reason in RecoverySite.refused, no journal changes,
and a healthy replication of another VPG running beside it keeps going (and its
journals still match the model)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import socket
import ssl
import struct
import time

import pytest
from helpers.replication import (
    KiB,
    MiB,
    Model,
    catch_up,
    fast_timeouts,
    make_vpg,
    pair_sites,
    verify_journals,
    wait_until,
)

from zcore import records, wire
from zcore._native.record import crc32c
from zcore.errors import ProtocolError
from zcore.fsutil import read_state
from zcore.replication import ProtectedSite, RecoverySite, timing
from zcore.security import SERVER_NAME, SiteIdentity, client_context
from zcore.vpg import VPGSettings

_names = itertools.count()
HOSTILE_VOLUME = 1 * MiB


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """A recovery site paired with a healthy protected site and a hostile one."""
    root = tmp_path_factory.mktemp("hostile")
    asyncio.run(pair_sites(root / "rs", root / "ps", "healthy"))
    asyncio.run(pair_sites(root / "rs", root / "evil", "hostile"))
    return root


class Raw:
    """A raw protocol client over TLS (pinned mutual TLS, or pairing mode)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = wire.FrameReader()
        self.frames: list[wire.Frame] = []

    @classmethod
    async def open(cls, host: str, port: int, site: ProtectedSite | None,
                   recovery_cert: str | None = None) -> Raw:
        """Mutual TLS as `site` (pinned), or pairing mode without a certificate."""
        if site is None:
            ctx = client_context(None, None)  # type: ignore[arg-type]
        else:
            ctx = client_context(site.identity, recovery_cert or site.recovery_peer().cert_pem)
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                       server_hostname=SERVER_NAME)
        return cls(reader, writer)

    def send(self, *chunks: bytes) -> None:
        for c in chunks:
            self.writer.write(c)

    async def next(self, timeout: float = 5.0) -> wire.Frame:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("closed")
            self.frames += self.parser.feed(data)
        return self.frames.pop(0)

    async def expect(self, ftype: int) -> dict:
        while True:
            f = await self.next()
            if f.type == wire.HEARTBEAT:
                continue
            assert f.type == ftype, (f.name, bytes(f.payload))
            return wire.parse_control(f)

    async def hello(self, **fields) -> dict:
        msg = dict(protocol=wire.PROTOCOL_V1, max_protocol=wire.PROTOCOL_VERSION, site_id="x",
                   site_name="hostile", role="protected")
        msg.update(fields)
        self.send(wire.control(wire.HELLO, **msg))
        return await self.expect(wire.HELLO)

    async def attach(self, channel: int, vpg: str, vms=None) -> dict:
        vms = vms or [{"name": "vm1", "volumes": [
            {"id": 0, "name": "d0", "size": HOSTILE_VOLUME}]}]
        self.send(wire.control(wire.ATTACH, channel, vpg=vpg, vms=vms, journal={}))
        return await self.expect(wire.ATTACHED)

    async def closed(self, timeout: float = 5.0) -> list[str]:
        """Read until the server closes; returns the reasons of its ERROR frames."""
        reasons = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the server did not close within {timeout} s")
                data = await asyncio.wait_for(self.reader.read(65536), left)
                if not data:
                    break
                try:
                    for f in self.parser.feed(data):
                        if f.type == wire.ERROR:
                            reasons.append(wire.parse_control(f)["reason"])
                except Exception:
                    break
        except (ConnectionError, ssl.SSLError):
            pass
        except TimeoutError:
            raise AssertionError(f"the server did not close within {timeout} s") from None
        self.writer.close()
        return reasons


def _records(first_seq: int, n: int, volume: int = 0, size: int = 4096) -> bytearray:
    out = bytearray()
    for i in range(n):
        out += records.encode_write(volume, first_seq + i, size * i, bytes([i + 1]) * size,
                                    time.time_ns(), compress=False)
    return out


def _bundle(channel: int, first: int, last: int, parts) -> bytes:
    return b"".join(bytes(b) for b in wire.bundle_frames(channel, first, last, parts))


class Bench:
    """A recovery site with a healthy replication streaming into it all along."""

    def __init__(self, root) -> None:
        self.root = root
        self.healthy_name = f"healthy{next(_names)}"

    async def __aenter__(self) -> Bench:
        self.rs = RecoverySite(self.root / "rs")
        self.host, self.port = await self.rs.start()
        self.ps = ProtectedSite(self.root / "ps")
        self.evil = ProtectedSite(self.root / "evil")
        self.vpg = make_vpg(self.root / self.healthy_name, self.healthy_name,
                            {"vm1": [1 * MiB], "vm2": [512 * KiB]},
                            VPGSettings(checkpoint_interval=0.2, bundle_age=0.005))
        self.vpg.start()
        self.model = Model(self.vpg)
        self.rep = self.ps.protect(self.vpg, self.host, self.port)
        self._stop = False
        self._writer = asyncio.create_task(self._write_forever())
        await wait_until(lambda: self.vpg.acked_seq > 0, 10, "the healthy replication")
        return self

    async def _write_forever(self) -> None:
        rng = random.Random(5)
        while not self._stop:
            self.model.random_write(rng, 16 * KiB)
            await asyncio.sleep(0.003)

    async def __aexit__(self, *exc) -> None:
        self._stop = True
        await self._writer
        if exc[0] is None:
            await catch_up(self.vpg, self.rep, self.rs)
            assert verify_journals(self.rs, self.model) >= 1
        await self.ps.stop()
        self.vpg.close()
        await self.rs.stop()

    async def raw(self, pairing: bool = False) -> Raw:
        return await Raw.open(self.host, self.port, None if pairing else self.evil)

    def hostile_vpg(self) -> str:
        return f"evil{next(_names)}"

    def journal_state(self) -> dict:
        """Every journal's last seq and checkpoints (what must not change)."""
        return {(name, vm): (j.last_seq, j.durable_seq, len(j.checkpoints()))
                for name, r in self.rs.receivers.items() if name != self.healthy_name
                for vm, j in r.journals.items()}

    def assert_untouched(self, before: dict) -> None:
        """Journals are as they were; any the hostile peer attached since hold nothing."""
        now = self.journal_state()
        for key, state in now.items():
            assert state == before.get(key, (0, 0, 0)), (key, state)

    async def refused_after(self, action, pattern: str, timeout: float = 5.0) -> str:
        """Run `action` (which ends with the hostile connection); the server must close it
        with a refusal matching `pattern` while the healthy VPG keeps being acked."""
        refused = len(self.rs.refused)
        sessions = self.rep.sessions
        journals = self.journal_state()
        await action()
        await wait_until(lambda: len(self.rs.refused) > refused, timeout, "a refusal")
        reasons = list(self.rs.refused)[refused:]
        assert any(re.search(pattern, r) for r in reasons), reasons
        self.assert_untouched(journals)
        # the healthy replication was not disturbed: same session, still acked
        acked = self.vpg.acked_seq
        await wait_until(lambda: self.vpg.acked_seq > acked, 10, "the healthy VPG's acks")
        assert self.rep.sessions == sessions and self.rep.connected
        return reasons[0]


def _run(sites, body) -> None:
    async def main():
        with fast_timeouts():
            async with Bench(sites) as bench:
                await body(bench)
    asyncio.run(main())


def _head(ftype, channel=0, length=0, payload=b"", *, magic=wire.MAGIC, flags=0,
          pcrc=None, hcrc=None) -> bytes:
    head = wire.HEADER.pack(magic, ftype, flags, channel, length,
                            crc32c(payload) if pcrc is None else pcrc, 0)
    crc = crc32c(head[:20]) if hcrc is None else hcrc
    return head[:20] + struct.pack("<I", crc)


def _hostile(send_before_hello=None, after_hello=None, attach=False, pattern=".",
             pairing=False, hello=None):
    """A test body: connect, optionally HELLO (and ATTACH a VPG of its own), send the
    hostile bytes, and expect the refusal."""
    def body_factory():
        async def body(bench):
            async def action(pairing=pairing):
                raw = await bench.raw(pairing)
                if send_before_hello is not None:
                    raw.send(send_before_hello(bench))
                else:
                    await raw.hello(**(hello or {}))
                    if attach:
                        await raw.attach(1, bench.hostile_vpg())
                    raw.send(after_hello(bench))
                await raw.closed()
            await bench.refused_after(action, pattern)
        return body
    return body_factory()


# ---- malformed frames --------------------------------------------------------------------

CASES = {
    "bad_magic": _hostile(lambda b: b"ZCWX" + bytes(20), pattern="magic"),
    "bad_header_crc": _hostile(lambda b: _head(wire.HELLO, hcrc=1), pattern="header checksum"),
    "oversized_control_length": _hostile(
        lambda b: _head(wire.HELLO, length=wire.MAX_CONTROL + 1), pattern="exceeds"),
    "oversized_bundle_length": _hostile(
        after_hello=lambda b: _head(wire.BUNDLE, 1, length=2**32 - 1), attach=True,
        pattern="exceeds"),
    "unknown_type": _hostile(lambda b: _head(77), pattern="unknown frame type"),
    "unknown_flags": _hostile(lambda b: _head(wire.HELLO, flags=4), pattern="flags"),
    "payload_crc_mismatch": _hostile(
        lambda b: _head(wire.HELLO, length=2, pcrc=5) + b"{}", pattern="payload checksum"),
    "bundle_before_hello": _hostile(
        lambda b: _bundle(1, 1, 1, [(0, _records(1, 1))]), pattern="BUNDLE frame .*before HELLO"),
    "attach_before_hello": _hostile(
        lambda b: wire.control(wire.ATTACH, 1, vpg="x", vms=[], journal={}),
        pattern="ATTACH before HELLO"),
    "bundle_for_a_channel_not_attached": _hostile(
        after_hello=lambda b: _bundle(9, 1, 1, [(0, _records(1, 1))]),
        pattern="did not attach"),
    "unknown_protocol_version": _hostile(
        lambda b: wire.control(wire.HELLO, protocol=2, site_id="x", site_name="y",
                               role="protected"), pattern="protocol version 2"),
    "hello_as_a_recovery_site": _hostile(
        lambda b: wire.control(wire.HELLO, protocol=1, site_id="x", site_name="y",
                               role="recovery"), pattern="only protected sites"),
    "malformed_json": _hostile(lambda b: wire.frame(wire.HELLO, 0, b"{not json"),
                               pattern="not JSON"),
    "deeply_nested_hello": _hostile(lambda b: wire.frame(wire.HELLO, 0, b"[" * 60_000),
                                    pattern="HELLO payload nests too deeply"),
    "deeply_nested_attach": _hostile(
        after_hello=lambda b: wire.frame(wire.ATTACH, 1, b"[" * 60_000),
        pattern="ATTACH payload nests too deeply"),
    "deeply_nested_pair": _hostile(
        after_hello=lambda b: wire.frame(wire.PAIR, 0, b"[" * 60_000), pairing=True,
        pattern="PAIR payload nests too deeply"),
    "hello_with_a_bad_max_protocol": _hostile(
        lambda b: wire.control(wire.HELLO, protocol=1, max_protocol="2", site_id="x",
                               site_name="y", role="protected"), pattern="max_protocol"),
    # a v1 connection (the client offers no newer version) has no zstd record (format 10.3)
    "zstd_bundle_on_a_v1_connection": _hostile(
        after_hello=lambda b: _bundle(1, 1, 1, [(0, records.encode_write(
            0, 1, 0, b"zstd " * 819 + b"z", time.time_ns(), zstd_level=3))]),
        attach=True, hello={"max_protocol": 1}, pattern="bundle refused"),
    "hello_missing_fields": _hostile(lambda b: wire.frame(wire.HELLO, 0, b'{"protocol": 1}'),
                                     pattern="lacks"),
    "attach_on_channel_zero": _hostile(
        after_hello=lambda b: wire.control(wire.ATTACH, 0, vpg=b.hostile_vpg(), vms=[
            {"name": "vm1", "volumes": [{"id": 0, "name": "d", "size": 4096}]}], journal={}),
        pattern="channel 0"),
    "attach_twice_on_one_channel": _hostile(
        after_hello=lambda b: wire.control(wire.ATTACH, 1, vpg=b.hostile_vpg(), vms=[
            {"name": "vm1", "volumes": [{"id": 0, "name": "d", "size": 4096}]}], journal={}),
        attach=True, pattern="channel 1"),
    "attach_with_a_path_for_a_name": _hostile(
        after_hello=lambda b: wire.control(wire.ATTACH, 2, vpg="../../etc", vms=[
            {"name": "vm1", "volumes": [{"id": 0, "name": "d", "size": 4096}]}], journal={}),
        pattern="not allowed"),
    "attach_with_a_vm_path": _hostile(
        after_hello=lambda b: wire.control(wire.ATTACH, 2, vpg=b.hostile_vpg(), vms=[
            {"name": "../vm", "volumes": [{"id": 0, "name": "d", "size": 4096}]}],
            journal={}), pattern="malformed"),
    "attach_with_bad_journal_settings": _hostile(
        after_hello=lambda b: wire.control(wire.ATTACH, 2, vpg=b.hostile_vpg(), vms=[
            {"name": "vm1", "volumes": [{"id": 0, "name": "d", "size": 4096}]}],
            journal={"history_seconds": 1}), pattern="journal settings"),
    "attach_with_unknown_journal_setting": _hostile(
        after_hello=lambda b: wire.control(wire.ATTACH, 2, vpg=b.hostile_vpg(), vms=[
            {"name": "vm1", "volumes": [{"id": 0, "name": "d", "size": 4096}]}],
            journal={"path": "/"}), pattern="journal settings"),
    "ack_sent_to_the_recovery_site": _hostile(after_hello=lambda b: wire.ack(1, 5),
                                              pattern="unexpected ACK"),
    "pair_on_an_authenticated_connection": _hostile(
        after_hello=lambda b: wire.control(wire.PAIR, token="t", cert="c", proof="p"),
        pattern="unexpected PAIR"),
    "bundle_with_a_bad_record_crc": _hostile(
        after_hello=lambda b: _bundle(1, 1, 2, [(0, _flip(_records(1, 2), 100))]),
        attach=True, pattern="bundle refused"),
    "bundle_with_a_bad_record_header_crc": _hostile(
        after_hello=lambda b: _bundle(1, 1, 2, [(0, _flip(_records(1, 2), 70))]),
        attach=True, pattern="bundle refused"),
    "bundle_with_seqs_out_of_order": _hostile(
        after_hello=lambda b: _bundle(1, 1, 3, [(0, _records(3, 1) + _records(2, 1))]),
        attach=True, pattern="bundle refused"),
    "bundle_for_a_volume_of_no_vm": _hostile(
        after_hello=lambda b: _bundle(1, 1, 1, [(0, _records(1, 1, volume=7))]),
        attach=True, pattern="bundle refused"),
    "bundle_write_past_the_volume_end": _hostile(
        after_hello=lambda b: _bundle(1, 1, 1, [(0, records.encode_write(
            0, 1, HOSTILE_VOLUME, bytes(4096), 1, compress=False))]),
        attach=True, pattern="bundle refused"),
    "bundle_part_for_an_unknown_vm": _hostile(
        after_hello=lambda b: _bundle(1, 1, 1, [(3, _records(1, 1))]), attach=True,
        pattern="unknown VM"),
    "bundle_with_garbage_records": _hostile(
        after_hello=lambda b: _bundle(1, 1, 1, [(0, bytes(range(256)) * 2)]), attach=True,
        pattern="bundle refused"),
    "garbage_after_hello": _hostile(after_hello=lambda b: random.Random(1).randbytes(4000),
                                    pattern="magic|checksum|type"),
    "pairing_connection_sends_attach": _hostile(
        after_hello=lambda b: wire.control(wire.ATTACH, 1, vpg=b.hostile_vpg(), vms=[
            {"name": "vm1", "volumes": [{"id": 0, "name": "d", "size": 4096}]}], journal={}),
        pairing=True, pattern="ATTACH on a pairing connection"),
    "pairing_connection_sends_bundle": _hostile(
        after_hello=lambda b: _bundle(1, 1, 1, [(0, _records(1, 1))]), pairing=True,
        pattern="on a pairing connection|exceeds"),
}


def _flip(data: bytearray, at: int) -> bytearray:
    data = bytearray(data)
    data[at] ^= 0x10
    return data


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_frame_closes_the_connection_and_spares_journals_and_healthy_peers(
        sites, case):
    _run(sites, CASES[case])


def test_attach_of_a_vpg_owned_by_another_site_is_refused(sites):
    async def body(bench):
        async def action():
            raw = await bench.raw()
            await raw.hello()
            raw.send(wire.control(wire.ATTACH, 1, **bench.rep.attach_message()))
            await raw.closed()
        reason = await bench.refused_after(action, "belongs to another site")
        assert bench.rs.receivers[bench.healthy_name].owner != bench.evil.identity.site_id
        assert reason
    _run(sites, body)


def test_attach_of_a_vpg_owned_by_another_site_is_refused_after_a_restart(sites):
    """Ownership is on disk: a recovery site restarted before the owner reattaches still
    refuses another site's ATTACH of that VPG."""
    async def main():
        with fast_timeouts():
            async with Bench(sites) as bench:
                name = bench.healthy_name
                attach = bench.rep.attach_message()
            rs = RecoverySite(sites / "rs")
            host, port = await rs.start()
            try:
                raw = await Raw.open(host, port, ProtectedSite(sites / "evil"))
                await raw.hello()
                raw.send(wire.control(wire.ATTACH, 1, **attach))
                await raw.closed()
                assert any("belongs to another site" in r for r in rs.refused)
                assert name not in rs.receivers
            finally:
                await rs.stop()
    asyncio.run(main())


def test_deeply_nested_control_message_before_hello_is_refused_with_its_reason(sites):
    """issue 9 finding 9: 60,000 nested "[" fit one control frame before HELLO; the
    RecursionError escaped the connection's handler, so no refusal reason was kept."""
    async def body(bench):
        for pairing in (False, True):
            async def action(pairing=pairing):
                raw = await bench.raw(pairing)
                raw.send(wire.frame(wire.HELLO, 0, b"[" * 60_000))
                await raw.closed()
            await bench.refused_after(action, "HELLO payload nests too deeply")
    _run(sites, body)


def _attach_vms() -> list[dict]:
    return [{"name": "vm1", "volumes": [{"id": 0, "name": "d0", "size": HOSTILE_VOLUME}]}]


OWNER_DAMAGE = {
    "empty": b"",
    "not_json": b"{not json",
    "torn": b'{"meta": {"site_id": "ab',
    "checksum_mismatch": b'{"meta": {"format": "zcore-vpg-owner", "version": 1, '
                         b'"site_id": "x", "name": "y"}, "crc32c": 1}',
    "plain_without_a_site_id": b'{"name": "y"}',
    "a_list": b'["site_id"]',
    "deep": b"[" * 60_000,
}


@pytest.mark.parametrize("damage", sorted(OWNER_DAMAGE))
def test_damaged_owner_file_refuses_the_attach_with_its_reason_not_a_traceback(sites, damage):
    """A damaged vpgs/<vpg>/owner.json is a CorruptRecordError naming it: the ATTACH is
    refused with that reason (it escaped the handler as a ValueError or KeyError before),
    and the file is left as found, never overwritten by a guess."""
    async def body(bench):
        name = bench.hostile_vpg()
        vpg_dir = bench.rs.vpgs_dir / name
        vpg_dir.mkdir(parents=True)
        (vpg_dir / "owner.json").write_bytes(OWNER_DAMAGE[damage])
        reasons = []

        async def action():
            raw = await bench.raw()
            await raw.hello()
            raw.send(wire.control(wire.ATTACH, 1, vpg=name, vms=_attach_vms(), journal={}))
            reasons.extend(await raw.closed())
        reason = await bench.refused_after(action, "owner.json")
        assert reasons and "owner.json" in reasons[0], (reasons, reason)  # told to the peer
        assert name not in bench.rs.receivers
        assert (vpg_dir / "owner.json").read_bytes() == OWNER_DAMAGE[damage]
        assert sorted(p.name for p in vpg_dir.iterdir()) == ["owner.json"]
    _run(sites, body)


def test_owner_file_of_the_plain_json_layout_still_decides_ownership(sites):
    """Recovery sites written before checked state files hold owner.json as plain JSON
    {"site_id", "name"}: it still grants the owner and refuses every other site."""
    async def body(bench):
        mine, theirs = bench.hostile_vpg(), bench.hostile_vpg()
        for name, owner in ((mine, bench.evil.identity.site_id), (theirs, "another-site")):
            (bench.rs.vpgs_dir / name).mkdir(parents=True)
            (bench.rs.vpgs_dir / name / "owner.json").write_text(
                json.dumps({"site_id": owner, "name": "old"}))
        raw = await bench.raw()
        await raw.hello()
        assert (await raw.attach(1, mine))["durable_seq"] == 0
        raw.writer.close()

        async def action():
            raw = await bench.raw()
            await raw.hello()
            raw.send(wire.control(wire.ATTACH, 1, vpg=theirs, vms=_attach_vms(), journal={}))
            await raw.closed()
        await bench.refused_after(action, f"VPG {theirs} belongs to another site")
    _run(sites, body)


def test_owner_file_is_a_checked_state_file(sites):
    async def body(bench):
        name = bench.hostile_vpg()
        raw = await bench.raw()
        await raw.hello()
        await raw.attach(1, name)
        raw.writer.close()
        meta = read_state(bench.rs.vpgs_dir / name / "owner.json", "zcore-vpg-owner", 1)
        assert meta["site_id"] == bench.evil.identity.site_id
    _run(sites, body)


def test_valid_bundle_then_invalid_one_keeps_only_the_valid_one(sites):
    async def body(bench):
        name = bench.hostile_vpg()

        async def action():
            raw = await bench.raw()
            await raw.hello()
            await raw.attach(1, name)
            raw.send(_bundle(1, 1, 2, [(0, _records(1, 2))]))
            assert wire.parse_ack(await raw.next()) == 2
            raw.send(_bundle(1, 3, 4, [(0, _flip(_records(3, 2), 90))]))
            await raw.closed()

        refused = len(bench.rs.refused)
        await action()
        await wait_until(lambda: len(bench.rs.refused) > refused, 5, "the refusal")
        journal = bench.rs.journals(name)["vm1"]
        assert journal.last_seq == journal.durable_seq == 2
        with journal.view(journal.checkpoint("after").seq) as view:
            assert view.read(0, 0, 4096) == bytes([1]) * 4096
            assert view.read(0, 4096, 8192) == bytes([2]) * 4096 + bytes(4096)
    _run(sites, body)


def test_silent_peer_is_closed_after_the_peer_timeout(sites):
    async def body(bench):
        async def action():
            raw = await bench.raw()
            await raw.closed(timeout=timing.PEER_TIMEOUT + 3)
        await bench.refused_after(action, "silent")
    _run(sites, body)


def test_header_of_a_huge_frame_before_hello_is_refused_at_once(sites):
    """Before HELLO only small control frames are possible: a header announcing a
    bundle-sized payload is refused at the header, not after waiting for (and
    allocating) the payload."""
    async def body(bench):
        for pairing in (False, True):
            async def action(pairing=pairing):
                raw = await bench.raw(pairing)
                raw.send(_head(wire.BUNDLE, 1, length=wire.MAX_PAYLOAD))
                t0 = time.monotonic()
                await raw.closed(timeout=5)
                assert time.monotonic() - t0 < timing.PEER_TIMEOUT
            await bench.refused_after(action, "before HELLO|exceeds|pairing")

    async def main():
        saved = timing.PEER_TIMEOUT
        with fast_timeouts():
            timing.PEER_TIMEOUT = 10.0  # a silent-peer close must not be the reason
            try:
                async with Bench(sites) as bench:
                    await body(bench)
            finally:
                timing.PEER_TIMEOUT = saved
    asyncio.run(main())


def test_plaintext_connection_is_closed_and_reaches_nothing(sites):
    async def body(bench):
        journals = bench.journal_state()
        acked = bench.vpg.acked_seq
        reader, writer = await asyncio.open_connection(bench.host, bench.port)
        writer.write(wire.control(wire.HELLO, protocol=1, site_id="x", site_name="y",
                                  role="protected"))
        writer.write(_bundle(1, 1, 1, [(0, _records(1, 1))]))
        data = await asyncio.wait_for(reader.read(65536), 5)
        # the server answers with a TLS alert at most, never with a frame
        assert not data.startswith(wire.MAGIC)
        try:
            while data:
                data = await asyncio.wait_for(reader.read(65536), 5)
        except ConnectionError:
            pass
        writer.close()
        bench.assert_untouched(journals)
        await wait_until(lambda: bench.vpg.acked_seq > acked, 10, "the healthy VPG's acks")
    _run(sites, body)


def test_many_hostile_connections_at_once_leave_the_server_serving(sites):
    async def body(bench):
        refused = len(bench.rs.refused)

        async def one(i):
            raw = await bench.raw()
            raw.send(random.Random(i).randbytes(200))
            await raw.closed()

        await asyncio.gather(*(one(i) for i in range(20)))
        await wait_until(lambda: len(bench.rs.refused) >= refused + 20, 5, "20 refusals")
        acked = bench.vpg.acked_seq
        await wait_until(lambda: bench.vpg.acked_seq > acked, 10, "the healthy VPG's acks")
        assert bench.rep.sessions == 1
    _run(sites, body)


def test_raw_socket_reset_mid_handshake_leaves_the_server_serving(sites):
    async def body(bench):
        for n in (0, 5, 100):
            s = socket.create_connection((bench.host, bench.port))
            s.send(b"\x16\x03\x01" + bytes(n))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        acked = bench.vpg.acked_seq
        await wait_until(lambda: bench.vpg.acked_seq > acked, 10, "the healthy VPG's acks")
        assert bench.rep.sessions == 1
    _run(sites, body)


def test_error_frames_tell_the_peer_the_reason(sites):
    async def body(bench):
        raw = await bench.raw()
        await raw.hello()
        raw.send(_bundle(5, 1, 1, [(0, _records(1, 1))]))
        reasons = await raw.closed()
        assert reasons and "did not attach" in reasons[0]
        assert json.dumps(reasons)
    _run(sites, body)


# ---- a hostile recovery site: the sender treats its answers as untrusted too ---------------

class FakeRecovery:
    """A server holding the real recovery site's certificate and key (so the sender's
    pinning accepts it) that answers HELLO and ATTACH as told, then sends `after`."""

    def __init__(self, rs_root, hello=None, attached=None, after=b"") -> None:
        self.identity = SiteIdentity.load_or_create(rs_root / "site", "recovery")
        self.hello = hello or {}
        self.attached = attached or {}
        self.after = after
        self.received: list[int] = []

    async def start(self) -> tuple[str, int]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.identity.cert_path, self.identity.key_path)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        return self.server.sockets[0].getsockname()[:2]

    async def _serve(self, reader, writer):
        parser = wire.FrameReader()
        try:
            while data := await reader.read(65536):
                for f in parser.feed(data):
                    self.received.append(f.type)
                    if f.type == wire.HELLO:
                        msg = dict(protocol=1, site_id=self.identity.site_id,
                                   site_name="recovery", role="recovery")
                        msg.update(self.hello)
                        writer.write(wire.control(wire.HELLO, **msg))
                    elif f.type == wire.ATTACH:
                        msg = dict(durable_seq=0, max_seq=0)
                        msg.update(self.attached)
                        writer.write(wire.control(wire.ATTACHED, f.channel, **msg))
                        writer.write(self.after)
        except (ConnectionError, ssl.SSLError, ProtocolError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()


def _against(sites, fake: FakeRecovery, check) -> None:
    async def main():
        with fast_timeouts():
            host, port = await fake.start()
            name = f"victim{next(_names)}"
            vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB]})
            vpg.start()
            for i in range(20):
                vpg.volumes[0].write(i * 4096, bytes([i + 1]) * 4096)
            ps = ProtectedSite(sites / "ps")
            rep = ps.protect(vpg, host, port)
            try:
                await wait_until(lambda: rep.last_error, 5, "the sender's refusal")
                # (the first refusal's reason: a later session clears last_error)
                error = rep.last_error
                await asyncio.sleep(0.2)
                check(vpg, rep, error)
            finally:
                await ps.stop()
                vpg.close()
                fake.close()
    asyncio.run(main())


def test_sender_refuses_a_recovery_site_speaking_another_protocol_version(sites):
    fake = FakeRecovery(sites / "rs", hello={"protocol": 3})  # 1 and 2 are this one's

    def check(vpg, rep, error):
        assert "protocol 3" in error
        assert wire.ATTACH not in fake.received
        assert vpg.acked_seq == 0
    _against(sites, fake, check)


def test_sender_refuses_an_ack_of_a_seq_it_never_sent(sites):
    """An ACK beyond what was sent would make the VPG drop writes the recovery site
    never received."""
    fake = FakeRecovery(sites / "rs", after=wire.ack(1, 10**9))

    def check(vpg, rep, error):
        assert "ACK" in error, error
        assert vpg.acked_seq == 0
        assert vpg.status().pending_bundles > 0
    _against(sites, fake, check)


def test_sender_refuses_a_durable_seq_beyond_anything_it_captured(sites):
    """A recovery site holding a later history of a VPG of the same name (say the
    protected site lost its VPG state and started over at seq 1): acking its durable
    seq would silently drop every write the new VPG makes below it."""
    fake = FakeRecovery(sites / "rs", attached={"durable_seq": 10**6, "max_seq": 10**6})

    def check(vpg, rep, error):
        assert "durable" in error or "seq" in error, error
        assert vpg.acked_seq == 0
        assert vpg.status().pending_bundles > 0
    _against(sites, fake, check)


@pytest.mark.parametrize("after", [
    random.Random(2).randbytes(300),
    wire.control(wire.PAIRED, cert="c", proof="p", site_id="s", site_name="n"),
    wire.ack(7, 1),  # for a channel the sender did not attach
    wire.frame(wire.ACK, 1, b"\x01\x02"),  # malformed
    wire.control(wire.ERROR, reason="disk on fire"),
])
def test_sender_drops_a_connection_that_sends_it_nonsense(sites, after):
    fake = FakeRecovery(sites / "rs", after=after)

    def check(vpg, rep, error):
        assert not rep.connected or rep.sessions > 1
        assert vpg.acked_seq == 0
        if b"disk on fire" in after:
            assert "disk on fire" in error
    _against(sites, fake, check)
