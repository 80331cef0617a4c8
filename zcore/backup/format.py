"""The bytes of the backup repository (docs/format.md 10d): sealed objects (48-byte header,
LZ4, AES-256-GCM with the header and the object's name as associated data), chunk names,
manifest and index bodies.  Pure functions over bytes; the keys come from crypto.py and
the objects go to an object store (repo.py) through the repository (store.py)."""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any

import lz4.block
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zcore.backup.errors import ChunkDamagedError
from zcore.errors import FormatVersionError

CHUNK_MAGIC = b"ZCBCHK\r\n"
MANIFEST_MAGIC = b"ZCBMAN\r\n"
INDEX_MAGIC = b"ZCBIDX\r\n"
SEALED_VERSION = 1
HEADER = struct.Struct("<8sIB3xII12s12x")
assert HEADER.size == 48
TAG = 16
COMP_STORED = 0
COMP_LZ4 = 1

MIN_CHUNK = 1 << 16
MAX_CHUNK = 1 << 24
DEFAULT_CHUNK = 1 << 20  # 1 MiB: incremental granularity vs per-object cost (10d.2)
MAX_BODY = 1 << 28  # manifests and the index: 256 MiB of JSON at most

REPO_FORMAT = "zcore-backup-repo"
REPO_VERSION = 1
MANIFEST_FORMAT = "zcore-backup-manifest"
MANIFEST_VERSION = 1
INDEX_FORMAT = "zcore-backup-index"
INDEX_VERSION = 1
GC_FORMAT = "zcore-backup-gc"
GC_VERSION = 1


def chunk_name(chunk_id: str) -> str:
    """The object name of chunk `chunk_id` (64 hex digits)."""
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def manifest_name(backup: str) -> str:
    return f"manifests/{backup}"


def new_backup_name(time_ns: int) -> str:
    """`b-` + 16 hex of the start time + 8 random hex: names sort by time (10d.1)."""
    return f"b-{time_ns:016x}{os.urandom(4).hex()}"


def is_backup_name(name: str) -> bool:
    return (len(name) == 26 and name.startswith("b-")
            and all(c in "0123456789abcdef" for c in name[2:]))


def is_chunk_id(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def _bound(plain: int) -> int:
    return plain + plain // 255 + 16


def seal(aead: AESGCM, magic: bytes, name: str, plain: bytes | bytearray | memoryview
         ) -> bytearray:
    """The sealed object `name` holding `plain` (10d.3), built in one buffer: the header,
    then the body encrypted straight after it (no copy of the body or the ciphertext)."""
    body: bytes | bytearray | memoryview = plain
    comp = COMP_STORED
    packed = lz4.block.compress(plain, store_size=False)
    if len(packed) < len(plain):
        body, comp = packed, COMP_LZ4
    nonce = os.urandom(12)
    n = len(memoryview(body).cast("B"))
    head = HEADER.pack(magic, SEALED_VERSION, comp, len(plain), n, nonce)
    out = bytearray(HEADER.size + n + TAG)
    out[:HEADER.size] = head
    aead.encrypt_into(nonce, body, head + name.encode(), memoryview(out)[HEADER.size:])
    return out


_local = threading.local()


def _scratch(n: int) -> memoryview:
    """This thread's scratch buffer, `n` bytes of it (grown as needed, never shrunk): a
    fresh megabyte per chunk costs page faults and zeroing in the kernel each time."""
    if n > MAX_CHUNK + MAX_CHUNK // 255 + 16:  # a big manifest or index: not kept
        return memoryview(bytearray(n))
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = bytearray(max(n, DEFAULT_CHUNK))
    return memoryview(buf)[:n]


def unseal(aead: AESGCM, magic: bytes, name: str, data: bytes | memoryview,
           limit: int) -> bytes:
    """The plain bytes of the sealed object `name`, every rule of 10d.3 checked; at most
    `limit` plain bytes.  ChunkDamagedError (or FormatVersionError) otherwise."""
    if len(data) < HEADER.size + TAG:
        raise ChunkDamagedError(f"{name}: {len(data)} bytes, shorter than a sealed object",
                                name)
    got_magic, version, comp, plain_len, stored, nonce = HEADER.unpack_from(data)
    if got_magic != magic:
        raise ChunkDamagedError(f"{name}: bad magic {got_magic!r}", name)
    if version != SEALED_VERSION:
        raise FormatVersionError(f"{name}: sealed object version {version} is not "
                                 f"supported (this build reads {SEALED_VERSION})")
    if data[13:16] != b"\0\0\0" or data[36:48] != bytes(12) or comp not in (0, 1):
        raise ChunkDamagedError(f"{name}: reserved bytes or compression {comp} invalid",
                                name)
    if not 0 < plain_len <= limit or stored > _bound(plain_len) or \
            len(data) != HEADER.size + stored + TAG or (comp == 0 and stored != plain_len):
        raise ChunkDamagedError(f"{name}: lengths (plain {plain_len}, stored {stored}, "
                                f"object {len(data)}) are inconsistent", name)
    ad = bytes(data[:HEADER.size]) + name.encode()
    try:
        if comp == COMP_STORED:
            return aead.decrypt(nonce, memoryview(data)[HEADER.size:], ad)
        body = _scratch(stored)  # decrypted only to be decompressed: no fresh buffer
        aead.decrypt_into(nonce, memoryview(data)[HEADER.size:], ad, body)
    except InvalidTag:
        raise ChunkDamagedError(f"{name}: fails its authentication tag (damaged, or "
                                f"sealed under another key)", name) from None
    try:
        plain: bytes = lz4.block.decompress(body, uncompressed_size=plain_len)
    except lz4.block.LZ4BlockError:
        raise ChunkDamagedError(f"{name}: LZ4 body fails to decode", name) from None
    if len(plain) != plain_len:
        raise ChunkDamagedError(f"{name}: decodes to {len(plain)} bytes, not {plain_len}",
                                name)
    return plain


def encode_doc(fmt: str, version: int, doc: dict[str, Any]) -> bytes:
    return json.dumps({**doc, "format": fmt, "version": version},
                      sort_keys=True, separators=(",", ":")).encode()


def decode_doc(name: str, fmt: str, version: int, plain: bytes) -> dict[str, Any]:
    """A manifest or index body: JSON of the format and version named (10d.4, 10d.5)."""
    try:
        doc = json.loads(plain)
    except (ValueError, RecursionError) as exc:
        raise ChunkDamagedError(f"{name}: body is not JSON: {exc}", name) from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ChunkDamagedError(f"{name}: not a {fmt} document", name)
    if doc.get("version") != version:
        raise FormatVersionError(f"{name}: {fmt} version {doc.get('version')!r} is not "
                                 f"supported (this build reads {version})")
    return doc
