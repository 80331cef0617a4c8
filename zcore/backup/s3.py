"""An S3-compatible object store for backup repositories (AWS S3, Ceph RGW, MinIO...):
the same objects and bytes as a directory (docs/format.md 10d.1) under a key prefix.

Immutability is S3 Object Lock: on a bucket created with object lock (which turns on
versioning), `lock` sets an object's retention in COMPLIANCE mode (nobody, root included,
can delete that version or shorten its retention before then) and only ever extends it;
`delete` removes every version of a key, so a locked one refuses (RetentionLockError).  A
bucket without object lock keeps retain-until nowhere: `lock` is refused (ConfigError) and
only zcore's manifest locks hold.

Durability: a PUT is durable once S3 acknowledges it; `sync` has nothing to do.  The
writers' lock is an object `lock` created with a conditional PUT (If-None-Match: *) and
deleted at the end; one older than `stale_after` seconds (a crashed writer) is broken.
Credentials come from the usual AWS sources (environment, config files, instance roles);
`endpoint` (or $ZCORE_S3_ENDPOINT) points at a non-AWS service."""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from zcore.backup.errors import RetentionLockError
from zcore.errors import ConfigError, StateError

ENDPOINT_ENV = "ZCORE_S3_ENDPOINT"
STALE_AFTER_S = 24 * 3600.0  # a writers' lock this old was left by a crashed writer


def _code(exc: Exception) -> str:
    response: Any = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store:
    """Objects as keys `prefix + name` of `bucket`."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 client: Any = None, stale_after: float = STALE_AFTER_S) -> None:
        if client is None:
            import boto3
            client = boto3.client("s3", endpoint_url=endpoint or os.environ.get(ENDPOINT_ENV))
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.stale_after = stale_after

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        """`s3://bucket/prefix` (the endpoint from $ZCORE_S3_ENDPOINT, if set)."""
        if not url.startswith("s3://") or len(url) <= 5:
            raise ConfigError(f"{url!r} is not an s3://bucket/prefix URL")
        bucket, _, prefix = url[5:].partition("/")
        return cls(bucket, prefix)

    def _key(self, name: str) -> str:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ConfigError(f"bad object name {name!r}")
        return self.prefix + name

    def put(self, name: str, data: bytes | bytearray) -> None:
        body = data if isinstance(data, bytes) else bytes(data)
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=body)

    def get(self, name: str) -> bytes:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"s3://{self.bucket}/{self._key(name)}") from None
            raise
        data: bytes = r["Body"].read()
        return data

    def _head(self, name: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket,
                                                           Key=self._key(name))
            return head
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def list(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix))
        for page in pages:
            for item in page.get("Contents", []):
                yield str(item["Key"])[len(self.prefix):]

    def delete(self, name: str) -> None:
        key = self._key(name)
        until = self.retain_until(name)
        if until > time.time():
            raise RetentionLockError(f"{name} is locked until {_when(until)}", until)
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=key)
        versions = [v for page in pages
                    for v in (*page.get("Versions", []), *page.get("DeleteMarkers", []))
                    if v["Key"] == key]
        if not versions:  # an unversioned bucket
            self.client.delete_object(Bucket=self.bucket, Key=key)
        for v in versions:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key,
                                          VersionId=v["VersionId"])
            except Exception as exc:
                if _code(exc) == "AccessDenied":
                    raise RetentionLockError(f"{name}: S3 refuses to delete a locked "
                                             f"version ({exc})") from None
                raise

    def lock(self, name: str, until: float) -> None:
        if until <= self.retain_until(name):
            return
        when = datetime.datetime.fromtimestamp(until, datetime.UTC)
        try:
            self.client.put_object_retention(
                Bucket=self.bucket, Key=self._key(name),
                Retention={"Mode": "COMPLIANCE", "RetainUntilDate": when})
        except Exception as exc:
            if _code(exc) in ("InvalidRequest", "ObjectLockConfigurationNotFoundError"):
                raise ConfigError(f"bucket {self.bucket} has no object lock: create it with "
                                  f"object lock enabled to lock backups") from None
            raise

    def retain_until(self, name: str) -> float:
        head = self._head(name)
        when = None if head is None else head.get("ObjectLockRetainUntilDate")
        if when is None:
            return 0.0
        t = float(when.timestamp())
        return t if t > time.time() else 0.0

    def sync(self) -> None:
        pass

    @contextmanager
    def writer(self) -> Iterator[None]:
        key = self._key("lock")
        body = json.dumps({"time": time.time(), "pid": os.getpid()}).encode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except Exception as exc:
            if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            if not self._stale():
                raise StateError(f"backup repository s3://{self.bucket}/{self.prefix} is in "
                                 f"use by another backup or prune; try again when it ends"
                                 ) from None
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
        try:
            yield
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def _stale(self) -> bool:
        try:
            held = json.loads(self.get("lock"))
            return bool(time.time() - float(held["time"]) > self.stale_after)
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return True

    def leftovers(self) -> Iterator[str]:
        return iter(())  # PUTs are atomic: no partial objects

    def remove_leftover(self, name: str) -> None:
        pass


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
