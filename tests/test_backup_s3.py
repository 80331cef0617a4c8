"""The object-store contract every backup repository store keeps (zcore.backup.repo,
zcore.backup.s3), run against a directory and an S3 endpoint, and a whole repository
(backups, restore, check, prune, retention locks) on S3.

The S3 endpoint is $ZCORE_S3_ENDPOINT when it is set (a Ceph RGW or MinIO for a real
check, with credentials from the usual AWS sources); otherwise the suite starts moto's
server mode itself: moto emulates the S3 API (object lock included) over HTTP in a thread,
so the suite always runs and never skips."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
from helpers.backup import FAST_N, SECRET, vpg_of
from helpers.nbd import build_journal

from zcore.backup import (
    DirectoryStore,
    Repository,
    Retention,
    RetentionLockError,
    check,
    forget,
    prune,
    restore,
    run_backup,
)
from zcore.backup import format as fmt
from zcore.backup.s3 import ENDPOINT_ENV, S3Store
from zcore.errors import StateError

MiB = 1 << 20


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        yield endpoint
        return
    from moto.server import ThreadedMotoServer  # emulates the S3 API (see the docstring)

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _bucket(endpoint: str, *, lock: bool = True) -> tuple[object, str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    name = f"zcore-test-{uuid.uuid4().hex[:12]}"
    if lock:
        client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    else:
        client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path):
    if request.param == "directory":
        return DirectoryStore(tmp_path / "repo", create=True)
    client, bucket = _bucket(request.getfixturevalue("s3_endpoint"))
    return S3Store(bucket, "repos/one", client=client)


def test_store_puts_gets_lists_and_deletes(store):
    store.put("chunks/ab/abc", b"one")
    store.put("chunks/cd/cde", b"two")
    store.put("chunks/ab/abc", b"three")  # replaced whole
    store.put("config", b"c")
    store.sync()
    assert store.get("chunks/ab/abc") == b"three"
    assert sorted(store.list("chunks/")) == ["chunks/ab/abc", "chunks/cd/cde"]
    assert store.exists("config") and not store.exists("nothing")
    with pytest.raises(FileNotFoundError):
        store.get("nothing")
    store.delete("chunks/ab/abc")
    store.delete("chunks/ab/abc")  # absent is fine
    store.sync()
    assert sorted(store.list("chunks/")) == ["chunks/cd/cde"]
    assert list(store.leftovers()) == []


def test_store_lock_only_extends_and_refuses_deletion_until_then(store):
    store.put("manifests/m", b"x")
    until = time.time() + 3600
    store.lock("manifests/m", until)
    store.lock("manifests/m", until - 600)  # never shortens
    assert abs(store.retain_until("manifests/m") - until) < 1.0
    with pytest.raises(RetentionLockError, match="locked until") as err:
        store.delete("manifests/m")
    assert abs(err.value.until - until) < 1.0
    assert store.get("manifests/m") == b"x"
    assert store.retain_until("unlocked") == 0.0


def test_store_writers_lock_is_exclusive(store):
    with store.writer(), pytest.raises(StateError, match="in use"):
        with store.writer():
            pass
    with store.writer():  # released
        pass


def test_s3_refuses_to_delete_a_locked_version_even_past_zcore(s3_endpoint):
    client, bucket = _bucket(s3_endpoint)
    store = S3Store(bucket, client=client)
    store.put("chunks/ab/x", b"data")
    store.lock("chunks/ab/x", time.time() + 3600)
    versions = client.list_object_versions(Bucket=bucket, Prefix="chunks/ab/x")["Versions"]
    with pytest.raises(Exception, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key="chunks/ab/x",
                             VersionId=versions[0]["VersionId"])
    assert store.get("chunks/ab/x") == b"data"


def test_s3_bucket_without_object_lock_refuses_a_lock(s3_endpoint):
    from zcore.errors import ConfigError

    client, bucket = _bucket(s3_endpoint, lock=False)
    store = S3Store(bucket, client=client)
    store.put("x", b"1")
    with pytest.raises(ConfigError, match="no object lock"):
        store.lock("x", time.time() + 60)


def test_repository_on_s3_backs_up_restores_checks_and_prunes(s3_endpoint, tmp_path):
    client, bucket = _bucket(s3_endpoint)
    journal, snaps = build_journal(tmp_path / "j", sizes=(1 * MiB, 256 * 1024), rounds=3,
                                   writes=20, promote_first=False)
    try:
        repo = Repository.init(S3Store(bucket, "r", client=client), SECRET,
                               chunk_size=1 << 16, scrypt_n=FAST_N)
        vpg = vpg_of(journal)
        locked = run_backup(repo, vpg, snaps[0][0], retain_until=time.time() + 3600).name
        names = [locked] + [run_backup(repo, vpg, c).name for c, _ in snaps[1:]]
        repo = Repository.open(S3Store(bucket, "r", client=client), SECRET)
        for name, (_, model) in zip(names, snaps, strict=True):
            out = tmp_path / name
            assert {p.stem: p.read_bytes() for p in restore(repo, name, out)} == model
        assert check(repo).ok
        with pytest.raises(RetentionLockError):
            forget(repo, locked)
        result = prune(repo, Retention(daily=0, weekly=0, monthly=0, last=1))
        assert result.deleted == [names[1]] and list(result.locked) == [locked]
        assert repo.backup_names() == [locked, names[2]]
        report = check(repo)
        assert report.ok and report.unreferenced == 0
        cid = next(c for vm in repo.manifest(locked)["vms"] for v in vm["volumes"]
                   for c in v["chunks"] if c)
        assert repo.store.retain_until(fmt.chunk_name(cid)) > time.time()
    finally:
        journal.close()
