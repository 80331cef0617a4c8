"""`zcore nbd serve`: protected volumes captured into a journal, then that journal's
checkpoints served as views and scratch overlays, all through real clients."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import require_tool
from helpers.nbd import MiB, run, write_tls_files

from zcore.journal import Journal
from zcore.vpg import STATE_NAME, read_vpg_state

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
        self.descriptions: dict[str, str] = {}
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
            uri, kind, description = line.rstrip("\n").split("\t")
            name = uri.split("?")[0].rsplit("/", 1)[1]
            self.uris.setdefault(name, uri)
            self.kinds[name] = kind
            self.descriptions[name] = description
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


def test_serve_stopped_after_an_overflow_lets_the_bitmap_sync_catch_up(tmp_path):
    """A 4 MiB buffer overflows under a 96 MiB nbdcopy: writes fall back to the dirty
    bitmap.  A SIGTERM at once after the copy waits for the bitmap sync, so the final
    checkpoint holds every acknowledged write (it had stopped with no final checkpoint,
    the journal's latest checkpoint older than the disk)."""
    nbdcopy = require_tool("nbdcopy")
    image, source = tmp_path / "disk0.img", tmp_path / "new.raw"
    image.write_bytes(bytes(96 * MiB))
    source.write_bytes(os.urandom(96 * MiB))
    journal_dir = tmp_path / "journals" / "vm1"
    served = Served("--journal", str(journal_dir), "--protect", f"disk0={image}",
                    "--buffer", "4M", lines=1)
    try:
        deadline = time.monotonic() + 60  # the initial sync first: it is not waited for
        while read_vpg_state(journal_dir.with_suffix(".vpg") / STATE_NAME)[
                "initial_sync_pending"]:
            assert time.monotonic() < deadline, "the initial sync did not end in 60 s"
            time.sleep(0.05)
        run([nbdcopy, str(source), served.uris["disk0"]])
    finally:
        err = served.stop()
    assert "bitmap mode: buffer overflow" in err, err
    assert "protected volumes stopped at checkpoint" in err, err
    expected = source.read_bytes()
    assert image.read_bytes() == expected
    with Journal.open(journal_dir) as journal, \
            journal.view(journal.latest_checkpoint()) as view:
        assert view.read("disk0", 0, 96 * MiB) == expected


@pytest.mark.parametrize("args, message", [
    (["--buffer", "1M"], "at least 4 MiB"),
    (["--buffer", "5000001"], "multiple of 128"),
    (["--buffer", "lots"], "not a size"),
    (["--checkpoint-interval", "0"], "checkpoint interval"),
])
def test_serve_refuses_bad_protection_settings_and_creates_nothing(tmp_path, args, message):
    (tmp_path / "a.img").write_bytes(bytes(MiB))
    proc = zcore("nbd", "serve", "--port", "0", "--journal", str(tmp_path / "j" / "vm1"),
                 "--protect", f"disk0={tmp_path / 'a.img'}", *args)
    assert proc.returncode == 2, proc.stderr
    assert args[0] in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "j").exists()


def zcore(*args: str) -> subprocess.CompletedProcess[str]:
    """`zcore ARGS` run to its end in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "zcore.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=OUTSIDE_SOURCE)


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_port_out_of_range_is_a_usage_error_not_a_traceback(tmp_path, port):
    (tmp_path / "a.img").write_bytes(bytes(MiB))
    proc = zcore("nbd", "serve", "--port", port, "--file", f"a={tmp_path / 'a.img'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "OverflowError" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--port" in errors[0] and "65535" in errors[0]


def test_protect_refuses_an_image_not_a_multiple_of_512_and_creates_nothing(tmp_path):
    image = tmp_path / "odd.img"
    image.write_bytes(bytes(MiB + 100))
    journal_dir = tmp_path / "journals" / "vm1"
    proc = zcore("nbd", "serve", "--port", "0", "--journal", str(journal_dir),
                 "--protect", f"disk0={image}")
    assert proc.returncode == 2
    assert str(image) in proc.stderr and str(MiB + 100) in proc.stderr
    assert "multiple of 512" in proc.stderr
    assert not (tmp_path / "journals").exists()


def test_unix_socket_in_a_missing_directory_names_the_path(tmp_path):
    (tmp_path / "a.img").write_bytes(bytes(MiB))
    sock = tmp_path / "nowhere" / "s.sock"
    proc = zcore("nbd", "serve", "--port", "0", "--file", f"a={tmp_path / 'a.img'}",
                 "--unix", str(sock))
    assert proc.returncode == 2
    assert str(sock) in proc.stderr and str(sock.parent) in proc.stderr
    assert "Traceback" not in proc.stderr


def _protect_once(image, journal_dir, write_at: str) -> int:
    """Serve `image` protected, write 64 KiB through NBD, stop: the final checkpoint id."""
    qemu_io = require_tool("qemu-io")
    served = Served("--journal", str(journal_dir), "--protect", f"disk0={image}", lines=1)
    try:
        run([qemu_io, "-f", "raw", "-c", f"write -P 0x5a {write_at} 64K", served.uris["disk0"]])
    finally:
        err = served.stop()
    return int(err.split("stopped at checkpoint ")[1].split()[0])


def test_checkpoint_ids_do_not_jump_by_the_seq_reserve_at_every_restart(tmp_path):
    nbdcopy = require_tool("nbdcopy")
    image = tmp_path / "disk0.img"
    image.write_bytes(os.urandom(MiB))
    journal_dir = tmp_path / "journals" / "vm1"
    first = _protect_once(image, journal_dir, "0")
    second = _protect_once(image, journal_dir, "64K")
    third = _protect_once(image, journal_dir, "128K")
    assert first < second < third < first + 100_000  # not 2^24 apart
    listing = zcore("nbd", "checkpoints", "--journal", str(journal_dir))
    assert listing.returncode == 0, listing.stderr
    ids = [int(line.split()[0]) for line in listing.stdout.splitlines()[1:]]
    assert {first, second, third} <= set(ids)
    assert ids == sorted(ids)
    served = Served("--journal", str(journal_dir), "--view", f"v=disk0@{second}", lines=1)
    try:  # the id shown is the id taken: the image as of the second stop
        assert f"checkpoint {second}" in served.descriptions["v"]
        run([nbdcopy, served.uris["v"], str(tmp_path / "v.raw")])
    finally:
        served.stop()
    data = (tmp_path / "v.raw").read_bytes()
    assert data[64 * 1024 : 128 * 1024] == b"\x5a" * (64 * 1024)
    assert data[128 * 1024 : 192 * 1024] != b"\x5a" * (64 * 1024)


def test_unknown_checkpoint_or_volume_lists_what_the_journal_holds(tmp_path):
    image = tmp_path / "disk0.img"
    image.write_bytes(os.urandom(MiB))
    journal_dir = tmp_path / "journals" / "vm1"
    last = _protect_once(image, journal_dir, "0")
    proc = zcore("nbd", "serve", "--port", "0", "--journal", str(journal_dir),
                 "--view", f"v=disk0@{last + 12345}")
    assert proc.returncode == 1
    assert f"checkpoint {last + 12345} is not in journal" in proc.stderr
    assert "the newest:" in proc.stderr and str(last) in proc.stderr
    assert "stopped" in proc.stderr  # the final checkpoint's tag
    proc = zcore("nbd", "serve", "--port", "0", "--journal", str(journal_dir),
                 "--view", "v=disk9")
    assert proc.returncode == 1
    assert "no volume 'disk9'" in proc.stderr and "disk0 (id 0)" in proc.stderr
    proc = zcore("nbd", "serve", "--port", "0", "--journal", str(journal_dir),
                 "--view", "v=disk0@yesterday")
    assert proc.returncode == 2 and "'latest' or 'tag:TEXT'" in proc.stderr


def test_a_failed_start_leaves_no_journal_or_vpg_state_behind(tmp_path):
    image = tmp_path / "disk0.img"
    image.write_bytes(os.urandom(MiB))
    journal_dir = tmp_path / "journals" / "vm1"
    # the view fails once the protection is already running: what it created goes again
    proc = zcore("nbd", "serve", "--port", "0", "--journal", str(journal_dir),
                 "--protect", f"disk0={image}", "--view", "v=disk0@99999999")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "journals").exists()
    with socket.socket() as busy:  # the port is taken: the listener fails last
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        proc = zcore("nbd", "serve", "--port", port, "--journal", str(journal_dir),
                     "--vpg-state", str(tmp_path / "state" / "vpg1"),
                     "--protect", f"disk0={image}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "journals").exists() and not (tmp_path / "state").exists()
    # an existing journal is kept after a failed start
    _protect_once(image, journal_dir, "0")
    proc = zcore("nbd", "serve", "--port", "0", "--journal", str(journal_dir),
                 "--protect", f"disk0={image}", "--view", "v=disk0@99999999")
    assert proc.returncode == 1
    assert journal_dir.is_dir() and (tmp_path / "journals" / "vm1.vpg").is_dir()
