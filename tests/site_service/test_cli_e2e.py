"""The README's "Running two sites", run as a newcomer runs it: two `zcore site serve`
processes on loopback (free ports), every other step a real `zcore` command in a
subprocess with `--json`, in a temporary working directory with the README's relative
paths.  Writes go through the protected site's NBD export (qemu-io), a tagged checkpoint
is listed at the recovery site and read back there through a view over NBD, and each
service is killed with SIGKILL and restarted: the checkpoint is still listed and the view
still reads what was written.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import site as site_helpers
from helpers.cli import zcore_cmd
from helpers.site import SiteProcess, wait_for

MiB = 1 << 20
DISK = 64 * MiB  # the README's 1G works too (sparse); smaller keeps the initial sync short

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-io") is None or shutil.which("qemu-img") is None,
    reason="needs qemu-io and qemu-img")


def zcore_exe() -> list[str]:
    """The `zcore` console script of this environment (what the README's `pip install .`
    puts on PATH)."""
    return zcore_cmd()


class Shell:
    """A terminal in `cwd`: runs `zcore ...` with the environment the README exports."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("ZCORE_SITE", "ZCORE_TOKEN", "ZCORE_SITE_DIR", "ZCORE_CA_FILE")}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*zcore_exe(), *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=120)
        if check:
            assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr, done.stderr
        return done

    def json(self, *args: str) -> Any:
        """`zcore ARGS --json`: the decoded answer."""
        done = self.run(*args, "--json")
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise AssertionError(f"zcore {' '.join(args)} --json printed no JSON: "
                                 f"{done.stdout!r} {done.stderr!r}") from None


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Shell:
    # SiteProcess starts `zcore site serve` with the console script too
    monkeypatch.setattr(site_helpers, "zcore_cmd", lambda *a: [*zcore_exe(), *a])
    return Shell(tmp_path)


@pytest.fixture
def two_sites(shell: Shell) -> Iterator[tuple[SiteProcess, SiteProcess]]:
    prod_init = shell.json("site", "init", "prod", "--name", "prod")
    dr_init = shell.json("site", "init", "dr", "--name", "dr")
    assert prod_init["name"] == "prod" and dr_init["token"].startswith("zc_")
    prod, dr = SiteProcess(shell.cwd / "prod"), SiteProcess(shell.cwd / "dr")
    try:
        prod.spawn(), dr.spawn()  # "each serve in its own terminal"
        yield prod.wait_ready(), dr.wait_ready()
    finally:
        prod.close()
        dr.close()


def qemu_io(uri: str, command: str, readonly: bool = False) -> None:
    args = ["qemu-io", "-f", "raw", *(["-r"] if readonly else []), "-c", command, uri]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, (
        done.stdout + done.stderr)


def same_image(view: str, image: Path) -> None:
    """The view reads exactly the image's bytes (qemu-img compare: contents, not allocation)."""
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", view,
                           str(image)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def tagged(shell: Shell, tag: str) -> list[dict[str, Any]]:
    page = shell.json("checkpoint", "list", "web", "--since", "1h", "--kind", "tagged")
    return [c for c in page["items"] if c["tag"] == tag]


def tag_when_streaming(shell: Shell, tag: str) -> dict[str, Any]:
    """`zcore checkpoint tag`, retried while the VPG is not streaming yet (after a restart
    it resyncs from its bitmaps first, and the site refuses a tag with exit status 1)."""
    def attempt() -> dict[str, Any] | None:
        done = shell.run("checkpoint", "tag", "web", tag, "--json", check=False)
        if done.returncode == 1:
            return None
        assert done.returncode == 0, done.stderr
        made: dict[str, Any] = json.loads(done.stdout)
        return made

    made: dict[str, Any] = wait_for(f"tag {tag!r}", attempt, timeout=60, interval=0.5)
    return made


def test_the_readme_two_site_flow_through_the_cli_survives_kill_9_of_either_site(
        shell: Shell, two_sites: tuple[SiteProcess, SiteProcess]) -> None:
    prod, dr = two_sites
    # pair: export ZCORE_SITE_DIR=prod; zcore site pair --peer-site-dir dr --peer-address ...
    shell.env["ZCORE_SITE_DIR"] = "prod"
    paired = shell.json("site", "pair", "--peer-site-dir", "dr", "--peer-address",
                        dr.replication)
    assert paired["peer"]["name"] == "dr" and paired["pairing_token"]["token"]
    status = shell.json("site", "status")
    assert status["sites"]["site"]["name"] == "prod"
    assert [p["name"] for p in status["sites"]["peers"]] == ["dr"]
    assert status["health"]["status"] == "ok", status["health"]

    # protect a VM
    disk = shell.cwd / "web-disk0.img"
    with open(disk, "wb") as f:
        f.truncate(DISK)
    vm = shell.json("vm", "add", "web", "--volume", "disk0=web-disk0.img")
    assert [(v["name"], v["size"], v["path"]) for v in vm["volumes"]] == [
        ("disk0", DISK, str(disk))]
    assert [v["name"] for v in shell.json("vm", "list")["items"]] == ["web"]
    assert shell.json("vm", "show", "web")["name"] == "web"
    task = shell.json("vpg", "create", "web", "--vm", "web", "--peer", "dr", "--history", "24h",
                      "--checkpoint-interval", "1s")
    assert task["state"] == "succeeded", task
    shown = shell.json("vpg", "show", "web")
    assert shown["vpg"]["role"] == "protected" and shown["vpg"]["state"] == "protecting"
    assert [v["name"] for v in shell.json("vpg", "list")] == ["web"]

    # the VM writes through the protected site's NBD export; tag a checkpoint
    qemu_io(f"{prod.nbd}/web/web/disk0", "write -P 0xab 0 1M")
    qemu_io(f"{prod.nbd}/web/web/disk0", "write -P 0x3c 17M 64k")
    before = shell.json("checkpoint", "tag", "web", "before upgrade")
    assert before["tag"] == "before upgrade" and before["kind"] == "tagged"

    # listed at the recovery site, and a view at it reads what was written
    shell.env["ZCORE_SITE_DIR"] = "dr"
    found = wait_for("the tag at dr", lambda: tagged(shell, "before upgrade"))
    assert [c["id"] for c in found] == [before["id"]]
    assert shell.json("checkpoint", "list", "web", "--limit", "20")["items"]
    buckets = shell.json("checkpoint", "list", "web", "--since", "30d", "--buckets", "1d")
    assert sum(b["tagged"] for b in buckets["buckets"]) == 1
    view = f"{dr.nbd}/web/web/disk0@{before['id']}"
    same_image(view, disk)
    same_image(f"{dr.nbd}/web/web/disk0@tag:before%20upgrade", disk)  # by its tag
    qemu_io(f"{dr.nbd}/web/web/disk0@latest", "read -P 0x3c 17M 64k", readonly=True)
    assert shell.json("vpg", "show", "web")["vpg"]["role"] == "recovery"

    # kill -9 of the recovery site, restart: the checkpoint and its data are intact
    dr.kill()
    dr.start()
    assert [c["id"] for c in tagged(shell, "before upgrade")] == [before["id"]]
    same_image(f"{dr.nbd}/web/web/disk0@{before['id']}", disk)

    # kill -9 of the protected site, restart: the VPG resumes, new writes replicate
    prod.kill()
    prod.start()
    shell.env["ZCORE_SITE_DIR"] = "prod"
    assert shell.json("vpg", "show", "web")["vpg"]["role"] == "protected"
    qemu_io(f"{prod.nbd}/web/web/disk0", "write -P 0xcd 1M 1M")
    after = tag_when_streaming(shell, "after restart")
    shown = shell.run("vpg", "show", "web").stdout  # the protected side's link compression
    assert "link compression" in shown and "(saved" in shown, shown
    shell.env["ZCORE_SITE_DIR"] = "dr"
    wait_for("the second tag at dr", lambda: tagged(shell, "after restart"), timeout=60)
    same_image(f"{dr.nbd}/web/web/disk0@{after['id']}", disk)
    old = f"{dr.nbd}/web/web/disk0@{before['id']}"
    qemu_io(old, "read -P 0xab 0 1M", readonly=True)
    qemu_io(old, "read -P 0 1M 1M", readonly=True)  # the older view: before the new write

    # what happened, at both sites
    events = shell.json("events")["items"]
    assert any(e["code"] == "vpg_attached" for e in events), events
    alerts = shell.json("alerts", "list")
    assert not [a for a in alerts if a["code"] == "history_not_meeting_sla"], alerts  # young
    shell.env["ZCORE_SITE_DIR"] = "prod"
    tasks = shell.json("tasks", "list")
    assert any(t["kind"] == "vpg_create" and t["state"] == "succeeded" for t in tasks), tasks
    assert prod.stop() == 0 and dr.stop() == 0  # SIGTERM: a clean stop


def test_a_cli_command_without_a_running_site_exits_3_and_names_the_url(
        shell: Shell) -> None:
    shell.json("site", "init", "lone", "--name", "lone", "--api-port", "1")
    done = shell.run("site", "status", "--site-dir", "lone", check=False)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "http://127.0.0.1:1" in done.stderr and "zcore site serve" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_on_a_busy_replication_or_nbd_port_names_the_listener_and_exits_1(
        shell: Shell) -> None:
    shell.json("site", "init", "busy", "--name", "busy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for option, name in (("--replication-port", "replication"), ("--nbd-port", "NBD")):
            ports = {"--api-port": "0", "--replication-port": "0", "--nbd-port": "0",
                     option: port}
            done = shell.run("site", "serve", "busy", *(x for kv in ports.items() for x in kv),
                             check=False)
            assert done.returncode == 1, (done.stdout, done.stderr)
            assert f"cannot listen for {name} on 127.0.0.1:{port}" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr and "API:" not in done.stdout
