"""The QEMU fixture of issue 15 (tests/helpers/qsd.py): qemu-storage-daemon serving an
image whose "guest" writes come through its NBD export, mirrored (sync=none,
copy-mode=write-blocking) into `zcore nbd serve --protect`, whose journal must then hold
exactly what the guest wrote."""

from __future__ import annotations

import shutil

import pytest
from conftest import require_tool
from helpers.nbd import MiB, run
from helpers.qsd import CaptureTarget, QemuStorageDaemon, create_image, raw_bytes

from zcore.journal import Journal

SIZE = 8 * MiB
# guest writes of every shape the mirror forwards: aligned, unaligned, zeroes, overlaps
GUEST_WRITES = ("write -P 0x5a 1M 64k", "write -P 0x11 4097 3000", "write -z 2M 512k",
                "write -P 0x77 7M 1M", "write -P 0x22 1M 4k")


def _qemu_io(qsd: QemuStorageDaemon, *commands: str) -> None:
    args = [require_tool("qemu-io"), "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    run([*args, qsd.nbd_uri])


def test_guest_writes_through_the_export_reach_a_created_qcow2(tmp_path):
    qsd_bin = require_tool("qemu-storage-daemon")
    with QemuStorageDaemon(tmp_path, tmp_path / "disk.qcow2", fmt="qcow2", size=SIZE,
                           binary=qsd_bin) as qsd:
        nodes = {n["node-name"]: n["drv"] for n in qsd.qmp("query-named-block-nodes")}
        assert nodes == {"disk0": "qcow2", "disk0-file": "file"}
        assert qsd.block_job("zcore-mirror") is None
        _qemu_io(qsd, "write -P 0x5a 1M 64k")
    image = raw_bytes(tmp_path / "disk.qcow2", "qcow2")
    assert len(image) == SIZE
    assert image[MiB : MiB + 65536] == b"\x5a" * 65536
    assert image.count(0) == SIZE - 65536


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_mirrored_guest_writes_are_the_journals_latest_checkpoint(tmp_path, fmt):
    qsd_bin = require_tool("qemu-storage-daemon")
    require_tool("qemu-img")
    source = tmp_path / f"disk.{fmt}"
    create_image(source, fmt, SIZE)
    with QemuStorageDaemon(tmp_path / "q0", source, fmt=fmt, binary=qsd_bin) as qsd:
        _qemu_io(qsd, *(f"write -P {i} {i * MiB} 1M" for i in range(1, 4)))
    before = raw_bytes(source, fmt)  # what the disk holds before the mirror
    target = tmp_path / "capture.img"  # zcore's copy, as it starts: the disk before
    target.write_bytes(before)
    journal = tmp_path / "journals" / "vm1"
    zcore = CaptureTarget(tmp_path / "z", target, journal)
    try:
        with QemuStorageDaemon(tmp_path / "q1", source, fmt=fmt, direct=True,
                               binary=qsd_bin) as qsd:
            job = qsd.start_mirror(zcore.host, zcore.port, "disk0")
            assert job["type"] == "mirror" and job["status"] == "ready"
            _qemu_io(qsd, *GUEST_WRITES)
            qsd.stop_mirror()
            assert qsd.block_job("zcore-mirror") is None
            _qemu_io(qsd, "write -P 0x99 0 4k")  # after the mirror: not forwarded
    finally:
        log = zcore.stop()
    assert "stopped at checkpoint" in log
    guest = raw_bytes(source, fmt)
    assert guest != before and guest[:4096] == b"\x99" * 4096
    with Journal.open(journal) as j, j.view(j.latest_checkpoint()) as view:
        captured = view.read("disk0", 0, SIZE)
    assert captured[4096:] == guest[4096:]
    assert captured[:4096] == before[:4096]
    assert target.read_bytes() == captured


def test_guest_writes_go_on_when_zcore_dies_and_the_mirror_ends(tmp_path):
    qsd_bin = require_tool("qemu-storage-daemon")
    target = create_image(tmp_path / "capture.img", "raw", SIZE)
    shutil.copyfile(target, tmp_path / "disk.raw")
    zcore = CaptureTarget(tmp_path / "z", target, tmp_path / "journals" / "vm1")
    with QemuStorageDaemon(tmp_path / "q", tmp_path / "disk.raw", binary=qsd_bin) as qsd:
        try:
            qsd.start_mirror(zcore.host, zcore.port, "disk0")
            _qemu_io(qsd, "write -P 0x31 0 64k")
        finally:
            zcore.kill()
        assert not zcore.reachable()
        # on-target-error=report: writes the mirror cannot forward still complete, and
        # the job ends (it stays listed until it fails to copy what they dirtied)
        _qemu_io(qsd, "write -P 0x32 1M 64k", "read -P 0x32 1M 64k")
        _qemu_io(qsd, "write -P 0x33 2M 64k")
        qsd.wait_mirror_end()
        assert qsd.block_job("zcore-mirror") is None and qsd.mirror_job is None
        _qemu_io(qsd, "write -P 0x34 3M 64k")
        nodes = {n["node-name"] for n in qsd.qmp("query-named-block-nodes")}
        assert nodes == {"disk0", "disk0-file"}  # the target node is gone too
    image = (tmp_path / "disk.raw").read_bytes()
    for i, byte in enumerate((0x31, 0x32, 0x33, 0x34)):
        assert image[i * MiB : i * MiB + 65536] == bytes([byte]) * 65536
