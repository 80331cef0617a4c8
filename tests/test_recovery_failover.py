"""The live failover operation (zcore.recovery.failover) over journals, without the site
service: serving at once, promotion in the background, rollback keeping the history from
the checkpoint on, commit leaving the replicas equal to the recovered volumes, and a
restart in the middle of each."""

from __future__ import annotations

import pytest
from helpers.nbd import MiB, build_journal

from zcore.errors import StateError
from zcore.journal import Journal
from zcore.recovery.failover import (
    OPERATION_STATE,
    CommitPolicy,
    Failover,
    FailoverPlan,
    FailoverState,
)
from zcore.recovery.states import Operation, OperationState, check


@pytest.fixture
def journals(tmp_path):
    j, snaps = build_journal(tmp_path / "vm1", sizes=(MiB, MiB), rounds=3, writes=30,
                             promote_first=False)
    yield {"vm1": j}, snaps
    j.close()


def test_failover_serves_the_checkpoint_at_once_and_promotes_behind(journals, tmp_path):
    js, snaps = journals
    ckpt, images = snaps[1]
    fo = Failover.start("v", js, tmp_path / "fo", FailoverPlan(ckpt.id))
    try:
        ov = fo.overlays[("vm1", "disk0")]
        assert ov.read(0, MiB) == images["disk0"]
        assert fo.wait_promoted(30)
        assert fo.state == FailoverState.FAILED_OVER
        assert js["vm1"].promoted_seq == ckpt.seq
        assert fo.status()["promotion"]["progress"] == 1.0
        ov.write(0, b"\x01" * 4096)
        assert ov.read(0, 8192) == b"\x01" * 4096 + images["disk0"][4096:8192]
    finally:
        fo.close()


def test_rollback_keeps_the_checkpoint_and_later_ones_for_another_failover(journals,
                                                                            tmp_path):
    js, snaps = journals
    fo = Failover.start("v", js, tmp_path / "fo", FailoverPlan(snaps[1][0].id))
    fo.overlays[("vm1", "disk1")].write(0, b"\x02" * 512)
    fo.wait_promoted(30)
    fo.rollback()
    assert Failover.read(tmp_path / "fo") is None
    ids = [c.id for c in js["vm1"].checkpoints()]
    assert snaps[1][0].id in ids and snaps[2][0].id in ids
    fo = Failover.start("v", js, tmp_path / "fo", FailoverPlan(snaps[2][0].id))
    try:
        assert fo.overlays[("vm1", "disk1")].read(0, MiB) == snaps[2][1]["disk1"]
    finally:
        fo.close()


def test_commit_leaves_replicas_equal_to_the_recovered_volumes(journals, tmp_path):
    js, snaps = journals
    ckpt, images = snaps[1]
    fo = Failover.start("v", js, tmp_path / "fo", FailoverPlan(ckpt.id))
    ov = fo.overlays[("vm1", "disk0")]
    ov.write(8192, b"\x03" * 4096)
    ov.write_zeroes(0, 512)
    expect = bytearray(images["disk0"])
    expect[8192:12288] = b"\x03" * 4096
    expect[0:512] = bytes(512)
    fo.commit()
    assert fo.state == FailoverState.COMMITTED
    j = js["vm1"]
    assert j.empty and j.checkpoints() == []
    paths = fo.replica_paths()
    assert open(paths[("vm1", "disk0")], "rb").read() == bytes(expect)
    assert open(paths[("vm1", "disk1")], "rb").read() == images["disk1"]
    with pytest.raises(StateError, match="committed"):
        fo.rollback()


def test_restart_while_failed_over_keeps_the_flushed_writes(tmp_path):
    j, snaps = build_journal(tmp_path / "vm1", sizes=(MiB,), rounds=2, writes=20)
    ckpt, images = snaps[0]
    fo = Failover.start("v", {"vm1": j}, tmp_path / "fo", FailoverPlan(ckpt.id))
    fo.overlays[("vm1", "disk0")].write(0, b"\x04" * 4096)
    fo.overlays[("vm1", "disk0")].flush()
    fo.wait_promoted(30)
    fo.close()
    j.close()
    j = Journal.open(tmp_path / "vm1")
    try:
        fo = Failover.resume("v", {"vm1": j}, tmp_path / "fo")
        assert fo is not None and fo.state == FailoverState.FAILED_OVER
        got = fo.overlays[("vm1", "disk0")].read(0, 8192)
        assert got == b"\x04" * 4096 + images["disk0"][4096:8192]
        fo.commit()
        assert open(j.replica_path(0), "rb").read(4096) == b"\x04" * 4096
    finally:
        j.close()


def test_commit_interrupted_after_the_discard_is_redone_at_resume(tmp_path):
    j, snaps = build_journal(tmp_path / "vm1", sizes=(MiB,), rounds=2, writes=20)
    ckpt, images = snaps[0]
    fo = Failover.start("v", {"vm1": j}, tmp_path / "fo", FailoverPlan(ckpt.id))
    fo.overlays[("vm1", "disk0")].write(512, b"\x05" * 512)
    fo.overlays[("vm1", "disk0")].flush()  # commit flushes before its first step
    fo.wait_promoted(30)
    # the crash: state committing written, the journal discarded, nothing folded yet
    fo._set_state(FailoverState.COMMITTING)
    fo.close()
    j.discard_after(ckpt.id)
    j.close()
    j = Journal.open(tmp_path / "vm1")
    try:
        fo = Failover.resume("v", {"vm1": j}, tmp_path / "fo")
        assert fo is not None and fo.state == FailoverState.COMMITTED
        data = open(j.replica_path(0), "rb").read()
        assert data == images["disk0"][:512] + b"\x05" * 512 + images["disk0"][1024:]
    finally:
        j.close()


def test_every_failover_state_has_its_place_in_the_one_operation_table():
    assert set(OPERATION_STATE) == set(FailoverState)
    with pytest.raises(StateError, match=r"no recovery operation running: failover commit "
                                         r"is not allowed; allowed now: test start, failover"):
        check("v", OperationState.REPLICATING, Operation.COMMIT)
    promoting = OPERATION_STATE[FailoverState.PROMOTING]
    with pytest.raises(StateError, match=r"awaiting commit or rollback: failover is not "
                                         r"allowed; allowed now: failover commit, failover "
                                         r"rollback"):
        check("v", promoting, Operation.FAILOVER)
    check("v", OPERATION_STATE[FailoverState.COMMITTED], Operation.REVERSE)
    with pytest.raises(Exception, match="commit_after_minutes"):
        FailoverPlan(1, CommitPolicy.COMMIT).check()
