"""The protected site against a plain model, under randomized programs.

A program runs concurrent writer threads over three volumes of two VMs, takes automatic
and tagged checkpoints, and mixes in bitmap episodes (the buffer overflowing while the
link is stopped, the link declared down) and restarts (clean: stop and start again over
the same state; unclean: the process "dies" without stopping) in between.  The stream is
replayed into one journal per VM through a LocalLink.

Two oracles:
- snapshots: after each batch the writers are joined, a checkpoint is taken and the
  backing stores are copied, so each snapshot is exactly the state at its checkpoint;
- the write log: every write returns its seq, and seqs order overlapping writes as they
  reached the backing store, so replaying the log in seq order up to a checkpoint gives
  its state.  This also covers checkpoints nobody snapshotted: those the stream cuts on
  its own timer and the one that closes each bitmap sync.

Every checkpoint a journal flags crash-consistent must equal both; checkpoints taken
during a bitmap sync are flagged not consistent and are not compared.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import event, given, settings
from hypothesis import strategies as st

from zcore.bitmap import DirtyBitmap
from zcore.errors import StateError
from zcore.vpg import VPG, LocalLink, VPGSettings

KiB, MiB = 1 << 10, 1 << 20

# Three volumes, 7 MiB in all: more than the 4 MiB buffer holds, so a sync after an
# episode that dirtied most of them cannot finish without the link (a restart then lands
# in the middle of it and must resume it from the persisted bitmaps).
LAYOUT = (("vm1", "a", 4 * MiB), ("vm1", "b", 1 * MiB), ("vm2", "c", 2 * MiB))
SIZES = [size for _, _, size in LAYOUT]
TOTAL = sum(SIZES)
SETTINGS = dict(
    checkpoint_interval=0.1,        # the stream cuts checkpoints of its own between ours
    buffer_bytes=4 * MiB,           # the minimum: overflows are cheap to provoke
    bundle_bytes=256 * KiB,
    bundle_age=0.005,
    sync_chunk_bytes=256 * KiB,
    bitmap_persist_interval=0.05,   # bitmaps are persisted during the episodes too
)
OVERFLOW_WRITE = 64 * KiB
# Examples per run: each builds journals and runs 3-10 steps (~0.3 s, up to 2 s with
# restarts): the profile's whole budget fits in well under a minute.
EXAMPLES = settings.default.max_examples


# ---- programs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    vid: int
    sector: int
    sectors: int
    kind: str  # "random", "pattern" (compresses), "zero"


def _write(vid: int):
    nsect = SIZES[vid] // 512
    hot = st.integers(0, 255)  # the first 128 KiB of each volume: writes overlap there
    anywhere = st.integers(0, nsect - 1)
    return st.builds(
        lambda sector, sectors, kind: Write(vid, min(sector, nsect - sectors), sectors, kind),
        st.one_of(hot, anywhere),
        st.one_of(st.integers(1, 16), st.sampled_from([8, 64, 128])),
        st.sampled_from(["random", "random", "pattern", "zero"]),
    )


writes = st.one_of(*[_write(v) for v in range(len(LAYOUT))])
batches = st.lists(st.lists(writes, min_size=1, max_size=10), min_size=1, max_size=4)
restarts = st.sampled_from([None, None, "clean", "unclean"])

steps = st.one_of(
    st.tuples(st.just("batch"), batches, st.booleans()),   # writers, then tagged or auto
    st.tuples(st.just("overflow"), st.booleans(), restarts),   # whole rewrite?, then
    # a link outage; "cut": the link first delivers what is sealed, then fails
    st.tuples(st.just("link_down"), batches, restarts, st.booleans()),
    st.tuples(st.just("restart"), st.sampled_from(["clean", "unclean"])),
    st.tuples(st.just("drain")),
)
programs = st.lists(steps, min_size=3, max_size=10)


# ---- the site under test --------------------------------------------------------------


@dataclass
class Run:
    root: Path
    vpg: VPG = None
    link: LocalLink = None
    journals: dict = None
    log: list = field(default_factory=list)          # (seq, vid, offset, data)
    snapshots: dict = field(default_factory=dict)    # seq -> [bytes per volume]
    log_lock: threading.Lock = field(default_factory=threading.Lock)
    restarts: int = 0
    resumed_syncs: int = 0  # clean restarts that resumed a sync from persisted bitmaps
    checked: int = 0
    initial: list = None  # the volumes' contents before the first start

    def paths(self) -> list[Path]:
        return [self.root / f"{vm}-{name}.img" for vm, name, _ in LAYOUT]

    def make_vpg(self) -> VPG:
        vpg = VPG("g", self.root / "state", VPGSettings(**SETTINGS))
        for vm, name, size in LAYOUT:
            if vm not in vpg.vms:
                vpg.add_vm(vm)
            vpg.add_volume(vm, name, self.root / f"{vm}-{name}.img", size)
        return vpg

    def start(self, initial_sync: bool = False, link: bool = True) -> None:
        self.vpg = self.make_vpg()
        min_seq = max((j.last_seq for j in self.journals.values()), default=0) \
            if self.journals else 0
        self.vpg.start(min_seq=min_seq, initial_sync=initial_sync)
        if self.journals is None:
            self.journals = LocalLink.create_journals(self.vpg, self.root / "journals")
        self.link = LocalLink(self.vpg, self.journals)
        if link:
            self.link.start()

    def ensure_link(self) -> None:
        if not self.link.running:
            self.link.start()

    # writes ----------------------------------------------------------------------------

    def write(self, w: Write, rng: random.Random, mine: list) -> None:
        n = w.sectors * 512
        if w.kind == "zero":
            data = bytes(n)
        elif w.kind == "pattern":
            data = (rng.randbytes(8) * (n // 8))
        else:
            data = rng.randbytes(n)
        vol = self.vpg.volumes[w.vid]
        mine.append((vol.write(w.sector * 512, data), w.vid, w.sector * 512, data))

    def run_batch(self, batch: list[list[Write]], seed: int) -> None:
        """One thread per writer list, started together, joined."""
        gate = threading.Barrier(len(batch))
        errors: list[BaseException] = []

        def writer(k: int, ws: list[Write]) -> None:
            rng = random.Random(seed * 100 + k)
            mine: list = []
            try:
                gate.wait()
                for w in ws:
                    self.write(w, rng, mine)
            except BaseException as exc:
                errors.append(exc)
            with self.log_lock:
                self.log.extend(mine)

        threads = [threading.Thread(target=writer, args=(k, ws)) for k, ws in enumerate(batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

    def checkpoint(self, tag: str | None) -> None:
        """Quiescent (no writer runs): checkpoint, then copy the backing stores."""
        try:
            seq = self.vpg.checkpoint(tag).seq
        except StateError as exc:  # bitmap mode (a link outage, or an overflow just now)
            assert "bitmap mode" in str(exc), exc
            return
        self.snapshots[seq] = [p.read_bytes() for p in self.paths()]

    def overflow(self, whole: bool, seed: int) -> None:
        """Write more than the buffer holds while nothing drains it."""
        self.link.stop()
        before = sum("buffer overflow" in e for e in self.vpg.status().events)
        rng = random.Random(seed)
        mine: list = []
        if whole:  # rewrite every volume: all of it dirty, a sync longer than the buffer
            targets = [(vid, at) for vid, size in enumerate(SIZES)
                       for at in range(0, size, OVERFLOW_WRITE)]
        else:
            span = 6 * MiB // OVERFLOW_WRITE
            targets = [(vid, rng.randrange(SIZES[vid] // OVERFLOW_WRITE) * OVERFLOW_WRITE)
                       for vid in (rng.randrange(len(SIZES)) for _ in range(span))]
        for vid, at in targets:
            self.write(Write(vid, at // 512, OVERFLOW_WRITE // 512, "random"), rng, mine)
        self.log.extend(mine)
        deadline = time.monotonic() + 10
        while sum("buffer overflow" in e for e in self.vpg.status().events) <= before:
            assert time.monotonic() < deadline, "6 MiB through a 4 MiB buffer did not overflow"
            time.sleep(0.002)

    # restarts --------------------------------------------------------------------------

    def persisted_dirty(self) -> int:
        return sum(
            DirtyBitmap.load(self.vpg.bitmap_path(vid), volume_size=vol.size,
                             volume_id=vid).dirty_bytes
            for vid, vol in self.vpg.volumes.items())

    def restart(self, how: str) -> None:
        self.link.stop()
        self.restarts += 1
        if how == "clean":
            self.vpg.close()
            dirty = self.persisted_dirty()
            self.start()
            self.await_sync_start()
            st_ = self.vpg.status()
            if dirty:
                # resumed from the persisted bitmaps: exactly what they held, not the volumes
                assert st_.sync_total_bytes == dirty, (st_.sync_total_bytes, dirty)
                assert any(f"sync of {dirty} bytes started" in e or
                           f"syncing of {dirty} bytes started" in e for e in st_.events)
                self.resumed_syncs += 1
            else:
                assert st_.mode == "streaming" and st_.sync_total_bytes == 0
        else:
            self.crash()
            self.start()
            assert any("unclean shutdown" in e for e in self.vpg.status().events)
            self.await_sync_start()
            # compared whole with the journals (the link compares in process): what
            # differs, and only that, is resent; the checkpoints after it say if right
            st_ = self.vpg.status()
            assert st_.resync is not None and st_.resync.compared_bytes == TOTAL
            assert st_.sync_total_bytes == st_.resync.differing_bytes

    def crash(self) -> None:
        """Stop the stream thread and drop the VPG without stop(): nothing is folded or
        persisted, and the state file still says running."""
        self.vpg.abandon()

    def await_pending(self) -> None:
        """Until a bundle is sealed (the stream cuts a checkpoint every 0.1 s anyway)."""
        deadline = time.monotonic() + 5
        while not self.vpg.status().pending_bundles:
            assert time.monotonic() < deadline, "nothing was sealed"
            time.sleep(0.001)

    def await_sync_start(self) -> None:
        deadline = time.monotonic() + 10
        while self.vpg.mode == "bitmap":
            assert time.monotonic() < deadline, "the sync never started"
            time.sleep(0.001)

    def drain(self) -> None:
        self.link.stop()
        self.vpg.link_up()
        self.link.drain(60)
        self.link.start()

    # the oracle ------------------------------------------------------------------------

    def verify(self) -> int:
        self.link.stop()
        self.vpg.link_up()
        self.link.drain(60)
        final = self.vpg.checkpoint("final").seq
        self.snapshots[final] = [p.read_bytes() for p in self.paths()]
        self.link.drain(60)

        ckpts = {}
        for vm, j in self.journals.items():
            for c in j.checkpoints():
                ckpts.setdefault(c.seq, {})[vm] = c
        consistent = sorted(s for s, by_vm in ckpts.items()
                            if all(c.consistent for c in by_vm.values()))
        # every journal holds every checkpoint, with one verdict
        for s, by_vm in ckpts.items():
            assert set(by_vm) == set(self.journals), f"checkpoint {s} missing in a journal"
            assert len({(c.consistent, c.tag) for c in by_vm.values()}) == 1
        assert final in consistent
        compare = sorted(set(consistent) | set(self.snapshots))

        log = sorted(self.log)
        seqs = [s for s, *_ in log]
        assert len(set(seqs)) == len(seqs), "a seq was handed out twice"
        images = [bytearray(img) for img in self.initial]
        at = 0
        checked = 0
        for seq in compare:
            while at < len(log) and log[at][0] < seq:
                _, vid, off, data = log[at]
                images[vid][off:off + len(data)] = data
                at += 1
            snap = self.snapshots.get(seq)
            if snap is not None:  # the model agrees with the disks at our checkpoints
                for vid in range(len(SIZES)):
                    assert snap[vid] == images[vid], (
                        f"volume {vid}: seq-order replay differs from the backing store at "
                        f"checkpoint {seq}")
            if seq in consistent:
                for vm, j in self.journals.items():
                    with j.view(ckpts[seq][vm]) as view:
                        for vid, (owner, name, size) in enumerate(LAYOUT):
                            if owner == vm:
                                got = view.read(vid, 0, size)
                                assert got == bytes(images[vid]), (
                                    f"{vm}/{name} differs at consistent checkpoint "
                                    f"{ckpts[seq][vm]}")
                checked += 1
        # the newest consistent checkpoint is now: it holds the disks as they are
        assert [p.read_bytes() for p in self.paths()] == self.snapshots[final]
        return checked

    def close(self) -> None:
        if self.link is not None:
            try:
                self.link.stop()
            except StateError:
                pass
        if self.vpg is not None:
            self.vpg.close()
        for j in (self.journals or {}).values():
            j.close()


def _run(program, seed: int = 0, initial_sync: bool = False) -> Run:
    """Run `program`; with `initial_sync` the volumes start with data (random and zero
    stripes) and the first start copies it before any consistent checkpoint."""
    with tempfile.TemporaryDirectory(prefix="zcore-vpg-model-") as d:
        run = Run(Path(d))
        rng = random.Random(seed ^ 0x5EED)
        run.initial = []
        for path, size in zip(run.paths(), SIZES, strict=True):
            img = bytearray(size)
            if initial_sync:
                for at in range(0, size, 128 * KiB):
                    if at == 0 or rng.random() < 0.8:
                        img[at:at + 128 * KiB] = rng.randbytes(128 * KiB)
            path.write_bytes(img)
            run.initial.append(bytes(img))
        try:
            # An initial sync (~5.6 MiB of data) starts with the link stalled, so it waits
            # at the buffer's bound: a first step that cuts the link lands in its middle.
            run.start(initial_sync, link=not initial_sync)
            for i, step in enumerate(program):
                kind = step[0]
                if not (kind == "link_down" and step[3]):
                    run.ensure_link()
                if kind == "batch":
                    run.run_batch(step[1], seed + i)
                    run.checkpoint(f"b{i}" if step[2] else None)
                elif kind == "overflow":
                    run.overflow(step[1], seed + i)
                    if step[2]:  # restart before the sync can finish
                        run.restart(step[2])
                    else:
                        run.link.start()
                elif kind == "link_down":
                    _, batch, restart, cut = step
                    if cut:
                        run.link.stop()
                        run.await_pending()
                        run.link.pump()
                    run.vpg.link_down(f"episode {i}")
                    run.run_batch(batch, seed + i)
                    run.checkpoint(f"down{i}")  # refused: bitmap mode
                    if restart:
                        run.restart(restart)
                    else:
                        run.vpg.link_up()
                        if cut:
                            run.link.start()
                elif kind == "restart":
                    run.restart(step[1])
                else:
                    run.drain()
            run.checked = run.verify()
        finally:
            run.close()
        return run


@settings(max_examples=EXAMPLES)
@given(programs, st.integers(0, 1 << 16), st.booleans())
def test_every_consistent_checkpoint_is_the_state_at_its_seq(program, seed, initial_sync):
    run = _run(program, seed, initial_sync)
    event(f"consistent checkpoints compared: {min(run.checked, 10)}"
          f"{'+' if run.checked > 10 else ''}")
    event(f"restarts: {run.restarts}, of them resuming a sync: {run.resumed_syncs}")


def test_restarts_in_the_middle_of_bitmap_syncs_keep_every_checkpoint_exact():
    """The hard path, always: an overflow, a clean restart that resumes the sync from
    the persisted bitmaps, another overflow, an unclean restart, a link outage with a
    restart, and writes in between."""
    w = [[Write(0, 0, 64, "random"), Write(1, 8, 8, "zero")],
         [Write(0, 32, 64, "pattern"), Write(2, 100, 16, "random")]]
    program = [
        ("batch", w, True),
        ("overflow", True, "clean"),     # restart mid-sync: resumed from the bitmaps
        ("batch", w, True),              # during the resumed sync: not consistent
        ("drain",),
        ("batch", w, True),              # after it: consistent, compared
        ("overflow", False, None),
        ("batch", w, False),
        ("overflow", True, "unclean"),   # compared, what differs resent
        ("drain",),
        ("batch", w, True),
        ("link_down", w, "clean", False),  # restart in bitmap mode
        ("drain",),
        ("batch", w, False),
        ("link_down", w, None, True),
        ("batch", w, True),
    ]
    run = _run(program, 7)
    assert run.restarts == 3 and run.resumed_syncs >= 2
    # the snapshots of the batches after each drain, the final one, and the checkpoints
    # closing each sync, at least
    assert run.checked >= 8


def test_an_initial_sync_interrupted_by_overflows_and_restarts_ends_exact():
    """Volumes with data, protected with an initial sync: the link fails after delivering
    its start and the blocks it sent are zeroed during the outage (they must be resent
    as zeros, not skipped as "never written"); then overflows and restarts, clean in the
    middle of a sync, and unclean."""
    w = [[Write(0, 0, 128, "zero"), Write(2, 0, 64, "zero")],
         [Write(1, 256, 128, "zero"), Write(0, 1024, 16, "random")]]
    program = [
        ("link_down", w, None, True),     # zeroes journaled blocks during an outage
        ("drain",),
        ("batch", w, True),
        ("overflow", False, "clean"),
        ("batch", w, True),
        ("overflow", False, None),
        ("batch", w, False),
        ("restart", "unclean"),
        ("drain",),
        ("batch", w, True),
    ]
    run = _run(program, 11, initial_sync=True)
    assert run.restarts == 2 and run.checked >= 2
