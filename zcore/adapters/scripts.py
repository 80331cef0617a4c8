"""Running a user's script with a timeout: the one way the adapters and boot plans do it.

A script is a shell command line (a `str`, run by /bin/sh -c) or an argv sequence.  It runs
in its own session with the caller's environment plus the variables it is given; its
standard output and error go to a temporary file, not a pipe, so a script that leaves a
process behind (a start script that launches a VM in the background) cannot block the
caller on a pipe that never closes.  At its timeout the script's whole process group is
killed.  A failure raises `ScriptError` naming the script, its exit status and the tail of
its output.  `run_script` blocks: call it from a worker thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from zcore.errors import ConfigError, ScriptError

Command = str | Sequence[str]

# How much of a script's output an error or a result keeps: the end is what explains a
# failure, and a chatty script must not fill the service's memory or its event log.
OUTPUT_TAIL = 4096


@dataclass(frozen=True)
class ScriptResult:
    """A script that exited 0 or with an exit status its caller accepts."""

    script: str
    status: int
    output: str  # the tail of its standard output and error, at most OUTPUT_TAIL characters


def describe(command: Command) -> str:
    """How a script is named in messages: its command line."""
    if isinstance(command, str):
        return command
    return " ".join(command)


def _argv(command: Command) -> list[str]:
    if isinstance(command, str):
        if not command.strip():
            raise ConfigError("a script's command line is empty")
        return ["/bin/sh", "-c", command]
    argv = [os.fspath(a) for a in command]
    if not argv:
        raise ConfigError("a script's argv is empty")
    return argv


def _tail(f: IO[bytes]) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - OUTPUT_TAIL))
    return f.read().decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_script(command: Command, env: Mapping[str, str], timeout: float, *, what: str,
               ok_status: Sequence[int] = (0,), cwd: str | None = None) -> ScriptResult:
    """Run `command` with the current environment plus `env`, waiting at most `timeout`
    seconds (blocking).  `what` says what the script is for ("start script of vm1").
    Returns its result when its exit status is in `ok_status`; raises `ScriptError` when it
    exits otherwise, is killed at its timeout, or cannot be run at all."""
    name = describe(command)
    argv = _argv(command)
    full_env = {**os.environ, **env}
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                                    start_new_session=True)
        except OSError as exc:
            raise ScriptError(f"{what} {name!r} could not be run: {exc}", script=name,
                              status=None, output="") from exc
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            output = _tail(out)
            raise ScriptError(
                f"{what} {name!r} timed out after {timeout:g} s and was killed; "
                f"its output ended with:\n{output}", script=name, status=None, output=output,
                timed_out=True) from None
        except BaseException:
            _kill_group(proc)  # the calling thread is interrupted: do not leave it running
            raise
        output = _tail(out)
    if status not in ok_status:
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        raise ScriptError(f"{what} {name!r} {how}; its output ended with:\n{output}",
                          script=name, status=status, output=output)
    return ScriptResult(name, status, output)
