"""The one exception hierarchy of zcore.

Every error zcore raises on purpose is a `ZcoreError`; each class also inherits the
builtin a caller would naturally catch (a corrupt record is a `ValueError`, an I/O
failure an `OSError`).  Native status codes are named once, by `Status` (the twin of
csrc/zc_format.h's `enum zc_status`), and map onto these classes through `STATUS_ERRORS`,
the one table the Cython layer uses (`status_error`).
"""

from __future__ import annotations

from enum import IntEnum


class ZcoreError(Exception):
    """Base of every error zcore raises deliberately."""


class CorruptRecordError(ZcoreError, ValueError):
    """Bytes read from disk or the network failed a checksum or a format rule."""


class TruncatedRecordError(CorruptRecordError):
    """A record, file or frame ends before its declared length."""


class ChecksumError(CorruptRecordError):
    """A CRC32C did not match: the bytes were not returned."""


class DamagedRecordError(CorruptRecordError):
    """A read needs journaled records that reopening found damaged or missing and
    quarantined (the journal's reopen report and status list them)."""


class ReplicaChecksumError(ChecksumError):
    """A replica block failed its sum (docs/format.md 7.5): the bytes were not returned.
    `volume` and `offset` name the damaged block; `length` is its size."""

    def __init__(self, message: str, volume: int = -1, offset: int = -1,
                 length: int = 0) -> None:
        super().__init__(message)
        self.volume = volume
        self.offset = offset
        self.length = length

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], self.volume, self.offset, self.length))


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


class RemoteIOError(ZcoreError, OSError):
    """A server answered a request with an error (an NBD server's EIO, ENOSPC...):
    `errno` is its error number, the request was not done; the connection stays usable."""


class ScratchLimitError(ZcoreError, OSError):
    """A scratch overlay would pass its size limit: the write is refused, nothing is kept."""


class AdapterError(ZcoreError, RuntimeError):
    """A hypervisor adapter could not start, stop or query a VM (its tool is missing, it
    did not come up or go down in time, or it exited)."""


class ScriptError(AdapterError):
    """A user's script (an adapter's start/stop/status command, a pre- or post-operation
    script) failed or timed out.  `script` names it, `status` is its exit status (None when
    it was killed at its timeout), `output` the tail of what it printed."""

    def __init__(self, message: str, *, script: str, status: int | None, output: str,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.script = script
        self.status = status
        self.output = output
        self.timed_out = timed_out


class Status(IntEnum):
    """The status codes of the native kernels: csrc/zc_format.h's `enum zc_status`, member
    for member (`ZC_E_TRUNCATED` is `Status.TRUNCATED`; tests/test_errors.py checks it)."""

    OK = 0
    TRUNCATED = -1
    HEADER_CRC = -2
    PAYLOAD_CRC = -3
    BAD_RECORD = -4
    ALIGNMENT = -5
    NOMEM = -6
    ORDER = -7
    RANGE = -8
    IO = -9
    ARG = -10
    FULL = -20
    CLOSED = -21


# native status -> (exception class, what it means); every failure status has a row
STATUS_ERRORS: dict[Status, type[ZcoreError]] = {
    Status.TRUNCATED: TruncatedRecordError,
    Status.HEADER_CRC: ChecksumError,
    Status.PAYLOAD_CRC: ChecksumError,
    Status.BAD_RECORD: CorruptRecordError,
    Status.ALIGNMENT: AlignmentError,
    Status.NOMEM: OutOfMemoryError,
    Status.ORDER: SequenceError,
    Status.RANGE: OutOfRangeError,
    Status.IO: NativeIOError,
    Status.ARG: ConfigError,
    Status.FULL: StateError,
    Status.CLOSED: StateError,
}

STATUS_TEXT: dict[Status, str] = {
    Status.TRUNCATED: "truncated record",
    Status.HEADER_CRC: "header checksum mismatch",
    Status.PAYLOAD_CRC: "payload checksum mismatch",
    Status.BAD_RECORD: "malformed record",
    Status.ALIGNMENT: "offset or length not sector-aligned",
    Status.NOMEM: "out of memory",
    Status.ORDER: "sequence number out of order",
    Status.RANGE: "out of range or unknown volume",
    Status.IO: "I/O error",
    Status.ARG: "invalid argument",
    Status.FULL: "capture buffer full",
    Status.CLOSED: "capture closed",
}


def status_error(status: int, doing: str) -> ZcoreError:
    """Exception for native status `status` raised while `doing` (a short phrase)."""
    try:
        code = Status(status)
    except ValueError:
        return ZcoreError(f"{doing}: status {status}")
    cls = STATUS_ERRORS.get(code, ZcoreError)
    return cls(f"{doing}: {STATUS_TEXT.get(code, code.name.lower())}")
