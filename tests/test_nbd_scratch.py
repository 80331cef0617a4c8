"""ScratchOverlay (zcore.recovery): a writable overlay on a view, kept apart from the
journal and the replica, discarded on close.  A state machine checks it against a plain
model (a bytearray per overlay, the view's image underneath)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers.nbd import MiB, build_journal
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from zcore.errors import AlignmentError, ClosedError, OutOfRangeError, ScratchLimitError
from zcore.journal import Journal, VolumeSpec
from zcore.recovery import ScratchOverlay

SECTOR = 512


def tree_digest(path: Path) -> dict[str, str]:
    """Name -> sha256 of every file under a journal directory."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture
def journal(tmp_path):
    j, snaps = build_journal(tmp_path / "j", sizes=(2 * MiB, MiB), rounds=2, writes=30)
    yield j, snaps
    j.close()


def test_overlay_reads_the_view_until_written(journal):
    j, snaps = journal
    ckpt, images = snaps[-1]
    with ScratchOverlay.open(j, ckpt, "disk0") as ov:
        assert ov.size == 2 * MiB
        assert ov.read(0, 2 * MiB) == images["disk0"]


def test_writes_read_back_merged_over_the_view_at_sector_granularity(journal):
    j, snaps = journal
    ckpt, images = snaps[0]
    expect = bytearray(images["disk0"])
    with ScratchOverlay.open(j, ckpt, 0) as ov:
        for offset, data in [(512, b"\x11" * 512), (4096, b"\x22" * 8192),
                             (3 * 4096 + 1024, b"\x33" * 1536)]:
            ov.write(offset, data)
            expect[offset : offset + len(data)] = data
        ov.write_zeroes(8192, 1024)
        expect[8192 : 8192 + 1024] = bytes(1024)
        assert ov.read(0, 64 * 1024) == expect[: 64 * 1024]
        # unaligned buffer views and odd sub-ranges still merge correctly
        buf = bytearray(4096 + 512)
        ov.read_into(3584, memoryview(buf))
        assert buf == expect[3584 : 3584 + len(buf)]
        assert ov.written_bytes == 512 + 8192 + 1536 - 1024
        assert ov.zeroed_bytes == 1024


def test_trim_makes_the_range_read_as_the_view_again(journal):
    j, snaps = journal
    ckpt, images = snaps[-1]
    with ScratchOverlay.open(j, ckpt, 1) as ov:
        ov.write(0, b"\xff" * 65536)
        ov.write_zeroes(65536, 4096)
        ov.trim(4096, 65536)
        got = ov.read(0, 2 * 65536)
        assert got[:4096] == b"\xff" * 4096
        assert got[4096:] == images["disk1"][4096 : 2 * 65536]


def test_scratch_limit_refuses_the_write_that_would_pass_it_and_keeps_nothing(journal):
    j, snaps = journal
    ckpt, images = snaps[-1]
    with ScratchOverlay.open(j, ckpt, 0, limit_bytes=64 * 1024) as ov:
        ov.write(0, b"\x01" * 65536)
        ov.write(0, b"\x02" * 65536)  # rewriting the same sectors costs nothing more
        ov.write_zeroes(65536, MiB)  # zeroes cost no scratch space
        with pytest.raises(ScratchLimitError, match="over its limit of 65536"):
            ov.write(2 * 65536, b"\x03" * 512)
        assert isinstance(ScratchLimitError("x"), OSError)
        assert ov.used_bytes == 65536
        assert ov.read(2 * 65536, 512) == bytes(512)  # zeroed above, the refused write absent
        assert ov.read(MiB + 65536, 512) == images["disk0"][MiB + 65536 : MiB + 65536 + 512]


def test_misaligned_or_out_of_range_writes_are_refused(journal):
    j, snaps = journal
    with ScratchOverlay.open(j, snaps[0][0], 0) as ov:
        with pytest.raises(AlignmentError):
            ov.write(100, b"x" * 512)
        with pytest.raises(AlignmentError):
            ov.write(0, b"x" * 100)
        with pytest.raises(OutOfRangeError):
            ov.write(2 * MiB, b"x" * 512)
        with pytest.raises(OutOfRangeError):
            ov.read(2 * MiB - 512, 1024)
        assert ov.written_bytes == 0


def test_close_discards_writes_releases_the_view_and_touches_nothing(tmp_path):
    j, snaps = build_journal(tmp_path / "j", sizes=(MiB,), rounds=2, writes=20)
    ckpt, images = snaps[0]
    j.close()
    before = tree_digest(tmp_path / "j")
    j = Journal.open(tmp_path / "j")
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    ov = ScratchOverlay.open(j, ckpt, "disk0", directory=scratch_dir)
    ov.write(0, os.urandom(MiB))
    assert ov.read(0, MiB) != images["disk0"]
    assert j._pins  # the overlay's view pins its checkpoint
    ov.close()
    ov.close()  # idempotent
    assert not j._pins
    with pytest.raises(ClosedError):
        ov.read(0, 512)
    with pytest.raises(ClosedError):
        ov.write(0, b"x" * 512)
    # a new overlay on the same checkpoint starts from the view again
    with ScratchOverlay.open(j, ckpt, "disk0") as again:
        assert again.read(0, MiB) == images["disk0"]
    j.close()
    assert tree_digest(tmp_path / "j") == before
    assert list(scratch_dir.iterdir()) == []  # the scratch file was never visible by name


def test_overlay_on_a_borrowed_view_leaves_the_view_open(journal):
    j, snaps = journal
    view = j.view(snaps[0][0])
    with ScratchOverlay(view, "disk1") as ov:
        ov.write(0, b"\x05" * 512)
    assert view.read("disk1", 0, 512) == snaps[0][1]["disk1"][:512]
    view.close()


def test_discard_drops_every_write(journal):
    j, snaps = journal
    ckpt, images = snaps[-1]
    with ScratchOverlay.open(j, ckpt, 0, limit_bytes=MiB) as ov:
        ov.write(0, b"\x09" * MiB)
        ov.discard()
        assert ov.used_bytes == 0
        assert ov.read(0, MiB) == images["disk0"][:MiB]
        ov.write(MiB, b"\x0a" * MiB)  # the limit counts from zero again


sectors = st.integers(min_value=0, max_value=127)


class OverlayMachine(RuleBasedStateMachine):
    """Writes, zeroes, trims and reads against a model of the overlay."""

    SIZE = 128 * SECTOR
    LIMIT = 64 * SECTOR

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="zcore-ov-")
        self.journal = Journal.create(os.path.join(self.tmp, "j"),
                                      [VolumeSpec(0, "d", self.SIZE)])
        base = os.urandom(self.SIZE)
        self.journal.append([(0, 0, base)])
        self.journal.append([(0, 4096, bytes(8192))])
        ckpt = self.journal.checkpoint()
        self.journal.append([(0, 0, b"\xee" * self.SIZE)])  # after the checkpoint: unseen
        self.view_image = bytearray(base)
        self.view_image[4096 : 4096 + 8192] = bytes(8192)
        self.model = bytearray(self.view_image)
        self.stored: set[int] = set()  # sectors the scratch file ever held
        self.ov = ScratchOverlay.open(self.journal, ckpt, 0, limit_bytes=self.LIMIT)

    def _range(self, first: int, count: int) -> tuple[int, int]:
        count = max(1, min(count, 128 - first))
        return first * SECTOR, count * SECTOR

    @rule(first=sectors, count=st.integers(1, 40), byte=st.integers(0, 255))
    def write(self, first, count, byte):
        offset, length = self._range(first, count)
        new = set(range(offset // SECTOR, (offset + length) // SECTOR)) - self.stored
        if (len(self.stored) + len(new)) * SECTOR > self.LIMIT:
            with pytest.raises(ScratchLimitError):
                self.ov.write(offset, bytes([byte]) * length)
            return
        self.ov.write(offset, bytes([byte]) * length)
        self.model[offset : offset + length] = bytes([byte]) * length
        self.stored |= new

    @rule(first=sectors, count=st.integers(1, 40))
    def zero(self, first, count):
        offset, length = self._range(first, count)
        self.ov.write_zeroes(offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule(first=sectors, count=st.integers(1, 40))
    def trim(self, first, count):
        offset, length = self._range(first, count)
        self.ov.trim(offset, length)
        self.model[offset : offset + length] = self.view_image[offset : offset + length]

    @rule(first=sectors, count=st.integers(1, 128))
    def read(self, first, count):
        offset, length = self._range(first, count)
        assert self.ov.read(offset, length) == self.model[offset : offset + length]

    @precondition(lambda self: self.stored)
    @rule()
    def discard(self):
        self.ov.discard()
        self.model[:] = self.view_image
        self.stored.clear()

    @invariant()
    def space_is_accounted(self):
        assert self.ov.used_bytes == len(self.stored) * SECTOR <= self.LIMIT

    def teardown(self):
        self.ov.close()
        view = self.journal.view(self.ov.checkpoint)
        assert view.read(0, 0, self.SIZE) == self.view_image  # the journal never changed
        view.close()
        self.journal.close()
        shutil.rmtree(self.tmp)


TestOverlayModel = OverlayMachine.TestCase
