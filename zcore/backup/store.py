"""The backup repository (docs/format.md 10d): `config` and keys, chunks, manifests, the
index, over an object store (repo.py).  Backups and restores (engine.py) and prune,
garbage collection and check (prune.py) work through it; every byte it returns has been
decrypted and verified (format.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zcore._native import record
from zcore.backup import crypto
from zcore.backup import format as fmt
from zcore.backup.errors import ChunkDamagedError, ChunkMissingError
from zcore.backup.repo import DirectoryStore, ObjectStore
from zcore.errors import ConfigError, CorruptRecordError, FormatVersionError


@dataclass(frozen=True)
class BackupInfo:
    """One backup as the index lists it (docs/format.md 10d.5)."""

    name: str
    vpg: str
    checkpoint: dict[str, Any]
    time_ns: int
    retain_until: float
    mode: str
    chunks: int

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> BackupInfo:
        return cls(m["backup"], m["vpg"], m["checkpoint"], m["time_ns"],
                   float(m["retain_until"]), m["mode"], m["stats"]["chunks"])

    def summary(self) -> dict[str, Any]:
        return {"vpg": self.vpg, "checkpoint": self.checkpoint, "time_ns": self.time_ns,
                "retain_until": self.retain_until, "mode": self.mode, "chunks": self.chunks}


def _crc(meta: dict[str, Any]) -> int:
    """The CRC32C of a checked state file's canonical JSON (docs/format.md 7.2)."""
    return int(record.crc32c(json.dumps(meta, sort_keys=True).encode()))


def _state_bytes(meta: dict[str, Any], name: str, version: int) -> bytes:
    meta = {**meta, "format": name, "version": version}
    return json.dumps({"meta": meta, "crc32c": _crc(meta)}).encode()


def _read_state_bytes(raw: bytes, what: str, name: str, version: int) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        meta, crc = doc["meta"], doc["crc32c"]
        if not isinstance(meta, dict) or type(crc) is not int:
            raise TypeError("meta must be an object and crc32c an integer")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptRecordError(f"{what} is unreadable: {exc}") from None
    if _crc(meta) != crc:
        raise CorruptRecordError(f"{what} fails its checksum")
    if meta.get("format") != name:
        raise CorruptRecordError(f"{what} is not a {name} file")
    if meta.get("version") != version:
        raise FormatVersionError(f"{what}: {name} format version {meta.get('version')!r} "
                                 f"is not supported (this build reads {version})")
    return meta


class Repository:
    """An open backup repository.  Reads need no lock; `writer()` holds the writers' lock
    for a backup or a prune (one at a time)."""

    def __init__(self, store: ObjectStore, config: dict[str, Any], keys: crypto.Keys) -> None:
        self.store = store
        self.config = config
        self.keys = keys
        self.repo_id: str = config["repo_id"]
        self.chunk_size: int = int(config["chunk_size"])

    # ---- creating and opening ------------------------------------------------------------

    @classmethod
    def init(cls, where: str | os.PathLike[str] | ObjectStore, secret: crypto.Secret, *,
             chunk_size: int = fmt.DEFAULT_CHUNK,
             scrypt_n: int = crypto.DEFAULT_SCRYPT_N) -> Repository:
        """Create a repository (a directory path, or any object store) and open it."""
        store = _store(where, create=True)
        if store.exists("config"):
            raise ConfigError(f"{where} already holds a backup repository")
        if not fmt.MIN_CHUNK <= chunk_size <= fmt.MAX_CHUNK or chunk_size & (chunk_size - 1):
            raise ConfigError(f"chunk size {chunk_size} is not a power of two from "
                              f"{fmt.MIN_CHUNK} to {fmt.MAX_CHUNK}")
        repo_id = os.urandom(16).hex()
        kdf = crypto.new_kdf(secret, scrypt_n)
        master = os.urandom(64)
        config = {"repo_id": repo_id, "chunk_size": chunk_size, "kdf": kdf,
                  "key": crypto.wrap(secret, kdf, repo_id, master), "compression": "lz4"}
        store.put("config", _state_bytes(config, fmt.REPO_FORMAT, fmt.REPO_VERSION))
        store.sync()
        return cls(store, config, crypto.Keys(master))

    @classmethod
    def open(cls, where: str | os.PathLike[str] | ObjectStore,
             secret: crypto.Secret) -> Repository:
        """Open a repository: its config read and checked, its key unwrapped
        (WrongKeyError for a wrong passphrase or key file; nothing is written)."""
        store = _store(where, create=False)
        try:
            raw = store.get("config")
        except FileNotFoundError:
            raise ConfigError(f"{where} holds no backup repository (no config)") from None
        config = _read_state_bytes(raw, f"repository config of {where}", fmt.REPO_FORMAT,
                                   fmt.REPO_VERSION)
        try:
            repo_id, size = str(config["repo_id"]), int(config["chunk_size"])
            kdf, wrapped = config["kdf"], config["key"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptRecordError(f"repository config of {where} lacks {exc}") from None
        if not fmt.MIN_CHUNK <= size <= fmt.MAX_CHUNK or not isinstance(kdf, dict):
            raise CorruptRecordError(f"repository config of {where}: chunk size {size}")
        return cls(store, config, crypto.unwrap(secret, kdf, repo_id, wrapped))

    @contextmanager
    def writer(self) -> Iterator[None]:
        """The writers' lock; an unfinished garbage collection is finished first."""
        with self.store.writer():
            if self.store.exists("gc-plan"):
                from zcore.backup.prune import finish_gc
                finish_gc(self)
            yield

    # ---- chunks ----------------------------------------------------------------------------

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        return self.keys.chunk_id(data)

    def has_chunk(self, chunk_id: str) -> bool:
        return self.store.exists(fmt.chunk_name(chunk_id))

    def put_chunk(self, chunk_id: str, data: bytes | bytearray | memoryview, *,
                  replace: bool = False) -> int:
        """Seal and store chunk `chunk_id` (the id of `data`); returns the bytes stored.
        `replace`: a damaged copy is being rewritten; its retain-until carries over."""
        name = fmt.chunk_name(chunk_id)
        sealed = fmt.seal(self.keys.aead, fmt.CHUNK_MAGIC, name, data)
        until = self.store.retain_until(name) if replace else 0.0
        self.store.put(name, sealed)
        if until:
            self.store.lock(name, until)
        return len(sealed)

    def get_chunk(self, chunk_id: str) -> bytes:
        """The verified plain bytes of a chunk: ChunkMissingError or ChunkDamagedError."""
        name = fmt.chunk_name(chunk_id)
        # a store that reads into a reused buffer (DirectoryStore.get_view) spares a fresh
        # one per chunk; the plain bytes returned never share it
        get = getattr(self.store, "get_view", None) or self.store.get
        try:
            raw = get(name)
        except FileNotFoundError:
            raise ChunkMissingError(f"chunk {chunk_id} is missing from the repository",
                                    name) from None
        plain = fmt.unseal(self.keys.aead, fmt.CHUNK_MAGIC, name, raw, self.chunk_size)
        if self.keys.chunk_id(plain) != chunk_id:
            raise ChunkDamagedError(f"chunk {chunk_id}: its bytes do not hash to its id",
                                    name)
        return plain

    def chunk_ids(self) -> Iterator[str]:
        for name in self.store.list("chunks/"):
            cid = name.rsplit("/", 1)[-1]
            if fmt.is_chunk_id(cid):
                yield cid

    # ---- manifests and the index ---------------------------------------------------------

    def put_manifest(self, manifest: dict[str, Any]) -> None:
        name = fmt.manifest_name(manifest["backup"])
        body = fmt.encode_doc(fmt.MANIFEST_FORMAT, fmt.MANIFEST_VERSION, manifest)
        self.store.put(name, fmt.seal(self.keys.aead, fmt.MANIFEST_MAGIC, name, body))

    def manifest(self, backup: str) -> dict[str, Any]:
        """The verified manifest of `backup` (ConfigError when there is none)."""
        if not fmt.is_backup_name(backup):
            raise ConfigError(f"{backup!r} is not a backup name (b- and 24 hex digits)")
        name = fmt.manifest_name(backup)
        try:
            raw = self.store.get(name)
        except FileNotFoundError:
            raise ConfigError(f"no backup {backup} in the repository") from None
        plain = fmt.unseal(self.keys.aead, fmt.MANIFEST_MAGIC, name, raw, fmt.MAX_BODY)
        doc = fmt.decode_doc(name, fmt.MANIFEST_FORMAT, fmt.MANIFEST_VERSION, plain)
        _check_manifest(name, doc, self.repo_id, backup)
        return doc

    def backup_names(self) -> list[str]:
        """Every backup's name, oldest first (the manifests listed)."""
        names = [n.rsplit("/", 1)[-1] for n in self.store.list("manifests/")]
        return sorted(n for n in names if fmt.is_backup_name(n))

    def backups(self) -> list[BackupInfo]:
        """Every backup, oldest first, from the index when it matches the manifests, else
        from the manifests (and the index rewritten when a writer holds the lock)."""
        names = self.backup_names()
        index = self.read_index()
        if index is not None and sorted(index) == names:
            try:
                return [BackupInfo(n, **index[n]) for n in names]
            except TypeError:  # summaries of another shape: read the manifests
                pass
        return [BackupInfo.from_manifest(self.manifest(n)) for n in names]

    def read_index(self) -> dict[str, dict[str, Any]] | None:
        """The index's summaries, or None when it is missing or damaged (a cache)."""
        try:
            raw = self.store.get("index")
            plain = fmt.unseal(self.keys.aead, fmt.INDEX_MAGIC, "index", raw, fmt.MAX_BODY)
            doc = fmt.decode_doc("index", fmt.INDEX_FORMAT, fmt.INDEX_VERSION, plain)
            backups = doc["backups"]
            if not isinstance(backups, dict):
                return None
            return backups
        except (FileNotFoundError, CorruptRecordError, KeyError):
            return None

    def write_index(self) -> None:
        """Rebuild the index from the manifests (under the writers' lock)."""
        summaries = {n: BackupInfo.from_manifest(self.manifest(n)).summary()
                     for n in self.backup_names()}
        body = fmt.encode_doc(fmt.INDEX_FORMAT, fmt.INDEX_VERSION, {"backups": summaries})
        self.store.put("index", fmt.seal(self.keys.aead, fmt.INDEX_MAGIC, "index", body))
        self.store.sync()


def _store(where: str | os.PathLike[str] | ObjectStore, *, create: bool) -> ObjectStore:
    if isinstance(where, str) and where.startswith("s3://"):
        from zcore.backup.s3 import S3Store
        return S3Store.from_url(where)
    if isinstance(where, str | os.PathLike):
        return DirectoryStore(Path(where), create=create)
    return where


def _check_manifest(name: str, doc: dict[str, Any], repo_id: str, backup: str) -> None:
    """Every field a reader relies on, of the type it relies on (10d.4)."""
    try:
        ok = (doc["backup"] == backup and isinstance(doc["vpg"], str)
              and isinstance(doc["checkpoint"], dict) and isinstance(doc["time_ns"], int)
              and isinstance(doc["retain_until"], int | float) and isinstance(doc["vms"], list)
              and isinstance(doc["chunk_size"], int) and isinstance(doc["stats"], dict))
        if ok and doc["repo_id"] != repo_id:
            raise ChunkDamagedError(f"{name} belongs to another repository "
                                    f"({doc['repo_id']})", name)
        size = doc["chunk_size"]
        for vm in doc["vms"]:
            for vol in vm["volumes"]:
                n = -(-int(vol["size"]) // size)
                chunks = vol["chunks"]
                ok = ok and isinstance(vm["name"], str) and isinstance(vol["name"], str) \
                    and isinstance(vol["id"], int) and isinstance(chunks, list) \
                    and len(chunks) == n and all(
                        c is None or (isinstance(c, str) and fmt.is_chunk_id(c))
                        for c in chunks)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        ok = False
    if not ok:
        raise ChunkDamagedError(f"{name}: manifest fields are missing or malformed", name)

