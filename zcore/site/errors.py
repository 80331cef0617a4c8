"""Errors of the site service and the one table that names every error with a stable code.

Sits between zcore.errors (the engine's hierarchy, which these classes extend) and the two
places that report errors to users: the REST API (zcore.site.api.errors adds HTTP statuses)
and the task runner (zcore.site.tasks stores the code of a failed task).  A code is derived
from the class: the nearest class in the exception's MRO that `ERROR_CODES` names.
"""

from __future__ import annotations

from typing import Any

from zcore import errors as zerr


class SiteError(zerr.ZcoreError):
    """Base of the site service's own errors; `details` is shown to API clients as is."""

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.details = details


class NotFoundError(SiteError, LookupError):
    """A named object does not exist; `details` lists what does, where that is short."""


class VmNotFoundError(NotFoundError):
    """No VM of that name."""


class VolumeNotFoundError(NotFoundError):
    """No volume of that name on that VM."""


class VpgNotFoundError(NotFoundError):
    """No VPG of that name."""


class PeerNotFoundError(NotFoundError):
    """No paired site with that id."""


class TaskNotFoundError(NotFoundError):
    """No task with that id."""


class AlertNotFoundError(NotFoundError):
    """No alert with that id."""


class TokenNotFoundError(NotFoundError):
    """No API token with that id."""


class AlreadyExistsError(SiteError, ValueError):
    """An object of that name (or id) already exists."""


class InUseError(SiteError, ValueError):
    """The object is still referenced (a VM in a VPG, a peer with VPGs)."""


class AuthError(SiteError, PermissionError):
    """No valid, unrevoked API token was presented."""


class SiteNotInitializedError(SiteError, RuntimeError):
    """The database holds no site identity yet (`zcore site init` was not run)."""


# class -> stable code; the nearest class in an exception's MRO wins.
ERROR_CODES: dict[type[BaseException], str] = {
    VmNotFoundError: "vm_not_found",
    VolumeNotFoundError: "volume_not_found",
    VpgNotFoundError: "vpg_not_found",
    PeerNotFoundError: "peer_not_found",
    TaskNotFoundError: "task_not_found",
    AlertNotFoundError: "alert_not_found",
    TokenNotFoundError: "token_not_found",
    NotFoundError: "not_found",
    AlreadyExistsError: "already_exists",
    InUseError: "in_use",
    AuthError: "unauthorized",
    SiteNotInitializedError: "site_not_initialized",
    zerr.CheckpointNotFoundError: "checkpoint_not_found",
    zerr.ConfigError: "invalid_config",
    zerr.StateError: "invalid_state",
    zerr.AlignmentError: "misaligned",
    zerr.OutOfRangeError: "out_of_range",
    zerr.SequenceError: "sequence_error",
    zerr.ClosedError: "closed",
    zerr.JournalFullError: "journal_full",
    zerr.ScratchLimitError: "scratch_limit",
    zerr.ScriptError: "script_failed",
    zerr.HypervisorError: "hypervisor_error",
    zerr.AdapterError: "adapter_error",
    zerr.DurabilityError: "durability_error",
    zerr.NativeIOError: "io_error",
    zerr.RemoteIOError: "remote_io_error",
    zerr.OutOfMemoryError: "out_of_memory",
    zerr.ProtocolError: "protocol_error",
    zerr.FormatVersionError: "format_version",
    zerr.DamagedRecordError: "damaged_record",
    zerr.ReplicaChecksumError: "replica_checksum_mismatch",
    zerr.ChecksumError: "checksum_mismatch",
    zerr.TruncatedRecordError: "truncated_record",
    zerr.CorruptRecordError: "corrupt_record",
    zerr.ZcoreError: "zcore_error",
}

INTERNAL_ERROR = "internal_error"


def error_code(exc: BaseException) -> str:
    """The stable code of `exc`: the nearest class of its MRO in ERROR_CODES, else
    "internal_error" (an error zcore did not raise on purpose)."""
    for cls in type(exc).__mro__:
        code = ERROR_CODES.get(cls)
        if code is not None:
            return code
    return INTERNAL_ERROR


def error_details(exc: BaseException) -> Any:
    """What an error says beyond its message (SiteError.details), or None."""
    return getattr(exc, "details", None) if isinstance(exc, SiteError) else None
