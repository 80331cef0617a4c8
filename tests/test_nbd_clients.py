"""Real NBD clients against zcore's server: qemu-io, qemu-img, fio's nbd engine, nbdinfo
and nbdcopy, over every export kind.  Protected volumes run in a VPG whose stream is fed
in-process (LocalLink) to a journal, so "what the backing store holds" and "what the
captured stream says" can be compared byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool
from helpers.nbd import VOLUME, MiB, Protected, build_journal, run, serving, write_tls_files

from zcore import nbd
from zcore.errors import ConfigError
from zcore.nbd import TLSConfig


@pytest.fixture
def protected(tmp_path):
    p = Protected(tmp_path)
    yield p
    p.close()


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---- qemu-io -------------------------------------------------------------------------------


def test_qemu_io_patterns_through_a_protected_volume_are_captured_as_written(tmp_path,
                                                                            protected):
    qemu_io = require_tool("qemu-io")
    with serving([nbd.volume_export(protected.volume)], tmp_path) as srv:
        commands = [
            "write -P 0x5a 0 1M",
            "write -P 0xa5 1536 3584",  # sector-aligned, not block-aligned
            "writev -P 0x11 4M 64k 4k 128k",
            "write -z 2M 1M",  # NBD_CMD_WRITE_ZEROES
            "write -f -P 0x33 8M 64k",  # FUA
            "aio_write -P 0x44 12M 256k",
            "aio_write -P 0x45 12M 4k",
            "aio_flush",
            "write -P 0x66 31M 1M",  # up to the last byte
            "flush",
            "read -P 0x5a 0 1536",
            "read -P 0xa5 1536 3584",
            "read -P 0x11 4M 64k",
            "read -P 0 2M 1M",
            "read -P 0x33 8M 64k",
            "read -P 0x66 31M 1M",
        ]
        args = [qemu_io, "-f", "raw"]
        for command in commands:
            args += ["-c", command]
        out = run([*args, srv.uri("disk0")]).stdout
        assert "failed" not in out.lower(), out
        # the same tool fails when a pattern does not match: the check above can fail
        bad = subprocess.run([qemu_io, "-f", "raw", "-c", "read -P 0x5b 0 512",
                              srv.uri("disk0")], capture_output=True, text=True)
        assert bad.returncode != 0 and "Pattern verification failed" in bad.stdout
        # the unix socket URI serves the same volume
        run([qemu_io, "-f", "raw", "-c", "read -P 0x66 31M 1M", srv.uri("disk0", 1)])
    seq = protected.checkpoint("after qemu-io")
    backing = protected.path.read_bytes()
    assert backing[1536:5120] == b"\xa5" * 3584
    assert backing[12 * MiB : 12 * MiB + 4096] in (b"\x44" * 4096, b"\x45" * 4096)
    assert protected.captured(seq) == backing
    assert protected.journal.status().records > 0


# ---- qemu-img ------------------------------------------------------------------------------


def test_qemu_img_convert_of_a_point_in_time_export_equals_the_model(tmp_path):
    qemu_img = require_tool("qemu-img")
    journal, snapshots = build_journal(tmp_path / "j", sizes=(8 * MiB, 4 * MiB), rounds=3)
    try:
        exports = [nbd.view_export(journal, ckpt, "disk0", f"r{i}")
                   for i, (ckpt, _) in enumerate(snapshots)]
        with serving(exports, tmp_path) as srv:
            for i, (_, images) in enumerate(snapshots):
                model = tmp_path / f"model{i}.raw"
                model.write_bytes(images["disk0"])
                out = tmp_path / f"r{i}.qcow2"
                run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", srv.uri(f"r{i}"),
                     str(out)])
                run([qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(out), str(model)])
            # and compare notices a difference: the last image is not the first model
            differ = subprocess.run([qemu_img, "compare", "-f", "qcow2", "-F", "raw",
                                     str(tmp_path / "r2.qcow2"), str(tmp_path / "model0.raw")],
                                    capture_output=True, text=True)
            assert differ.returncode == 1, differ.stdout + differ.stderr
    finally:
        journal.close()


def test_qemu_img_convert_of_a_captured_checkpoint_equals_the_disk_at_that_moment(tmp_path,
                                                                                  protected):
    qemu_io, qemu_img = require_tool("qemu-io"), require_tool("qemu-img")
    with serving([nbd.volume_export(protected.volume)], tmp_path) as srv:
        run([qemu_io, "-f", "raw", "-c", "write -P 0x21 0 4M", "-c", "write -P 0x22 20M 3M",
             srv.uri("disk0")])
        seq = protected.checkpoint("before")
        moment = tmp_path / "moment.raw"
        shutil.copyfile(protected.path, moment)
        run([qemu_io, "-f", "raw", "-c", "write -P 0x23 1M 8M", srv.uri("disk0")])
        protected.checkpoint("after")
        srv.call(srv.server.add_export, nbd.view_export(protected.journal, seq, "disk0", "pit"))
        out = tmp_path / "pit.qcow2"
        run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", srv.uri("pit"), str(out)])
    run([qemu_img, "compare", "-f", "qcow2", "-F", "raw", str(out), str(moment)])


# ---- fio -----------------------------------------------------------------------------------


def fio_job(fio: str, uri: str, *extra: str) -> list[str]:
    return [fio, "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--offset=4M", "--size=16M", "--iodepth=16", "--verify=crc32c",
            "--verify_fatal=1", "--randseed=7", *extra]


def test_fio_random_writes_verify_live_and_at_the_checkpoint(tmp_path, protected):
    fio = require_tool("fio")
    with serving([nbd.volume_export(protected.volume)], tmp_path) as srv:
        before = protected.checkpoint("before fio")
        run(fio_job(fio, srv.uri("disk0")), cwd=tmp_path)  # fio leaves state files
        seq = protected.checkpoint("after fio")
        srv.call(srv.server.add_export, nbd.view_export(protected.journal, seq, "disk0", "pit"))
        srv.call(srv.server.add_export,
                 nbd.view_export(protected.journal, before, "disk0", "old"))
        run(fio_job(fio, srv.uri("pit"), "--verify_only"), cwd=tmp_path)
        # the same verification fails on the checkpoint taken before fio wrote
        stale = subprocess.run(fio_job(fio, srv.uri("old"), "--verify_only"),
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert stale.returncode != 0


# ---- nbdinfo and nbdcopy over every export kind ----------------------------------------


def nbdinfo_json(nbdinfo: str, uri: str) -> dict:
    return json.loads(run([nbdinfo, "--json", uri]).stdout)["exports"][0]


def test_nbdinfo_and_nbdcopy_on_every_export_kind(tmp_path, protected):
    nbdinfo, nbdcopy = require_tool("nbdinfo"), require_tool("nbdcopy")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(VOLUME))
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(VOLUME))
    with serving([nbd.volume_export(protected.volume), nbd.file_export(plain, "plain")],
                 tmp_path) as srv:
        # into a protected volume, and back out of it
        run([nbdcopy, str(src), srv.uri("disk0")])
        run([nbdcopy, str(src), srv.uri("plain", 1)])
        seq = protected.checkpoint("copied")
        srv.call(srv.server.add_export, nbd.view_export(protected.journal, seq, "disk0", "pit"))
        srv.call(srv.server.add_export, nbd.scratch_export(protected.journal, seq, "disk0",
                                                           "scratch", limit_bytes=VOLUME))
        expect = {"disk0": False, "plain": False, "pit": True, "scratch": False}
        for name, read_only in expect.items():
            info = nbdinfo_json(nbdinfo, srv.uri(name))
            assert info["export-size"] == VOLUME
            assert info["is_read_only"] is read_only
            assert info["block_size_minimum"] == 512
            assert info["can_multi_conn"] is True
            out = tmp_path / f"{name}.out"
            run([nbdcopy, srv.uri(name), str(out)])
            assert out.read_bytes() == src.read_bytes(), name
        assert nbdinfo_json(nbdinfo, srv.uri("scratch"))["can_trim"] is True
        assert protected.path.read_bytes() == src.read_bytes()
        assert protected.captured(seq) == src.read_bytes()
        listed = run([nbdinfo, "--list", "--json", srv.uri("disk0")]).stdout
        assert {e["export-name"] for e in json.loads(listed)["exports"]} == set(expect)


def test_scratch_overlay_takes_writes_and_leaves_journal_and_replica_untouched(tmp_path):
    nbdcopy, nbdinfo = require_tool("nbdcopy"), require_tool("nbdinfo")
    qemu_io = require_tool("qemu-io")
    journal, snapshots = build_journal(tmp_path / "j", sizes=(8 * MiB,), rounds=2)
    ckpt, images = snapshots[-1]
    journal.close()
    before = tree_digest(tmp_path / "j")
    from zcore.journal import Journal

    journal = Journal.open(tmp_path / "j")
    try:
        new = os.urandom(8 * MiB)
        (tmp_path / "new.raw").write_bytes(new)
        scratch = nbd.scratch_export(journal, ckpt, "disk0", "s", limit_bytes=8 * MiB)
        with serving([scratch], tmp_path) as srv:
            assert nbdinfo_json(nbdinfo, srv.uri("s"))["is_read_only"] is False
            run([nbdcopy, str(tmp_path / "new.raw"), srv.uri("s")])
            run([qemu_io, "-f", "raw", "-c", "write -z 1M 1M", "-c", "discard 3M 1M",
                 srv.uri("s")])
            run([nbdcopy, srv.uri("s"), str(tmp_path / "back.raw")])
            back = (tmp_path / "back.raw").read_bytes()
            assert back[: MiB] == new[: MiB]
            assert back[MiB : 2 * MiB] == bytes(MiB)
            assert back[3 * MiB : 4 * MiB] == images["disk0"][3 * MiB : 4 * MiB]  # trimmed
            assert back[4 * MiB :] == new[4 * MiB :]
        # the server closed the overlay: the view reads as the checkpoint again
        with journal.view(ckpt) as v:
            assert v.read("disk0", 0, 8 * MiB) == images["disk0"]
    finally:
        journal.close()
    assert tree_digest(tmp_path / "j") == before


# ---- TLS with real clients -----------------------------------------------------------------


def test_tls_exports_work_with_libnbd_and_qemu_and_refuse_plain_clients(tmp_path):
    nbdinfo, nbdcopy = require_tool("nbdinfo"), require_tool("nbdcopy")
    qemu_img = require_tool("qemu-img")
    tls_dir = tmp_path / "tls"
    write_tls_files(tls_dir)
    tls = TLSConfig(str(tls_dir / "server-cert.pem"), str(tls_dir / "server-key.pem"),
                    ca=str(tls_dir / "ca-cert.pem"))
    data = os.urandom(4 * MiB)
    (tmp_path / "d.raw").write_bytes(data)
    with serving([nbd.file_export(tmp_path / "d.raw", "d")], tmp_path, tls=tls) as srv:
        uri = srv.uri("d")
        assert uri.startswith("nbds://127.0.0.1:")
        secured = f"{uri}?tls-certificates={tls_dir}"
        info = nbdinfo_json(nbdinfo, secured)
        assert info["export-size"] == 4 * MiB
        run([nbdcopy, secured, str(tmp_path / "out.raw")])
        assert (tmp_path / "out.raw").read_bytes() == data
        host, port = srv.address
        run([qemu_img, "info", "--object",
             f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=client", "--image-opts",
             f"driver=nbd,host={host},port={port},export=d,tls-creds=tls0"])
        plain = subprocess.run([nbdinfo, uri.replace("nbds://", "nbd://")],
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0


def test_tls_with_the_site_identity_used_for_replication(tmp_path):
    qemu_img = require_tool("qemu-img")
    from zcore.security import SERVER_NAME, SiteIdentity

    identity = SiteIdentity.load_or_create(tmp_path / "site", "recovery")
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    shutil.copyfile(identity.cert_path, client_dir / "ca-cert.pem")
    (tmp_path / "d.raw").write_bytes(bytes(MiB))
    tls = TLSConfig.from_site(tmp_path / "site")
    with serving([nbd.file_export(tmp_path / "d.raw", "d")], tmp_path, tls=tls) as srv:
        host, port = srv.address
        out = run([qemu_img, "info", "--output=json", "--object",
                   f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client", "--image-opts",
                   f"driver=nbd,host={host},port={port},export=d,tls-creds=tls0,"
                   f"tls-hostname={SERVER_NAME}"]).stdout
        assert json.loads(out)["virtual-size"] == MiB
        wrong = subprocess.run([qemu_img, "info", "--object",
                                f"tls-creds-x509,id=tls0,dir={client_dir},endpoint=client",
                                "--image-opts",
                                f"driver=nbd,host={host},port={port},export=d,tls-creds=tls0,"
                                "tls-hostname=someone-else"], capture_output=True, text=True)
        assert wrong.returncode != 0
    with pytest.raises(ConfigError, match="no site identity"):
        TLSConfig.from_site(tmp_path / "client")
