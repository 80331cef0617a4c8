"""A minimal QMP (QEMU Machine Protocol) client: what the `qemu` adapter needs to power a VM
off, quit it and ask its status.

QMP is JSON lines over a Unix socket: a greeting, `qmp_capabilities`, then commands each
answered by {"return": ...} or {"error": ...}, with asynchronous {"event": ...} lines in
between (skipped here).  One client at a time: the adapter connects per call, under its
per-VM lock.  Everything blocks (socket timeouts bound it).

Unix socket paths are limited to 107 bytes; a longer one is reached through the directory's
/proc/self/fd entry (`zcore.fsutil.short_socket_path`), which holds for bind and connect alike.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

from zcore.errors import AdapterError
from zcore.fsutil import short_socket_path

# QMP's greeting and replies are small; a line longer than this is not QMP
_MAX_LINE = 1 << 20


class QMPClient:
    """One QMP session on the socket at `path`; `timeout` bounds every socket operation."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            with short_socket_path(path) as address:
                self._sock.connect(address)
            self._file = self._sock.makefile("rb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise AdapterError(f"{path} does not speak QMP: {greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self._file.close()
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        line = self._file.readline(_MAX_LINE)
        if not line:
            raise EOFError("QMP connection closed")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise AdapterError(f"QMP sent a line that is not JSON: {line[:200]!r}") from exc
        if not isinstance(message, dict):
            raise AdapterError(f"QMP sent a line that is not an object: {line[:200]!r}")
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run `command` and return its "return" value; `AdapterError` on a QMP error,
        `EOFError` when QEMU closed the connection first (it does on `quit`)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\r\n")
        while True:
            message = self._read()
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"]
                desc = error.get("desc", error) if isinstance(error, dict) else error
                raise AdapterError(f"QMP {command} failed: {desc}")
            # an asynchronous event ({"event": ...}): not the answer
