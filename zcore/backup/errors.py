"""The backup repository's errors: subclasses of zcore.errors classes, so a caller that
catches `CorruptRecordError`, `ConfigError` or `StateError` catches these too."""

from __future__ import annotations

from zcore.errors import ConfigError, CorruptRecordError, StateError


class WrongKeyError(ConfigError):
    """The passphrase or key file does not open the repository's key (docs/format.md
    10d.2): nothing was read or written."""


class ChunkDamagedError(CorruptRecordError):
    """A sealed object (chunk, manifest, index) failed a format rule, its GCM tag or its id:
    no byte of it was returned.  `name` is the object."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class ChunkMissingError(CorruptRecordError):
    """A manifest lists a chunk the repository does not hold.  `name` is the object."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class RetentionLockError(StateError):
    """A backup (or object) is under a retention lock: it cannot be deleted before
    `until` (epoch seconds)."""

    def __init__(self, message: str, until: float = 0.0) -> None:
        super().__init__(message)
        self.until = until
