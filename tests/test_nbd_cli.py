"""`zcore nbd serve`: protected volumes captured into a journal, then that journal's
checkpoints served as views and scratch overlays, all through real clients."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import require_tool
from helpers.nbd import MiB, run, write_tls_files

from zcore.journal import Journal

# `python -m` puts the working directory first on sys.path: run from outside the source
# tree, so the subprocess imports the installed (compiled) package, not the sources.
OUTSIDE_SOURCE = tempfile.gettempdir()


class Served:
    """A `zcore nbd serve` process; `uris` maps export name -> first URI printed."""

    def __init__(self, *args: str, lines: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zcore.cli", "nbd", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=OUTSIDE_SOURCE)
        self.uris: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        lines_q: queue.Queue[str] = queue.Queue()

        def reader() -> None:
            try:
                for text in self.proc.stdout:
                    lines_q.put(text)
            except (OSError, ValueError):  # stop() closed the pipe
                pass

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.monotonic() + 30
        got = 0
        while got < lines:
            try:
                line = lines_q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                self.proc.wait()
                err = self.proc.stderr.read()
                self.proc.stderr.close()
                raise AssertionError(f"zcore nbd serve did not start: {err}") from None
            uri, kind, _ = line.rstrip("\n").split("\t")
            name = uri.split("?")[0].rsplit("/", 1)[1]
            self.uris.setdefault(name, uri)
            self.kinds[name] = kind
            got += 1

    def stop(self, sig=signal.SIGTERM) -> str:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        self.proc.stdout.close()
        assert self.proc.returncode == 0, err
        return err


def test_serve_protect_then_view_and_scratch_the_captured_checkpoint(tmp_path):
    qemu_io, nbdcopy = require_tool("qemu-io"), require_tool("nbdcopy")
    image = tmp_path / "disk0.img"
    image.write_bytes(os.urandom(4 * MiB) + bytes(4 * MiB))  # content before protection
    journal_dir = tmp_path / "journals" / "vm1"
    served = Served("--journal", str(journal_dir), "--protect", f"disk0={image}",
                    "--unix", str(tmp_path / "s.sock"), lines=2)
    try:
        assert served.kinds == {"disk0": "volume"}
        assert served.uris["disk0"].startswith("nbd://127.0.0.1:")
        run([qemu_io, "-f", "raw", "-c", "write -P 0x7e 5M 1M", served.uris["disk0"]])
    finally:
        err = served.stop()
    assert "stopped at checkpoint" in err
    disk = image.read_bytes()
    assert disk[5 * MiB : 6 * MiB] == b"\x7e" * MiB

    served = Served("--journal", str(journal_dir), "--view", "v=disk0@latest",
                    "--view", "w=disk0@tag:stopped", "--scratch", "t=disk0",
                    "--scratch-limit", "2M", lines=3)
    try:
        assert served.kinds == {"v": "view", "w": "view", "t": "scratch"}
        for name in ("v", "w", "t"):  # the initial sync and the write were both captured
            out = tmp_path / f"{name}.raw"
            run([nbdcopy, served.uris[name], str(out)])
            assert out.read_bytes() == disk
        run([qemu_io, "-f", "raw", "-c", "write -P 0x01 0 1M", "-c", "read -P 0x01 0 1M",
             served.uris["t"]])
        full = subprocess.run([qemu_io, "-f", "raw", "-c", "write -P 0x01 2M 4M",
                               served.uris["t"]], capture_output=True, text=True)
        assert "No space left on device" in full.stdout + full.stderr
    finally:
        served.stop(signal.SIGINT)
    with Journal.open(journal_dir) as journal:  # the scratch writes went nowhere
        with journal.view(journal.latest_checkpoint()) as view:
            assert view.read("disk0", 0, 8 * MiB) == disk


def test_serve_files_over_tls_only(tmp_path):
    nbdinfo = require_tool("nbdinfo")
    tls = tmp_path / "tls"
    write_tls_files(tls)
    (tmp_path / "a.img").write_bytes(bytes(MiB))
    served = Served("--file-ro", f"a={tmp_path / 'a.img'}",
                    "--tls-cert", str(tls / "server-cert.pem"),
                    "--tls-key", str(tls / "server-key.pem"), "--tls-ca", str(tls / "ca-cert.pem"),
                    lines=1)
    try:
        uri = served.uris["a"]
        assert uri.startswith("nbds://")
        out = run([nbdinfo, f"{uri}?tls-certificates={tls}"]).stdout
        assert "is_read_only: true" in out
        assert subprocess.run([nbdinfo, uri.replace("nbds", "nbd", 1)],
                              capture_output=True).returncode != 0
    finally:
        served.stop()


@pytest.mark.parametrize("args, message", [
    ([], "nothing to serve"),
    (["--view", "v=disk0"], "need --journal"),
    (["--file", "novalue"], "NAME=VALUE"),
    (["--file", "a=/x", "--tls-cert", __file__], "TLS needs"),
    (["--file", "a=/does/not/exist"], "No such file"),
])
def test_serve_refuses_bad_arguments(args, message):
    proc = subprocess.run([sys.executable, "-m", "zcore.cli", "nbd", "serve", "--port", "0",
                           *args], capture_output=True, text=True, timeout=60,
                          cwd=OUTSIDE_SOURCE)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_serve_stopped_during_the_initial_sync_resumes_it_next_time(tmp_path):
    nbdcopy = require_tool("nbdcopy")
    image = tmp_path / "big.img"
    image.write_bytes(os.urandom(24 * MiB))
    journal_dir = tmp_path / "journals" / "vm1"
    outcomes = []
    for _ in range(20):  # stop at once, then until a run ends with a final checkpoint
        served = Served("--journal", str(journal_dir), "--protect", f"disk0={image}", lines=1)
        if outcomes:
            time.sleep(0.5)
        err = served.stop()
        outcomes.append("stopped at checkpoint" in err)
        assert outcomes[-1] or "no final checkpoint" in err, err
        if outcomes[-1]:
            break
    assert outcomes[-1]
    served = Served("--journal", str(journal_dir), "--view", "v=disk0", lines=1)
    try:
        run([nbdcopy, served.uris["v"], str(tmp_path / "v.raw")])
    finally:
        served.stop()
    assert (tmp_path / "v.raw").read_bytes() == image.read_bytes()
