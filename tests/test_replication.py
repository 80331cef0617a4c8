"""Site-to-site replication end to end over loopback TLS: resume after disconnects and
restarts of either site, initial sync, status states, pause and resume, several VPGs,
and the site-wide throttle with VPG priorities.  Every journal is checked against the
model of the protected volumes (tests/helpers/replication.py)."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from types import SimpleNamespace

import pytest
from helpers.faultproxy import FaultProxy
from helpers.replication import (
    KiB,
    MiB,
    Model,
    catch_up,
    checkpoint,
    fast_timeouts,
    free_port,
    make_vpg,
    pair_sites,
    verify_journals,
    wait_until,
)

from zcore.errors import ConfigError, StateError
from zcore.replication import (
    PRIORITY_WEIGHTS,
    ProtectedSite,
    RecoverySite,
    ReplicationState,
    Throttle,
    timing,
)
from zcore.replication.status import replication_state
from zcore.vpg import VPGSettings

_names = itertools.count()


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    asyncio.run(pair_sites(root / "rs", root / "ps"))
    return root


def run(coro):
    async def main():
        with fast_timeouts():
            return await coro
    return asyncio.run(main())


def _name(prefix="g") -> str:
    return f"{prefix}{next(_names)}"


async def _write(model: Model, rng: random.Random, n: int, max_bytes: int = 64 * KiB):
    for i in range(n):
        model.random_write(rng, max_bytes)
        if i % 8 == 7:
            await asyncio.sleep(0)


# ---- resume --------------------------------------------------------------------------------

def test_recovery_site_restart_resumes_from_its_durable_seq_without_duplicates(sites):
    """The recovery site restarts (same port): its journals reopen, ATTACHED reports what
    they hold, and the sender resends only what is missing (the journals refuse
    duplicates, so a resend applied twice would show up as a refusal)."""
    async def main():
        port = free_port()
        rs = RecoverySite(sites / "rs")
        await rs.start("127.0.0.1", port)
        ps = ProtectedSite(sites / "ps")
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB], "vm2": [1 * MiB]})
        vpg.start()
        model = Model(vpg)
        rep = ps.protect(vpg, "127.0.0.1", port)
        rng = random.Random(1)
        try:
            for _ in range(3):
                await _write(model, rng, 40)
                # (the first attach opens its journals in a thread: it may still run)
                await wait_until(lambda: rep.connected, 10, "a session")
                await checkpoint(vpg, "before")
                await asyncio.sleep(0.05)
                await rs.stop()  # mid-stream: some bundles are journaled, unacked
                await _write(model, rng, 20)  # captured while the site is away
                rs = RecoverySite(sites / "rs")
                await rs.start("127.0.0.1", port)
                await catch_up(vpg, rep, rs)
                assert verify_journals(rs, model) >= 1
            assert rep.sessions >= 4
            assert not [r for r in rs.refused if "refused" in r], list(rs.refused)
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_protected_site_restart_resumes_after_a_clean_stop(sites):
    """The sender and the VPG stop cleanly and start again: what was not acknowledged
    is folded into the persisted bitmaps and resent by a bitmap sync."""
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB], "vm2": [512 * KiB]})
        vpg.start()
        model = Model(vpg)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        rng = random.Random(2)
        try:
            await _write(model, rng, 60)
            await catch_up(vpg, rep, rs)
            rs_refuse = FaultProxy((host, port))  # nothing gets through it
            rs_refuse.refuse(True)
            await ps.stop()
            ps = ProtectedSite(sites / "ps")
            rep = ps.protect(vpg, rs_refuse.host, rs_refuse.port)
            await _write(model, rng, 60)  # never delivered before the stop
            await ps.stop()
            vpg.stop()
            rs_refuse.close()
            vpg.start()  # clean restart: resumes the bitmaps
            model.base = {vid: bytearray(img) for vid, img in model.base.items()}
            ps = ProtectedSite(sites / "ps")
            rep = ps.protect(vpg, host, port)
            await _write(model, rng, 20)
            await catch_up(vpg, rep, rs)
            assert verify_journals(rs, model) >= 1
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_two_vpgs_of_one_site_replicate_side_by_side(sites):
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        ps = ProtectedSite(sites / "ps")
        groups = []
        try:
            for i in range(2):
                name = _name()
                vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB], f"vm{i + 2}": [1 * MiB]})
                vpg.start()
                groups.append((vpg, Model(vpg), ps.protect(vpg, host, port)))
            rng = random.Random(3)
            for _ in range(100):
                vpg, model, rep = rng.choice(groups)
                model.random_write(rng)
                await asyncio.sleep(0)
            for vpg, model, rep in groups:
                await catch_up(vpg, rep, rs)
                assert verify_journals(rs, model) >= 1
        finally:
            await ps.stop()
            for vpg, _, _ in groups:
                vpg.close()
            await rs.stop()
    run(main())


def test_a_vpg_cannot_be_protected_twice(sites):
    async def main():
        ps = ProtectedSite(sites / "ps")
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB]})
        vpg.start()
        try:
            ps.protect(vpg, "127.0.0.1", 9)
            with pytest.raises(ConfigError):
                ps.protect(vpg, "127.0.0.1", 9)
        finally:
            await ps.stop()
            vpg.close()
    run(main())


# ---- initial sync --------------------------------------------------------------------------

def _half_zero(rng: random.Random, size: int) -> bytes:
    """Contents where every other 64 KiB run is zero (50 % zero) and the others are
    incompressible, so the data cannot all wait in the sender's buffer."""
    out = bytearray(size)
    for at in range(0, size, 128 * KiB):
        out[at : at + 64 * KiB] = rng.randbytes(64 * KiB)
    return bytes(out)


async def _initial_sync(sites, rate: float, trickle: int, size: int = 16 * MiB):
    """Protect two half-zero volumes (size and size / 2) with an initial sync over a
    link capped at `rate`, writing a trickle of new data meanwhile (`trickle` writes of
    4-32 KiB every 20 ms, and a checkpoint).  Returns what it observed."""
    rs = RecoverySite(sites / "rs")
    host, port = await rs.start()
    rng = random.Random(4)
    contents = {0: _half_zero(rng, size), 1: _half_zero(rng, size // 2)}
    name = _name()
    vpg = make_vpg(sites / name, name, {"vm1": [size], "vm2": [size // 2]},
                   # a buffer smaller than the data: the sync is paced by the link
                   VPGSettings(checkpoint_interval=0.1, sync_chunk_bytes=256 * KiB,
                               buffer_bytes=4 << 20, bundle_bytes=256 * KiB),
                   contents=contents)
    ps = ProtectedSite(sites / "ps", rate_limit_bytes=rate)
    vpg.start(initial_sync=True)
    model = Model(vpg, base=contents)
    rep = ps.protect(vpg, host, port)
    seen = {"states": set(), "progress": [], "name": name, "contents": contents}

    def synced():  # (a fold during the sync turns the rest into a bitmap sync)
        return any("complete: consistent checkpoint" in e for e in vpg.events)
    deadline = time.monotonic() + 60
    try:
        while not synced():
            assert time.monotonic() < deadline, "\n".join([str(rep.status()), *vpg.events])
            st = rep.status()
            seen["states"].add(st.state)
            seen["progress"].append((st.sync_done_bytes, st.sync_total_bytes))
            for _ in range(trickle):
                model.random_write(rng, 32 * KiB)
            if trickle:
                try:
                    await checkpoint(vpg, "during")
                except StateError:  # bitmap mode after an overflow
                    pass
            await asyncio.sleep(0.02)
        ps.throttle.set_rate(None)
        await catch_up(vpg, rep, rs)
        seen["checked"] = verify_journals(rs, model)
        seen["journals"] = {vm: j.checkpoints() for vm, j in rs.journals(name).items()}
        seen["sent"] = rs.receivers[name].stats.bytes
        seen["events"] = list(vpg.events)
        seen["final_state"] = rep.status().state
        seen["model"] = model
        return seen
    finally:
        await ps.stop()
        vpg.close()
        await rs.stop()


def test_initial_sync_copies_existing_data_while_new_writes_are_captured(sites):
    seen = run(_initial_sync(sites, 24e6, trickle=1))
    assert "initializing" in seen["states"]
    assert seen["progress"][0][1] == 24 * MiB  # every block is marked at first...
    assert any(0 < d < t for d, t in seen["progress"])  # ...and progress is reported
    # no checkpoint is crash-consistent before the sync completes
    for marks in seen["journals"].values():
        first = next(i for i, c in enumerate(marks) if c.consistent)
        assert first > 0, "checkpoints taken during the sync must exist"
        assert all(c.consistent for c in marks[first:])
    assert seen["checked"] >= 1  # and each consistent one is byte-exact
    assert seen["final_state"] == "meeting_sla"


def test_initial_sync_skips_zero_blocks(sites):
    seen = run(_initial_sync(sites, 48e6, trickle=0))
    nonzero = sum(len(c) for c in seen["contents"].values()) // 2
    assert not any("overflow" in e for e in seen["events"]), seen["events"]
    # the nonzero half and record headers, not the zero half
    assert seen["sent"] < nonzero * 1.02, (seen["sent"], nonzero)
    assert seen["checked"] >= 1


def test_writes_during_an_initial_sync_do_not_overflow_the_buffer(sites):
    """The sync leaves the capture ring room for the guest: a trickle of new writes
    during a sync paced by a slow link never overflows into bitmap mode."""
    seen = run(_initial_sync(sites, 12e6, trickle=4))
    overflows = [e for e in seen["events"] if "overflow" in e]
    assert not overflows, overflows


# ---- status, pause and resume ----------------------------------------------------------

@pytest.mark.parametrize("mode, connected, paused, rpo_alert, want", [
    ("streaming", True, True, False, "paused"),
    ("initial_sync", True, False, False, "initializing"),
    ("initial_sync", False, False, True, "initializing"),
    ("bitmap_syncing", True, False, False, "bitmap_syncing"),
    ("bitmap_syncing", False, False, False, "bitmap_syncing"),
    ("bitmap", True, False, False, "bitmap_syncing"),
    ("bitmap", False, False, False, "disconnected"),
    ("streaming", False, False, False, "disconnected"),
    ("streaming", True, False, True, "rpo_not_meeting_sla"),
    ("streaming", True, False, False, "meeting_sla"),
])
def test_replication_state_is_the_most_pressing_one_and_an_enum(mode, connected, paused,
                                                                rpo_alert, want):
    vpg = SimpleNamespace(mode=mode, rpo_alert=rpo_alert)
    state = replication_state(vpg, connected, paused)  # type: ignore[arg-type]
    assert state is ReplicationState(want) and state == want


def test_status_reports_every_state(sites):
    async def main():
        timing.STALL_TIMEOUT = 0.8  # (restored by run) the RPO alert at 0.3 s comes first
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        proxy = FaultProxy((host, port))
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [16 * MiB]},
                       VPGSettings(checkpoint_interval=0.2, buffer_bytes=4 << 20,
                                   rpo_alert_seconds=0.3, bundle_bytes=256 * KiB))
        vpg.start()
        model = Model(vpg)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, proxy.host, proxy.port)
        rng = random.Random(5)
        seen = []

        async def until(state, what, timeout=10):
            await wait_until(lambda: rep.status().state == state, timeout,
                             f"state {state} ({what}); now {rep.status()}")
            seen.append(state)
        try:
            await _write(model, rng, 10)
            await until(ReplicationState.MEETING_SLA, "connected")
            st = rep.status()
            assert isinstance(st.state, ReplicationState)
            assert st.connected and st.rpo_seconds < 1 and st.buffer_bytes == 4 << 20
            proxy.stall()  # no acks: the RPO grows past its alert threshold
            await _write(model, rng, 10)
            await until(ReplicationState.RPO_NOT_MEETING_SLA, "stalled link", 5)
            assert rep.status().rpo_seconds > 0.3
            await until(ReplicationState.DISCONNECTED, "the stall declared")
            # overflow while disconnected: bitmap mode, still reported disconnected (the
            # declared stall may have folded already).  Refused and reset before the
            # stall ends, so no handshake held by the stall slips through.
            proxy.refuse(True)
            proxy.reset_all()
            proxy.unstall()
            for _ in range(32):  # dirty blocks enough for a sync slow enough to watch
                model.random_write(rng, 256 * KiB, incompressible=True)
                await asyncio.sleep(0.001)
            # (until the sender has declared the link down: a first overflow's sync may
            # fit in the buffer and end before the sender notices the overflow; a VPG
            # still in bitmap mode when it does logs no "unreachable" event, so wait for
            # the link state itself)
            start = model.bytes
            while vpg.status().link_up:
                assert model.bytes - start < 256 * MiB, list(vpg.events)
                model.random_write(rng, 256 * KiB, incompressible=True)
                await asyncio.sleep(0.001)
            await wait_until(lambda: vpg.mode == "bitmap", 5, "bitmap mode")
            assert rep.status().state is ReplicationState.DISCONNECTED
            assert rep.status().connected is False
            ps.throttle.set_rate(4e6)  # a slow sync, to watch it
            proxy.heal()
            # (the sync of what was dirty when the link came back: an empty one begun in
            # between, as the fold and the reconnect race, ends at once)
            await wait_until(lambda: rep.status().state is ReplicationState.BITMAP_SYNCING
                             and rep.status().sync_total_bytes > 0, 10,
                             f"a bitmap sync of the dirty blocks; now {rep.status()}")
            seen.append(ReplicationState.BITMAP_SYNCING)
            ps.throttle.set_rate(None)
            await until(ReplicationState.MEETING_SLA, "sync done", 20)
            rep.pause()
            await until(ReplicationState.PAUSED, "paused")
            await catch_up_paused_check(vpg, rep, model, rng)
            rep.resume()
            await catch_up(vpg, rep, rs)
            assert verify_journals(rs, model) >= 1
            assert seen == ["meeting_sla", "rpo_not_meeting_sla", "disconnected",
                            "bitmap_syncing", "meeting_sla", "paused"]
        finally:
            await ps.stop()
            vpg.close()
            proxy.close()
            await rs.stop()
    run(main())


async def catch_up_paused_check(vpg, rep, model, rng):
    """While paused, writes are marked dirty (the paused VPG is in bitmap mode, where no
    checkpoint can be taken) and nothing is sent."""
    await asyncio.sleep(0.1)
    sent = rep.sent_seq
    await _write(model, rng, 20)
    with pytest.raises(StateError, match="bitmap mode"):
        await checkpoint(vpg, "paused")
    await asyncio.sleep(0.3)
    assert rep.sent_seq == sent
    assert vpg.mode == "bitmap" and vpg.status().dirty_bytes > 0


def test_pause_holds_the_stream_and_resume_delivers_what_was_written(sites):
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB]})
        vpg.start()
        model = Model(vpg)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        rng = random.Random(6)
        try:
            await _write(model, rng, 10)
            await catch_up(vpg, rep, rs)
            acked = vpg.acked_seq
            rep.pause()
            await _write(model, rng, 30)  # marked dirty: the paused VPG is in bitmap mode
            await asyncio.sleep(0.3)
            assert vpg.acked_seq <= max(acked, rep.sent_seq)
            assert rep.status().state == "paused"
            rep.resume()  # one bitmap sync delivers them, then a consistent checkpoint
            seq = await catch_up(vpg, rep, rs)
            assert seq > acked
            assert verify_journals(rs, model) >= 2
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_pause_goes_to_bitmap_mode_once_instead_of_overflowing_into_repeated_syncs(sites):
    """Issue 10: a pause only stopped sending, so the VPG overflowed, folded, started a
    bitmap sync that overflowed again, and so on while paused.  The pause tells the VPG:
    one fold ("paused"), dirty marks only while paused, one sync on resume."""
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [16 * MiB]},
                       VPGSettings(checkpoint_interval=0.2, buffer_bytes=4 << 20,
                                   bundle_bytes=256 * KiB))
        vpg.start()
        model = Model(vpg)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        rng = random.Random(8)

        def count(text):
            return sum(text in e for e in vpg.events)
        try:
            await _write(model, rng, 10)
            await catch_up(vpg, rep, rs)
            folds, syncs = count("bitmap mode:"), count("syncing of")
            rep.pause()
            await wait_until(lambda: vpg.mode == "bitmap", 5, "bitmap mode on pause")
            for _ in range(40):  # ~40 MiB while paused: ten times the buffer
                for _ in range(4):
                    model.random_write(rng, 256 * KiB, incompressible=True)
                await asyncio.sleep(0.01)
            assert vpg.mode == "bitmap", list(vpg.events)
            assert count("bitmap mode:") == folds + 1, list(vpg.events)
            assert count("bitmap mode: replication paused") == 1, list(vpg.events)
            assert count("syncing of") == syncs, list(vpg.events)
            assert rep.status().state == "paused"
            with pytest.raises(StateError, match="bitmap mode"):  # by design, documented
                await rep.checkpoint("while paused")
            rep.resume()
            await catch_up(vpg, rep, rs)
            assert count("syncing of") == syncs + 1, list(vpg.events)
            assert count("bitmap mode:") == folds + 1, list(vpg.events)
            assert verify_journals(rs, model) >= 1
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_checkpoint_from_the_event_loop_leaves_the_loop_running_while_it_waits(sites):
    """VPG.checkpoint blocks (tens of ms; up to CHECKPOINT_WAIT while the ring is full, and
    the loop it would block may be the one draining the ring): `await rep.checkpoint()`
    runs it in a worker thread, so the loop keeps turning meanwhile."""
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB]})
        vpg.start()
        model = Model(vpg)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, host, port)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1
        try:
            await _write(model, random.Random(9), 10)
            await catch_up(vpg, rep, rs)
            tick = asyncio.create_task(ticker())
            # the stream thread holds the VPG lock for a long round (a sync reading disks)
            held = threading.Event()

            def long_round():
                with vpg._lock:  # (no public way to make a round slow)
                    held.set()
                    time.sleep(0.4)
            thread = threading.Thread(target=long_round)
            thread.start()
            held.wait()
            before = ticks
            ckpt = await rep.checkpoint("from the loop")
            thread.join()
            tick.cancel()
            assert ckpt.tag == "from the loop"
            assert ticks - before >= 20, "the event loop stood still during the checkpoint"
            seq = (await vpg.checkpoint_async()).seq
            assert seq > ckpt.seq
            assert await vpg.flush_async() >= seq
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_attach_opens_its_journals_off_the_event_loop(sites, monkeypatch):
    """An ATTACH opened (or created, with fsyncs) the VPG's journals inside the protocol
    callback, stalling every connection of the site meanwhile; now in a worker thread."""
    from zcore.replication import recovery_site
    threads = []
    real_create = recovery_site.Journal.create

    def slow_create(*args, **kwargs):
        threads.append(threading.current_thread())
        time.sleep(0.3)  # a slow disk
        return real_create(*args, **kwargs)
    monkeypatch.setattr(recovery_site.Journal, "create", slow_create)

    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB], "vm2": [1 * MiB]})
        vpg.start()
        model = Model(vpg)
        ps = ProtectedSite(sites / "ps")
        gaps = []

        async def ticker():
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
        tick = asyncio.create_task(ticker())
        try:
            rep = ps.protect(vpg, host, port)
            await _write(model, random.Random(10), 10)
            await catch_up(vpg, rep, rs)
            assert len(threads) == 2
            assert threading.main_thread() not in threads
            assert max(gaps) < 0.25, f"the loop stood still for {max(gaps):.2f} s"
            assert verify_journals(rs, model) >= 1
        finally:
            tick.cancel()
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_recovery_site_stopped_during_an_attach_leaves_no_journal_locked(sites, monkeypatch):
    """An attach still opening journals in its worker thread when the site stops must
    finish before the journals are closed: otherwise it leaves them open (and locked)
    in the stopped site and the restarted one refuses the VPG for good."""
    from zcore.replication import recovery_site
    real_create = recovery_site.Journal.create
    started = threading.Event()

    def slow_create(*args, **kwargs):
        started.set()
        time.sleep(0.3)
        return real_create(*args, **kwargs)
    monkeypatch.setattr(recovery_site.Journal, "create", slow_create)

    async def main():
        port = free_port()
        rs = RecoverySite(sites / "rs")
        await rs.start("127.0.0.1", port)
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB]})
        vpg.start()
        model = Model(vpg)
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(vpg, "127.0.0.1", port)
        try:
            await _write(model, random.Random(12), 10)
            await asyncio.to_thread(started.wait, 10)
            await rs.stop()  # mid-attach
            rs = RecoverySite(sites / "rs")
            await rs.start("127.0.0.1", port)
            await catch_up(vpg, rep, rs, timeout=15)
            assert verify_journals(rs, model) >= 1
        finally:
            await ps.stop()
            vpg.close()
            await rs.stop()
    run(main())


def test_journal_threads_do_not_grow_with_the_number_of_vpgs(sites):
    """Issue 10 scale: each attached VPG had its own journal thread (300 VPGs, 300
    threads).  The site's journal work runs on a fixed pool; each VPG's bundles are
    still applied in order (the journals verify against the model)."""
    import resource

    async def main():
        rs = RecoverySite(sites / "rs", journal_workers=2)
        host, port = await rs.start()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert soft == hard, "RLIMIT_NOFILE was not raised to its hard limit at start"
        ps = ProtectedSite(sites / "ps")
        vpgs, models, reps = [], [], []
        rng = random.Random(11)
        try:
            before = {t.name for t in threading.enumerate()}
            for _ in range(6):
                name = _name()
                vpg = make_vpg(sites / name, name, {"vm1": [512 * KiB], "vm2": [512 * KiB]})
                vpg.start()
                vpgs.append(vpg)
                models.append(Model(vpg))
                reps.append(ps.protect(vpg, host, port))
            for _ in range(3):
                for model in models:
                    await _write(model, rng, 8)
            for vpg, rep in zip(vpgs, reps, strict=True):
                await catch_up(vpg, rep, rs)
            new = {t.name for t in threading.enumerate()} - before
            journal_threads = sorted(n for n in new if n.startswith("journal-")
                                     and not n.startswith("journal-commit"))
            assert journal_threads == [], journal_threads  # the pool started with the site
            workers = [t.name for t in threading.enumerate()
                       if t.name.startswith("journal-worker")]
            assert len(workers) == 2, workers
            for model in models:
                assert verify_journals(rs, model) >= 1
        finally:
            await ps.stop()
            for vpg in vpgs:
                vpg.close()
            await rs.stop()
        assert not [t for t in threading.enumerate() if t.name.startswith("journal-worker")]
    run(main())


# ---- throttle ------------------------------------------------------------------------------

def test_throttle_grants_in_weighted_shares_under_a_cap():
    """Three always-backlogged priorities under one cap: the grants follow the weights
    (high > medium > low), and the total stays near the cap."""
    async def main():
        rate = 20e6
        t = Throttle(rate)
        got = dict.fromkeys(PRIORITY_WEIGHTS, 0)
        stop = False

        async def flow(prio):
            while not stop:
                await t.acquire(64 * KiB, prio)
                got[prio] += 64 * KiB

        tasks = [asyncio.create_task(flow(p)) for p in PRIORITY_WEIGHTS]
        await asyncio.sleep(0.2)  # warm up
        base = dict(got)
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        elapsed = time.monotonic() - t0
        share = {p: got[p] - base[p] for p in got}
        stop = True
        t.set_rate(None)  # lets every waiter through
        await asyncio.gather(*tasks)
        total = sum(share.values())
        assert 0.5 * rate * elapsed < total < 1.5 * rate * elapsed, (total, rate * elapsed)
        assert share["high"] > share["medium"] > share["low"] > 0, share
        assert share["high"] > 2 * share["low"], share
    asyncio.run(main())


def test_unlimited_throttle_never_waits_and_a_bad_rate_is_refused():
    async def main():
        t = Throttle(None)
        t0 = time.monotonic()
        for _ in range(1000):
            await t.acquire(1 << 20, "low")
        assert time.monotonic() - t0 < 1
        with pytest.raises(ConfigError):
            t.set_rate(0)
        with pytest.raises(ConfigError):
            t.set_rate(-5)
    asyncio.run(main())


def test_site_wide_cap_bounds_replication_and_priorities_share_it(sites):
    """Three VPGs (high, medium, low) replicating incompressible data as fast as they can
    through one site capped at 8 MB/s: the acknowledged rate stays near the cap and the
    shares are ordered by priority.  Generous bounds: no timing is asserted tightly."""
    async def main():
        cap = 8e6
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        ps = ProtectedSite(sites / "ps", rate_limit_bytes=cap)
        groups = {}
        rng = random.Random(7)
        try:
            for prio in ("high", "medium", "low"):
                name = _name(prio)
                vpg = make_vpg(sites / name, name, {"vm1": [8 * MiB]},
                               VPGSettings(priority=prio, buffer_bytes=64 << 20,
                                           bundle_bytes=256 * KiB, checkpoint_interval=1.0))
                vpg.start()
                groups[prio] = (vpg, Model(vpg), ps.protect(vpg, host, port))
            await wait_until(lambda: all(r.connected for _, _, r in groups.values()), 10,
                             "three connections")
            # a backlog for everyone, written round robin (nobody starts first): ~20 MiB
            # of incompressible writes each, more than the cap lets through meanwhile
            for _ in range(160):
                for _, model, _ in groups.values():
                    model.random_write(rng, 256 * KiB, incompressible=True)
                await asyncio.sleep(0)
            start = {p: v.acked_seq for p, (v, _, _) in groups.items()}

            def acked_bytes(prio):
                vpg, model, _ = groups[prio]
                return sum(len(d) for s, _, _, d in model.log
                           if start[prio] < s <= vpg.acked_seq)

            await asyncio.sleep(0.3)
            b0 = {p: acked_bytes(p) for p in groups}
            t0 = time.monotonic()
            await asyncio.sleep(1.5)
            b1 = {p: acked_bytes(p) for p in groups}
            elapsed = time.monotonic() - t0
            share = {p: b1[p] - b0[p] for p in groups}
            total = sum(share.values())
            assert total < 1.5 * cap * elapsed, (total, cap * elapsed)
            assert total > 0.3 * cap * elapsed, (total, cap * elapsed)
            assert share["high"] > share["medium"] > share["low"], share
            assert all(v.status().pending_bundles for v, _, _ in groups.values()), \
                "a VPG ran out of backlog during the measurement"
            ps.throttle.set_rate(None)
            for vpg, model, rep in groups.values():
                await catch_up(vpg, rep, rs)
                assert verify_journals(rs, model) >= 1
        finally:
            await ps.stop()
            for vpg, _, _ in groups.values():
                vpg.close()
            await rs.stop()
    run(main())


def test_backoff_returns_to_its_minimum_after_a_successful_session(sites):
    """After a long outage the reconnect delay has grown to its maximum; once a session
    has succeeded, the next disconnect is retried at the minimum delay again."""
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        proxy = FaultProxy((host, port))
        name = _name()
        vpg = make_vpg(sites / name, name, {"vm1": [1 * MiB]})
        vpg.start()
        ps = ProtectedSite(sites / "ps")
        saved = timing.RECONNECT_BACKOFF
        timing.RECONNECT_BACKOFF = (0.02, 1.0)
        rep = ps.protect(vpg, proxy.host, proxy.port)
        try:
            await wait_until(lambda: rep.connected, 10, "the first session")
            proxy.refuse(True)
            proxy.reset_all()
            await asyncio.sleep(2.0)  # failed attempts every 0.02 ... 1.0 s: at the max
            proxy.refuse(False)
            await wait_until(lambda: rep.connected, 10, "the second session")
            await asyncio.sleep(0.3)
            accepted = proxy.accepted
            proxy.reset_all()
            t0 = time.monotonic()
            await wait_until(lambda: proxy.accepted > accepted, 10, "a reconnect attempt")
            assert time.monotonic() - t0 < 0.9  # not the 1 s maximum
        finally:
            timing.RECONNECT_BACKOFF = saved
            await ps.stop()
            vpg.close()
            proxy.close()
            await rs.stop()
    run(main())


def test_a_vpg_that_lost_its_state_is_refused_rather_than_silently_acked(sites):
    """The protected site loses a VPG's state and protects it again from seq 1 under the
    same name: the recovery site's journals already reach a later seq.  Acking that seq
    would drop every new write below it unsent; the sender must refuse instead."""
    async def main():
        rs = RecoverySite(sites / "rs")
        host, port = await rs.start()
        name = _name()
        layout = {"vm1": [1 * MiB]}
        first = make_vpg(sites / name / "first", name, layout)
        first.start()
        ps = ProtectedSite(sites / "ps")
        rep = ps.protect(first, host, port)
        rng = random.Random(8)
        model = Model(first)
        try:
            await _write(model, rng, 50)
            held = await catch_up(first, rep, rs)
            await ps.stop()
            first.close()
            again = make_vpg(sites / name / "again", name, layout)  # fresh state: seq 1
            again.start()
            for i in range(10):
                again.volumes[0].write(i * 4096, b"n" * 4096)
            await asyncio.to_thread(again.flush)  # sealed into bundles before protecting
            ps = ProtectedSite(sites / "ps")
            rep = ps.protect(again, host, port)
            await wait_until(lambda: "another history" in rep.last_error, 5,
                             f"the refusal ({rep.last_error!r})")
            assert again.acked_seq == 0 < held
            assert again.status().pending_bundles > 0  # nothing was dropped
            await ps.stop()
            again.close()
        finally:
            await ps.stop()
            await rs.stop()
    run(main())
