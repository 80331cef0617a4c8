"""A running QEMU's disk added to a site's inventory from the command line and the REST
API (issue 15): `zcore vm add NAME --qmp SOCKET --node [VOLUME=]NODE` and the volume
fields `qmp`, `node`, `nbd`.  The site probes QEMU (qemu-storage-daemon here) for the
node's size and records the volume as its `qemu:` address; a socket, node or field
combination that cannot be protected is refused with a message saying why."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import require_tool
from helpers.qsd import QemuStorageDaemon
from test_cli_client import Site, as_json, cli, ok, start_site

from zcore.hypervisor import QemuAddress

MiB = 1 << 20
SIZE = 6 * MiB


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = start_site(tmp_path_factory.mktemp("site"), "qemu-site")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuStorageDaemon]:
    require_tool("qemu-storage-daemon")
    root = tmp_path_factory.mktemp("qsd")
    with QemuStorageDaemon(root, root / "disk.qcow2", fmt="qcow2", size=SIZE) as d:
        yield d


def post(site: Site, path: str, body: object) -> httpx.Response:
    with httpx.Client(base_url=site.url + "/api/v1",
                      headers={"Authorization": f"Bearer {site.token}"}) as c:
        return c.post(path, json=body)


def test_vm_add_with_qmp_probes_the_node_and_records_its_qemu_address(
        site: Site, daemon: QemuStorageDaemon) -> None:
    out = ok(site, "vm", "add", "db", "--qmp", str(daemon.qmp_path), "--node", "disk0")
    assert "VM db" in out and "disk0" in out and "6.0 MiB" in out
    (vol,) = as_json(site, "vm", "show", "db")["volumes"]
    assert (vol["name"], vol["size"], vol["role"]) == ("disk0", SIZE, "protected")
    assert QemuAddress.parse(vol["path"]) == QemuAddress(str(daemon.qmp_path), "disk0")

    added = as_json(site, "vm", "add", "web", "--qmp", str(daemon.qmp_path),
                    "--node", "system=disk0", "--nbd", "/run/qemu/web-nbd.sock")
    (vol,) = added["volumes"]
    assert vol["name"] == "system" and vol["size"] == SIZE
    assert QemuAddress.parse(vol["path"]) == QemuAddress(
        str(daemon.qmp_path), "disk0", "/run/qemu/web-nbd.sock")


def test_an_unknown_node_or_socket_is_refused_saying_why(
        site: Site, daemon: QemuStorageDaemon, tmp_path: Path) -> None:
    result = cli(site, "vm", "add", "x1", "--qmp", str(daemon.qmp_path), "--node", "nope")
    assert result.exit_code == 1, result.output
    assert "invalid_config" in result.stderr
    assert "no block node 'nope'" in result.stderr and "disk0" in result.stderr

    result = cli(site, "vm", "add", "x2", "--qmp", str(tmp_path / "absent.sock"),
                 "--node", "disk0")
    assert result.exit_code == 1, result.output
    assert "cannot connect" in result.stderr and "absent.sock" in result.stderr

    listed = {v["name"] for v in as_json(site, "vm", "list")["items"]}
    assert not listed & {"x1", "x2"}  # nothing half-added


def test_the_api_refuses_a_qmp_volume_spec_that_does_not_add_up(
        site: Site, daemon: QemuStorageDaemon) -> None:
    qmp = str(daemon.qmp_path)
    refused = {
        "qmp without a node": {"name": "d", "qmp": qmp},
        "a node without qmp": {"name": "d", "node": "disk0", "size": SIZE},
        "both a path and qmp": {"name": "d", "qmp": qmp, "node": "disk0", "path": "/x"},
        "a relative socket": {"name": "d", "qmp": "qmp.sock", "node": "disk0"},
        "a scratch qemu disk": {"name": "d", "qmp": qmp, "node": "disk0", "role": "scratch"},
        "a file without a size": {"name": "d", "path": "/x"},
    }
    for what, spec in refused.items():
        r = post(site, "/vms", {"name": "bad", "volumes": [spec]})
        assert r.status_code == 422, (what, r.text)
        assert r.json()["error"]["code"] == "invalid_request", (what, r.text)

    r = post(site, "/vms", {"name": "bad", "volumes": [
        {"name": "d", "qmp": qmp, "node": "disk0", "size": SIZE * 2}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_config", r.text
    assert f"is {SIZE} bytes" in r.json()["error"]["message"]

    ok(site, "vm", "add", "later", "--volume", "d=/dev/null:1M")
    r = post(site, "/vms/later/volumes", {"name": "q", "qmp": qmp, "node": "disk0"})
    assert r.status_code == 201, r.text
    assert r.json()["size"] == SIZE and r.json()["path"].startswith("qemu:")


def test_qmp_and_node_go_together_on_the_command_line(site: Site) -> None:
    for args in (["--node", "disk0"], ["--qmp", "/run/q.sock"],
                 ["--volume", "d=/dev/null:1M", "--nbd", "/run/n.sock"], []):
        result = cli(site, "vm", "add", "y", *args)
        assert result.exit_code == 2, (args, result.output)
    result = cli(site, "vm", "add", "y", "--qmp", "/run/q.sock", "--node", "=disk0")
    assert result.exit_code == 2 and "[VOLUME=]NODE" in result.stderr


class OldQemu:
    """A QMP monitor that says it is QEMU 6.2 (too old to mirror with dirty bitmaps over
    NBD): a Unix socket served in a thread, one session at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        replies = {"qmp_capabilities": {}, "query-version": {
            "qemu": {"major": 6, "minor": 2, "micro": 0}, "package": ""},
            "query-named-block-nodes": [{"node-name": "disk0", "ro": False, "drv": "raw",
                                         "image": {"virtual-size": SIZE}}]}
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                f.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode()
                        + b"\n")
                f.flush()
                for line in f:
                    command = json.loads(line)["execute"]
                    f.write(json.dumps({"return": replies[command]}).encode() + b"\n")
                    f.flush()

    def close(self) -> None:
        self.sock.close()


def test_a_qemu_too_old_to_mirror_with_bitmaps_is_refused(site: Site) -> None:
    short = Path(tempfile.mkdtemp(prefix="zc-old-"))  # sun_path holds 107 bytes
    old = OldQemu(short / "qmp.sock")
    try:
        result = cli(site, "vm", "add", "old", "--qmp", str(old.path), "--node", "disk0")
    finally:
        old.close()
        shutil.rmtree(short, ignore_errors=True)
    assert result.exit_code == 1, result.output
    assert "QEMU 6.2" in result.stderr and "7.1 or newer is needed" in result.stderr
