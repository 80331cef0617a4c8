"""QemuDisk (zcore.hypervisor) on a QEMU without an NBD server of its own: zcore starts one,
which every volume on that QEMU and every later QemuDisk (a VPG or zcore restarted) share;
a server zcore did not start is refused unless the volume names its socket.

The hypervisor is `qemu-system-x86_64 -machine none` with two raw block nodes and a QMP
socket: no guest runs (qemu-storage-daemon, tests/helpers/qsd.py, always runs its own NBD
server, so it cannot show this).  Each test takes well under a second.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool

from zcore.adapters.qmp import QMPClient
from zcore.errors import AdapterError, HypervisorError
from zcore.hypervisor import QemuDisk

MiB = 1 << 20
START_S = 30.0


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Path]:
    """A QEMU with nodes d0 and d1 (d0 starts with b"hello"); its QMP socket."""
    binary = require_tool("qemu-system-x86_64")
    nodes = []
    for name, data in (("d0", b"hello"), ("d1", b"")):
        image = tmp_path / f"{name}.img"
        image.write_bytes(data)
        with open(image, "r+b") as f:
            f.truncate(4 * MiB)
        nodes += ["-blockdev", json.dumps({"driver": "raw", "node-name": name, "file": {
            "driver": "file", "filename": str(image)}})]
    qmp = tmp_path / "qmp.sock"
    with open(tmp_path / "qemu.log", "wb") as log:
        proc = subprocess.Popen([binary, "-machine", "none", "-nodefaults", "-display",
                                 "none", "-qmp", f"unix:{qmp},server=on,wait=off", *nodes],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, (tmp_path / "qemu.log").read_text()
            try:
                QMPClient(qmp).close()
                break
            except (OSError, EOFError, AdapterError):
                assert time.monotonic() < deadline, "QEMU's QMP socket did not answer"
                time.sleep(0.02)
        yield qmp
    finally:
        proc.kill()
        proc.wait(10)


def read5(disk: QemuDisk) -> bytes:
    buf = bytearray(5)
    disk.read_into(0, buf)
    return bytes(buf)


def test_volumes_on_one_qemu_and_a_restarted_zcore_share_the_nbd_server_zcore_started(
        qemu: Path) -> None:
    first = QemuDisk(qemu, "d0", "zc-a")
    assert read5(first) == b"hello"
    second = QemuDisk(qemu, "d1", "zc-b")  # a second volume of the VM
    assert second.zero_extents() == [(0, 4 * MiB)]
    first.close()
    again = QemuDisk(qemu, "d0", "zc-a")  # its VPG (or zcore) started again
    assert read5(again) == b"hello"
    second.close()
    again.close()


def test_an_nbd_server_zcore_did_not_start_is_used_only_when_the_volume_names_it(
        qemu: Path, tmp_path: Path) -> None:
    theirs = tmp_path / "nbd.sock"
    with QMPClient(qemu) as q:
        q.execute("nbd-server-start", {"addr": {"type": "unix", "data": {
            "path": str(theirs)}}})
    disk = QemuDisk(qemu, "d0", "zc-a")
    with pytest.raises(HypervisorError, match="NBD server zcore did not start: give its"):
        read5(disk)
    named = QemuDisk(qemu, "d0", "zc-a", nbd_socket=str(theirs))
    assert read5(named) == b"hello"
    named.close()
