"""Journal.discard_after (zcore.journal.discard): a committed failover drops the history
after its checkpoint; the replicas become the volumes at the checkpoint, across a reopen,
and nothing after the checkpoint ever reaches them."""

from __future__ import annotations

import pytest
from helpers.nbd import MiB, build_journal

from zcore.errors import StateError
from zcore.journal import Journal


def replica(journal: Journal, volume: str) -> bytes:
    with open(journal.replica_path(volume), "rb") as f:
        return f.read()


def test_discard_after_leaves_the_replicas_at_the_checkpoint_across_a_reopen(tmp_path):
    journal, snaps = build_journal(tmp_path / "j", sizes=(MiB, MiB), rounds=3, writes=30)
    ckpt, images = snaps[1]
    try:
        journal.discard_after(ckpt)
        assert journal.empty and journal.checkpoints() == []
        for name, image in images.items():
            assert replica(journal, name) == image
        journal.replica_write("disk0", 0, b"\x09" * 512)
        journal.replica_sync()
    finally:
        journal.close()
    journal = Journal.open(tmp_path / "j")
    try:
        journal.promote()
        assert journal.empty
        assert replica(journal, "disk0") == b"\x09" * 512 + images["disk0"][512:]
        assert replica(journal, "disk1") == images["disk1"]
    finally:
        journal.close()


def test_discard_after_is_refused_while_a_view_is_open(tmp_path):
    journal, snaps = build_journal(tmp_path / "j", sizes=(MiB,), rounds=2, writes=10)
    try:
        with journal.view(snaps[0][0]), pytest.raises(StateError):
            journal.discard_after(snaps[0][0])
        with pytest.raises(StateError):
            journal.replica_write("disk0", 0, b"\x00" * 512)  # history still journaled
    finally:
        journal.close()
