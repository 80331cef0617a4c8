"""RecoveryVPG (zcore.site.recovery_vpg) against a model: a checkpoint is usable exactly
when every journal of the VPG holds it durably; listing, paging, buckets, `before` and
views agree with plain Python over the model."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zcore import records
from zcore.errors import CheckpointNotFoundError, ConfigError
from zcore.journal import Journal, JournalSettings, VolumeSpec
from zcore.records import Checkpoint, CheckpointKind
from zcore.site.recovery_vpg import RecoveryVPG, RecoveryVPGState, SyncProgress

VOLUME = 1 << 20
BASE_NS = 1_700_000_000 * 10**9
SETTINGS = JournalSettings(group_commit_bytes=0)  # durability moves only on commit()


def _journals(tmp_path, n: int) -> dict[str, Journal]:
    return {f"vm{i}": Journal.create(tmp_path / f"vm{i}", [VolumeSpec(i, f"disk{i}", VOLUME)],
                                     vm=f"vm{i}", settings=SETTINGS)
            for i in range(n)}


class Model:
    """The VPG stream applied to journals by hand: one seq counter, per-journal records."""

    def __init__(self, journals: dict[str, Journal]) -> None:
        self.journals = journals
        self.names = list(journals)
        self.seq = 0
        self.ckpts: dict[str, dict[int, Checkpoint]] = {n: {} for n in self.names}
        self.last = dict.fromkeys(self.names, 0)
        self.durable = dict.fromkeys(self.names, 0)
        self.times: dict[int, int] = {}

    def time_of(self, seq: int) -> int:
        return BASE_NS + seq * 10**9  # one checkpoint per second of stream at most

    def write(self, vm: int, data: bytes = b"\x5a" * 512, offset: int = 0) -> int:
        self.seq += 1
        name = self.names[vm]
        self.journals[name].append_encoded(records.encode_write(
            vm, self.seq, offset, data, self.time_of(self.seq)))
        self.last[name] = self.seq
        return self.seq

    def checkpoint(self, vms: list[int], tag: str | None, consistent: bool) -> int:
        self.seq += 1
        kind = records.CKPT_TAGGED if tag else records.CKPT_AUTO
        t = self.time_of(self.seq)
        rec = records.encode_checkpoint(self.seq, t, kind, consistent, tag)
        for vm in vms:
            name = self.names[vm]
            self.journals[name].append_encoded(rec)
            self.last[name] = self.seq
            self.ckpts[name][self.seq] = Checkpoint(
                self.seq, self.seq, t, CheckpointKind.TAGGED if tag else CheckpointKind.AUTO,
                tag, consistent)
        return self.seq

    def commit(self, vm: int) -> None:
        name = self.names[vm]
        self.journals[name].commit()
        self.durable[name] = self.last[name]

    def promote(self, vm: int, seq: int) -> None:
        name = self.names[vm]
        j = self.journals[name]
        before = j.status().promoted_seq
        target = min(seq, self.last[name] + 1)
        j.promote_to(seq)
        if target > before:
            self.durable[name] = self.last[name]
            self.ckpts[name] = {s: c for s, c in self.ckpts[name].items() if s >= target}

    def usable(self) -> list[Checkpoint]:
        first = self.ckpts[self.names[0]]
        return [c for s, c in sorted(first.items())
                if all(s in self.ckpts[n] and self.durable[n] >= s for n in self.names)]


ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2)),
    st.tuples(st.just("ckpt"), st.sets(st.integers(0, 2), min_size=1),
              st.sampled_from([None, "before-upgrade", "nightly", "upgrade"]), st.booleans()),
    st.tuples(st.just("ckpt_all"), st.sampled_from([None, "tagged"]), st.booleans()),
    st.tuples(st.just("commit"), st.integers(0, 2)),
    st.tuples(st.just("commit_all")),
    st.tuples(st.just("promote"), st.integers(0, 2), st.integers(0, 6)),
    st.tuples(st.just("check")),
), max_size=40)


def _apply(model: Model, op: tuple, n: int) -> None:
    if op[0] == "write":
        model.write(op[1] % n)
    elif op[0] == "ckpt":
        model.checkpoint(sorted({v % n for v in op[1]}), op[2], op[3])
    elif op[0] == "ckpt_all":
        model.checkpoint(list(range(n)), op[1], op[2])
    elif op[0] == "commit":
        model.commit(op[1] % n)
    elif op[0] == "commit_all":
        for vm in range(n):
            model.commit(vm)
    elif op[0] == "promote":
        model.promote(op[1] % n, max(0, model.seq - op[2]))


def _check(vpg: RecoveryVPG, model: Model) -> None:
    want = model.usable()
    assert vpg.checkpoints() == want
    assert vpg.count() == len(want)
    for kind in ("auto", "tagged"):
        assert vpg.checkpoints(kind=kind) == [c for c in want if c.kind == kind]
    assert vpg.checkpoints(consistent=False) == [c for c in want if not c.consistent]
    assert vpg.checkpoints(tag="upgrade") == [c for c in want if c.tag and "upgrade" in c.tag]
    assert vpg.count(tag="upgrade", consistent=True) == len(
        [c for c in want if c.tag and "upgrade" in c.tag and c.consistent])
    assert vpg.checkpoints(newest_first=True) == want[::-1]
    if want:
        assert vpg.latest() == want[-1]
        assert vpg.by_id(want[0].id) == want[0]
    else:
        with pytest.raises(CheckpointNotFoundError):
            vpg.latest()


@pytest.mark.parametrize("n", [2, 3])
@given(ops=ops)
def test_usable_checkpoints_are_exactly_those_every_journal_holds_durably(tmp_path_factory,
                                                                         n, ops):
    journals = _journals(tmp_path_factory.mktemp("vpg"), n)
    model = Model(journals)
    with RecoveryVPG("vpg", journals, owns_journals=True) as vpg:
        for op in ops:
            _apply(model, op, n)
            if op[0] == "check":
                _check(vpg, model)
        _check(vpg, model)
        for vm in range(n):
            model.commit(vm)
        _check(vpg, model)


@given(seed_ops=ops, limit=st.integers(1, 5), newest_first=st.booleans(),
       consistent=st.sampled_from([None, True, False]), tag=st.sampled_from([None, "up"]))
def test_pages_concatenate_to_the_full_filtered_list(tmp_path_factory, seed_ops, limit,
                                                     newest_first, consistent, tag):
    journals = _journals(tmp_path_factory.mktemp("vpg"), 2)
    model = Model(journals)
    for op in seed_ops:
        _apply(model, op, 2)
    for _ in range(12):
        model.checkpoint([0, 1], None, True)
    model.commit(0)
    model.commit(1)
    with RecoveryVPG("vpg", journals, owns_journals=True) as vpg:
        full = vpg.checkpoints(consistent=consistent, tag=tag, newest_first=newest_first)
        pages, after = [], None
        while True:
            page = vpg.checkpoints(consistent=consistent, tag=tag, newest_first=newest_first,
                                   after_id=after, limit=limit)
            assert len(page) <= limit
            if not page:
                break
            pages.extend(page)
            after = page[-1].id
        assert pages == full


@given(seed_ops=ops, width=st.integers(1, 7), t=st.integers(-2, 60))
def test_buckets_sum_to_counts_and_before_finds_the_last_checkpoint_before_a_time(
        tmp_path_factory, seed_ops, width, t):
    journals = _journals(tmp_path_factory.mktemp("vpg"), 2)
    model = Model(journals)
    for op in seed_ops:
        _apply(model, op, 2)
    model.commit(0)
    model.commit(1)
    with RecoveryVPG("vpg", journals, owns_journals=True) as vpg:
        want = model.usable()
        start, end = BASE_NS / 1e9, BASE_NS / 1e9 + 50
        buckets = vpg.buckets(start, end, width)
        in_range = [c for c in want if start <= c.time < end]
        assert sum(b.count for b in buckets) == len(in_range)
        for b in buckets:
            inside = [c for c in want if b.start <= c.time < b.end]
            assert b.count == len(inside)
            assert b.tagged == len([c for c in inside if c.kind == "tagged"])
            assert b.auto == b.count - b.tagged
            assert b.inconsistent == len([c for c in inside if not c.consistent])
            assert (b.first_id, b.last_id) == ((inside[0].id, inside[-1].id) if inside
                                               else (None, None))
        when = BASE_NS / 1e9 + t
        earlier = [c for c in want if c.time < when]
        if earlier:
            assert vpg.before(when) == earlier[-1]
        else:
            with pytest.raises(CheckpointNotFoundError):
                vpg.before(when)
        consistent = [c for c in earlier if c.consistent]
        if consistent:
            assert vpg.before(when, consistent=True) == consistent[-1]
        window = [c for c in want if start + 3 <= c.time <= start + 20]
        assert vpg.checkpoints(start=start + 3, end=start + 20) == window


def test_a_lagging_journal_holds_back_checkpoints_until_it_catches_up(tmp_path):
    journals = _journals(tmp_path, 2)
    model = Model(journals)
    with RecoveryVPG("vpg", journals, owns_journals=True) as vpg:
        first = model.checkpoint([0, 1], None, True)
        model.commit(0)
        assert vpg.checkpoints() == []  # vm1 holds it, but not durably
        model.commit(1)
        assert [c.id for c in vpg.checkpoints()] == [first]
        second = model.checkpoint([0], "only-vm0", True)  # vm1 lags: not there yet
        model.commit(0)
        assert [c.id for c in vpg.checkpoints()] == [first]
        journals["vm1"].append_encoded(records.encode_checkpoint(
            second, model.time_of(second), records.CKPT_TAGGED, True, "only-vm0"))
        journals["vm1"].commit()
        assert [c.id for c in vpg.checkpoints()] == [first, second]
        with pytest.raises(CheckpointNotFoundError, match="ids"):
            vpg.by_id(second + 100)


def test_listing_a_long_history_keeps_up_across_many_refreshes(tmp_path):
    journals = _journals(tmp_path, 2)
    model = Model(journals)
    with RecoveryVPG("vpg", journals, owns_journals=True) as vpg:
        for k in range(3000):  # past the initial column capacity, through several regrows
            model.checkpoint([0, 1], "t" if k % 100 == 0 else None, k % 7 != 0)
            if k % 400 == 0:  # 400 new at a time: the bulk check (above BULK_CHECK)
                model.commit(0)
                model.commit(1)
                vpg.refresh()
        model.commit(0)
        model.commit(1)
        model.promote(1, 1500)
        want = model.usable()
        assert vpg.checkpoints() == want
        assert vpg.checkpoints(limit=10, after_id=want[100].id) == want[101:111]
        assert vpg.count(kind="tagged") == len([c for c in want if c.tag])


def test_views_read_every_volume_of_every_vm_as_of_the_checkpoint(tmp_path):
    journals = _journals(tmp_path, 2)
    model = Model(journals)
    images = [bytearray(VOLUME), bytearray(VOLUME)]
    snapshots = {}
    rnd = __import__("random").Random(7)
    for _ in range(4):
        for _ in range(6):
            vm = rnd.randrange(2)
            offset = rnd.randrange(VOLUME // 4096) * 4096
            data = os.urandom(4096)
            model.write(vm, data, offset)
            images[vm][offset:offset + 4096] = data
        seq = model.checkpoint([0, 1], None, True)
        snapshots[seq] = [bytes(i) for i in images]
    model.commit(0)
    model.commit(1)
    with RecoveryVPG("vpg", journals, owns_journals=True) as vpg:
        for seq, images_then in snapshots.items():
            with vpg.views(seq) as views:
                assert sorted(views) == ["vm0", "vm1"]
                assert views.checkpoint.id == seq
                for vm in range(2):
                    assert views.read(f"vm{vm}", vm, 0, VOLUME) == images_then[vm]
                # the views pin every journal: no promotion past the checkpoint
                with pytest.raises(Exception, match="pins"):
                    journals["vm1"].promote_to(seq + 1)
        with pytest.raises(ConfigError, match="vm0, vm1"), vpg.views(seq) as views:
            views["vm9"]


def test_status_sums_journals_and_reports_state_rpo_and_sync(tmp_path):
    journals = _journals(tmp_path, 2)
    model = Model(journals)
    rpo = [1.0]
    sync: list[SyncProgress | None] = [SyncProgress(100, 40, 20.0)]
    received = [0]
    vpg = RecoveryVPG("vpg", journals, owns_journals=True, rpo=lambda: rpo[0],
                      sync_progress=lambda: sync[0], received_bytes=lambda: received[0],
                      rpo_alert_seconds=30)
    with vpg:
        s = vpg.status()
        assert s.state == RecoveryVPGState.SYNCING
        assert s.sync is not None and s.sync.eta_seconds == pytest.approx(3.0)
        sync[0] = None
        assert vpg.status().state == RecoveryVPGState.INITIALIZING
        model.write(0)
        model.checkpoint([0, 1], None, True)
        model.commit(0)
        model.commit(1)
        received[0] = 5000
        s = vpg.status(now=model.time_of(model.seq) / 1e9 + 10)
        assert s.checkpoints == 1 and s.newest_checkpoint == s.oldest_checkpoint
        assert s.history_held_seconds == pytest.approx(10)
        assert s.journal_bytes == sum(j.status().size_bytes for j in journals.values())
        assert s.durable_seq == model.seq and s.last_seq == model.seq
        assert s.rpo_seconds == 1.0 and s.throughput_bytes is not None
        assert s.throughput_bytes > 0
        assert set(s.journals) == {"vm0", "vm1"}
        rpo[0] = 31.0
        assert vpg.status().state == RecoveryVPGState.RPO_NOT_MEETING_SLA


def test_opening_a_vpg_directory_opens_every_vm_journal(tmp_path):
    journals = _journals(tmp_path / "vpg-a", 3)
    model = Model(journals)
    seq = model.checkpoint([0, 1, 2], "x", True)
    for j in journals.values():
        j.close()
    with RecoveryVPG.open(tmp_path / "vpg-a") as vpg:
        assert vpg.name == "vpg-a" and vpg.vms == ["vm0", "vm1", "vm2"]
        assert [c.id for c in vpg.checkpoints()] == [seq]  # close committed it
    with pytest.raises(ConfigError, match="no VM journals"):
        RecoveryVPG.open(tmp_path / "vpg-a" / "vm0")


def test_unknown_kind_and_bad_bucket_requests_are_refused(tmp_path):
    with RecoveryVPG("vpg", _journals(tmp_path, 2), owns_journals=True) as vpg:
        with pytest.raises(ConfigError, match="kind"):
            vpg.checkpoints(kind="hourly")
        with pytest.raises(ConfigError):
            vpg.buckets(10, 5, 1)
        with pytest.raises(ConfigError, match="limit"):
            vpg.buckets(0, 1e9, 1)


def test_a_protected_vpg_streamed_into_journals_lists_and_recovers_its_checkpoints(tmp_path):
    """The real path: ProtectedVolume writes on two VMs, the VPG stream's bundles (one part
    per VM, every checkpoint marker in each) delivered by LocalLink."""
    from zcore.vpg import VPG, LocalLink, VPGSettings

    vpg = VPG("e2e", tmp_path / "state", VPGSettings(checkpoint_interval=3600))
    volumes = []
    for i in range(2):
        disk = tmp_path / f"disk{i}.img"
        disk.write_bytes(bytes(VOLUME))
        vpg.add_vm(f"vm{i}")
        volumes.append(vpg.add_volume(f"vm{i}", f"disk{i}", disk))
    vpg.start()
    journals = LocalLink.create_journals(vpg, tmp_path / "journals")
    link = LocalLink(vpg, journals)
    images = [bytearray(VOLUME), bytearray(VOLUME)]
    taken: dict[int, list[bytes]] = {}
    try:
        with RecoveryVPG("e2e", journals) as recovery:
            for round_ in range(3):
                for i, vol in enumerate(volumes):
                    data = bytes([round_ + 1 + 10 * i]) * 8192
                    vol.write(round_ * 8192, data)
                    images[i][round_ * 8192:(round_ + 1) * 8192] = data
                seq = vpg.checkpoint(f"round-{round_}" if round_ == 1 else None).seq
                taken[seq] = [bytes(img) for img in images]
                link.drain()
            assert [c.id for c in recovery.checkpoints()] == sorted(taken)
            assert recovery.latest(tagged=True).tag == "round-1"
            for seq, then in taken.items():
                with recovery.views(seq) as views:
                    for i, vol in enumerate(volumes):
                        assert views.read(f"vm{i}", vol.id, 0, VOLUME) == then[i]
    finally:
        vpg.close()
        for j in journals.values():
            j.close()
