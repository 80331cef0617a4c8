"""The one exception hierarchy of zcore.

Every error zcore raises on purpose is a `ZcoreError`; each class also inherits the
builtin a caller would naturally catch (a corrupt record is a `ValueError`, an I/O
failure an `OSError`).  Native status codes map onto these classes through
`STATUS_ERRORS`, the one table the Cython layer uses.
"""

from __future__ import annotations


class ZcoreError(Exception):
    """Base of every error zcore raises deliberately."""


class CorruptRecordError(ZcoreError, ValueError):
    """Bytes read from disk or the network failed a checksum or a format rule."""


class TruncatedRecordError(CorruptRecordError):
    """A record, file or frame ends before its declared length."""


class ChecksumError(CorruptRecordError):
    """A CRC32C did not match: the bytes were not returned."""


class FormatVersionError(CorruptRecordError):
    """A file or peer speaks a format version this build cannot read."""


class AlignmentError(ZcoreError, ValueError):
    """An offset or length is not a multiple of the 512-byte sector."""


class OutOfRangeError(ZcoreError, ValueError):
    """A range reaches past the end of its volume, or names an unknown volume."""


class SequenceError(ZcoreError, ValueError):
    """A record's sequence number does not follow the ones already held."""


class ConfigError(ZcoreError, ValueError):
    """A setting or argument is outside what zcore accepts."""


class ClosedError(ZcoreError, ValueError):
    """The journal, view or volume was already closed."""


class CheckpointNotFoundError(ZcoreError, LookupError):
    """No checkpoint matches (or it has been promoted away)."""


class StateError(ZcoreError, RuntimeError):
    """The operation is not possible in the object's current state (not started, bitmap
    mode, ...)."""


class JournalFullError(ZcoreError, RuntimeError):
    """The journal passed its hard limit and cannot promote (a view pins its history)."""


class DurabilityError(ZcoreError, OSError):
    """An fsync failed: nothing more is acknowledged until the journal is reopened."""


class NativeIOError(ZcoreError, OSError):
    """A read or write system call inside a native kernel failed."""


class OutOfMemoryError(ZcoreError, MemoryError):
    """A native allocation failed."""


class ProtocolError(ZcoreError, ValueError):
    """A peer broke its protocol (bad magic, impossible lengths): the connection is dropped."""


class ScratchLimitError(ZcoreError, OSError):
    """A scratch overlay would pass its size limit: the write is refused, nothing is kept."""


# status codes of csrc/zc_format.h -> exception class
STATUS_ERRORS: dict[int, type[ZcoreError]] = {
    -1: TruncatedRecordError,
    -2: ChecksumError,
    -3: ChecksumError,
    -4: CorruptRecordError,
    -5: AlignmentError,
    -6: OutOfMemoryError,
    -7: SequenceError,
    -8: OutOfRangeError,
    -9: NativeIOError,
    -10: ConfigError,
}

STATUS_TEXT: dict[int, str] = {
    -1: "truncated record",
    -2: "header checksum mismatch",
    -3: "payload checksum mismatch",
    -4: "malformed record",
    -5: "offset or length not sector-aligned",
    -6: "out of memory",
    -7: "sequence number out of order",
    -8: "out of range or unknown volume",
    -9: "I/O error",
    -10: "invalid argument",
}


def status_error(status: int, doing: str) -> ZcoreError:
    """Exception for native status `status` raised while `doing` (a short phrase)."""
    cls = STATUS_ERRORS.get(status, ZcoreError)
    text = STATUS_TEXT.get(status, f"status {status}")
    return cls(f"{doing}: {text}")
