"""The repository's keys (docs/format.md 10d.2): a key-encryption key from a passphrase
(scrypt) or a key file (BLAKE3 derive_key), the 64-byte master key it wraps with
AES-256-GCM, and the two keys the master holds: `enc_key` for sealing objects and `id_key`
for naming chunks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from zcore.backup.errors import WrongKeyError
from zcore.errors import ConfigError, CorruptRecordError

DEFAULT_SCRYPT_N = 1 << 15  # ~32 MiB and ~0.1 s per open on these machines
MIN_SCRYPT_N = 1 << 10
KEYFILE_CONTEXT = "zcore-backup 1 keyfile"
MIN_KEYFILE = 32


@dataclass(frozen=True)
class Secret:
    """What unlocks a repository: a passphrase or the path of a key file (exactly one)."""

    passphrase: str | None = None
    keyfile: Path | None = None

    def __post_init__(self) -> None:
        if (self.passphrase is None) == (self.keyfile is None):
            raise ConfigError("give exactly one of a passphrase and a key file")


class Keys:
    """The master key's two halves: AES-GCM for sealing, BLAKE3 keyed for chunk ids."""

    def __init__(self, master: bytes) -> None:
        if len(master) != 64:
            raise ConfigError("a repository master key is 64 bytes")
        self.aead = AESGCM(master[:32])
        self._id_key = master[32:]

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        return blake3.blake3(data, key=self._id_key).hexdigest()


def new_kdf(secret: Secret, scrypt_n: int = DEFAULT_SCRYPT_N) -> dict[str, Any]:
    salt = os.urandom(16).hex()
    if secret.passphrase is not None:
        if scrypt_n < MIN_SCRYPT_N or scrypt_n & (scrypt_n - 1):
            raise ConfigError(f"scrypt n must be a power of two >= {MIN_SCRYPT_N}")
        return {"name": "scrypt", "salt": salt, "n": scrypt_n, "r": 8, "p": 1}
    return {"name": "keyfile", "salt": salt}


def _kek(secret: Secret, kdf: dict[str, Any]) -> bytes:
    try:
        salt = bytes.fromhex(kdf["salt"])
        name = kdf["name"]
        if name == "scrypt":
            if secret.passphrase is None:
                raise WrongKeyError("this repository is opened with a passphrase, "
                                    "not a key file")
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            if n < MIN_SCRYPT_N or n > 1 << 22 or n & (n - 1) or r != 8 or not 1 <= p <= 4:
                raise CorruptRecordError(f"repository config: scrypt parameters "
                                         f"{n}, {r}, {p} are out of bounds")
            return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(
                secret.passphrase.encode())
        if name == "keyfile":
            if secret.keyfile is None:
                raise WrongKeyError("this repository is opened with a key file, "
                                    "not a passphrase")
            material = Path(secret.keyfile).read_bytes()
            if len(material) < MIN_KEYFILE:
                raise ConfigError(f"key file {secret.keyfile} holds {len(material)} bytes; "
                                  f"a key file holds at least {MIN_KEYFILE}")
            kek: bytes = blake3.blake3(salt + material,
                                       derive_key_context=KEYFILE_CONTEXT).digest()
            return kek[:32]
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError | CorruptRecordError):
            raise
        raise CorruptRecordError(f"repository config: key derivation unreadable: {exc}") \
            from None
    raise CorruptRecordError(f"repository config: unknown key derivation {name!r}")


def _ad(repo_id: str) -> bytes:
    return b"zcore-backup-key" + repo_id.encode()


def wrap(secret: Secret, kdf: dict[str, Any], repo_id: str, master: bytes) -> str:
    nonce = os.urandom(12)
    return (nonce + AESGCM(_kek(secret, kdf)).encrypt(nonce, master, _ad(repo_id))).hex()


def unwrap(secret: Secret, kdf: dict[str, Any], repo_id: str, wrapped: str) -> Keys:
    """The repository's keys; WrongKeyError when `secret` does not open them."""
    try:
        raw = bytes.fromhex(wrapped)
    except (TypeError, ValueError):
        raise CorruptRecordError("repository config: key is not hex") from None
    if len(raw) != 12 + 64 + 16:
        raise CorruptRecordError("repository config: wrapped key has a wrong length")
    kek = _kek(secret, kdf)
    try:
        master = AESGCM(kek).decrypt(raw[:12], raw[12:], _ad(repo_id))
    except InvalidTag:
        raise WrongKeyError("wrong passphrase or key file for this repository") from None
    return Keys(master)


def new_keyfile(path: str | os.PathLike[str]) -> None:
    """Write a new key file of 64 random bytes, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(64))
        os.fsync(fd)
    finally:
        os.close(fd)
