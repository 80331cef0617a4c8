"""DurableOverlay (zcore.recovery.overlay): the read-write volume of a live failover.
Checked against a model: reads are the view under the overlay's writes; after a kill -9
of a writer process at a random point and a reopen, every flushed write is there and
every sector holds a value it held since the last acknowledged flush."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.nbd import MiB, build_journal
from helpers.overlay import fill_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zcore.errors import ClosedError
from zcore.journal import Journal
from zcore.recovery import DurableOverlay, remove_overlay
from zcore.recovery.overlay import LOG_NAME, RECORD_SIZE

SECTOR = 512
AREA = 128  # sectors the operations touch: small, so they overlap
WRITER = Path(__file__).parent / "helpers" / "overlay.py"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("ovl") / "j"
    journal, snaps = build_journal(path, sizes=(MiB,), rounds=2, writes=40)
    journal.close()
    ckpt, images = snaps[-1]
    return path, ckpt.id, images["disk0"]


ops_strategy = st.lists(
    st.tuples(st.sampled_from(["w", "w", "w", "z", "t", "f", "f"]),
              st.integers(0, AREA - 1), st.integers(1, 32), st.integers(0, 1000)),
    min_size=1, max_size=40,
).map(lambda ops: [[k, o * SECTOR, min(n, AREA - o) * SECTOR, i * 7 + f]
                   for i, (k, o, n, f) in enumerate(ops)])


def apply(model: bytearray, view: bytes, op: list) -> None:
    kind, offset, length, fill = op
    if kind == "w":
        model[offset : offset + length] = fill_bytes(fill, offset, length)
    elif kind == "z":
        model[offset : offset + length] = bytes(length)
    elif kind == "t":
        model[offset : offset + length] = view[offset : offset + length]


def run_ops(overlay: DurableOverlay, ops: list) -> None:
    for kind, offset, length, fill in ops:
        if kind == "w":
            overlay.write(offset, fill_bytes(fill, offset, length))
        elif kind == "z":
            overlay.write_zeroes(offset, length)
        elif kind == "t":
            overlay.trim(offset, length)
        else:
            overlay.flush()


def open_overlay(base, directory) -> tuple[Journal, DurableOverlay]:
    path, cid, _ = base
    journal = Journal.open(path)
    return journal, DurableOverlay(journal.view(cid), "disk0", directory, owns_view=True)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops_strategy)
def test_overlay_reads_are_the_view_under_its_writes_before_and_after_reopen(
        base, tmp_path_factory, ops):
    directory = tmp_path_factory.mktemp("o") / "overlay"
    view = base[2]
    model = bytearray(view)
    journal, overlay = open_overlay(base, directory)
    try:
        run_ops(overlay, ops)
        for op in ops:
            apply(model, view, op)
        assert overlay.read(0, MiB) == model
        overlay.flush()
        overlay.close()
        overlay = DurableOverlay(journal.view(base[1]), "disk0", directory, owns_view=True)
        assert overlay.read(0, MiB) == model
    finally:
        overlay.close()
        journal.close()


def allowed_values(view: bytes, ops: list, flushed: int) -> list[set[bytes]]:
    """Per sector of AREA: what it may read after a crash, when ops[:flushed] were
    acknowledged by a flush: its value then, or any value a later operation gave it."""
    model = bytearray(view)
    for op in ops[:flushed]:
        apply(model, view, op)
    allowed = [{bytes(model[s * SECTOR : (s + 1) * SECTOR])} for s in range(AREA)]
    for op in ops[flushed:]:
        if op[0] == "f":
            continue
        after = bytearray(model)
        apply(after, view, op)
        for s in range(op[1] // SECTOR, (op[1] + op[2]) // SECTOR):
            allowed[s].add(bytes(after[s * SECTOR : (s + 1) * SECTOR]))
    return allowed


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops_strategy, kill_at=st.integers(0, 40))
def test_kill_9_of_the_writer_loses_no_flushed_write(base, tmp_path_factory, ops, kill_at):
    tmp = tmp_path_factory.mktemp("k")
    directory = tmp / "overlay"
    ops_file = tmp / "ops.json"
    ops_file.write_text(json.dumps(ops))
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(base[0]), str(base[1]), "disk0", str(directory),
         str(ops_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert proc.stdout is not None
    acked = -1
    try:
        assert proc.stdout.readline().strip() == "R"
        kill_at = min(kill_at, len(ops) - 1)
        while acked < kill_at:
            line = proc.stdout.readline()
            assert line.startswith("A "), line
            acked = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
    for line in rest.split("\n"):  # printed before the kill landed: acknowledged too
        if line.startswith("A "):
            acked = max(acked, int(line.split()[1]))
    flushed = max((i + 1 for i in range(acked + 1) if ops[i][0] == "f"), default=0)
    allowed = allowed_values(base[2], ops, flushed)
    journal, overlay = open_overlay(base, directory)
    try:
        got = overlay.read(0, AREA * SECTOR)
        for s in range(AREA):
            assert got[s * SECTOR : (s + 1) * SECTOR] in allowed[s], f"sector {s}"
        assert overlay.read(AREA * SECTOR, MiB - AREA * SECTOR) == base[2][AREA * SECTOR :]
    finally:
        overlay.close()
        journal.close()


def test_torn_log_tail_is_ignored_at_open(base, tmp_path):
    directory = tmp_path / "overlay"
    journal, overlay = open_overlay(base, directory)
    try:
        overlay.write(0, b"\x07" * 4096)
        overlay.flush()
        overlay.close()
        with open(directory / LOG_NAME, "ab") as f:  # a record cut short by a crash
            f.write(b"\x01" * (RECORD_SIZE - 5))
        overlay = DurableOverlay(journal.view(base[1]), "disk0", directory, owns_view=True)
        assert overlay.read(0, 4096) == b"\x07" * 4096
        assert overlay.read(4096, 4096) == base[2][4096:8192]
        assert (directory / LOG_NAME).stat().st_size % RECORD_SIZE == 0
    finally:
        overlay.close()
        journal.close()


def test_closed_overlay_refuses_io_and_removal_leaves_nothing(base, tmp_path):
    directory = tmp_path / "overlay"
    journal, overlay = open_overlay(base, directory)
    overlay.write(0, b"\x01" * 512)
    overlay.flush()
    overlay.close()
    with pytest.raises(ClosedError):
        overlay.read(0, 512)
    remove_overlay(directory)
    assert not directory.exists()
    journal.close()


def test_fold_into_writes_the_overlay_over_an_image(base, tmp_path):
    journal, overlay = open_overlay(base, tmp_path / "overlay")
    try:
        overlay.write(4096, b"\x05" * 8192)
        overlay.write_zeroes(0, 1024)
        image = bytearray(base[2])
        n = overlay.fold_into(lambda at, data: image.__setitem__(
            slice(at, at + len(data)), bytes(data)))
        assert n == 8192 + 1024
        assert bytes(image) == overlay.read(0, MiB)
    finally:
        overlay.close()
        journal.close()



def test_overlay_export_serves_fua_writes_that_survive_a_reopen(base, tmp_path):
    from helpers.nbd import RawClient, serving

    from zcore import nbd

    journal, overlay = open_overlay(base, tmp_path / "overlay")
    try:
        export = nbd.overlay_export(overlay, "failover/v/vm1/disk0")
        assert export.sync_in_thread and not export.readonly
        with serving([export], tmp_path) as srv, RawClient(srv.address) as c:
            c.connect_export("failover/v/vm1/disk0")
            assert c.write(8192, b"\x42" * 4096, flags=nbd.CMD_FLAG_FUA) == 0
            error, data = c.read(0, 16384)
            assert error == 0
            assert data == base[2][:8192] + b"\x42" * 4096 + base[2][12288:16384]
        overlay = DurableOverlay(journal.view(base[1]), "disk0", tmp_path / "overlay",
                                 owns_view=True)
        assert overlay.read(8192, 4096) == b"\x42" * 4096
    finally:
        overlay.close()
        journal.close()
