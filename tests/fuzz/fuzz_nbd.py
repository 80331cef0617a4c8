"""atheris target: the NBD server's request parsing (zcore.nbd).

If the NBD package exposes a request parser (ZC_FUZZ_NBD_PARSER="module:function", or the
first of PARSERS that exists), the input goes to it directly: it may refuse with a
zcore.errors class, anything else is a crash.  Otherwise the input is played against a
real server on a Unix socket: mode 0 sends it as the option haggling after the greeting,
mode 1 as transmission-phase requests after NBD_OPT_EXPORT_NAME.  The server must log no
error with a traceback and keep serving; a client then still completes a read."""

import importlib
import logging
import os
import socket
import struct
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from zcore import nbd
    from zcore.errors import ZcoreError

PARSERS = ["zcore.nbd:parse_request", "zcore.nbd.protocol:parse_request",
           "zcore.nbd.wire:parse_request", "zcore.nbd:parse_requests"]


def find_parser():
    names = [os.environ["ZC_FUZZ_NBD_PARSER"]] if os.environ.get("ZC_FUZZ_NBD_PARSER") \
        else PARSERS
    for name in names:
        module, _, fn = name.partition(":")
        try:
            found = getattr(importlib.import_module(module), fn, None)
        except ImportError:
            found = None
        if callable(found):
            return found
    return None


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


ERRORS = _Errors()
STATE: dict = {}


def start_server() -> None:
    root = tempfile.mkdtemp(prefix="zc-fuzznbd-", dir=os.environ.get("ZC_FUZZ_TMP"))
    image = os.path.join(root, "disk.img")
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    sock = os.path.join(root, "nbd.sock")
    server = nbd.NBDServer([nbd.file_export(image, "f")])
    thread = nbd.ServerThread(server, host=None, unix=sock).start()
    STATE.update(root=root, sock=sock, thread=thread)
    for name in ("zcore", "asyncio"):
        logging.getLogger(name).addHandler(ERRORS)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _session(payload: bytes, mode: int) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(STATE["sock"])
        _recv_exact(s, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
        if mode == 0:
            s.sendall(payload)
        else:
            name = b"f"
            s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT,
                                                         nbd.OPT_EXPORT_NAME, len(name)) + name)
            _recv_exact(s, 10)
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    except OSError:
        pass
    finally:
        s.close()


def _healthy_read() -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5.0)
    try:
        s.connect(STATE["sock"])
        _recv_exact(s, 18)
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT,
                                                     nbd.OPT_EXPORT_NAME, 1) + b"f")
        assert len(_recv_exact(s, 10)) == 10, "the server stopped answering the handshake"
        s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 7, 0, 512))
        reply = _recv_exact(s, 16 + 512)
        assert len(reply) == 528, "the server stopped answering reads"
    finally:
        s.close()


def one_input(data: bytes) -> None:
    parser = STATE.get("parser")
    if parser is not None:
        try:
            parser(data)
        except ZcoreError:
            pass
        return
    if not data:
        return
    _session(data[1:], data[0] & 1)
    STATE["n"] = STATE.get("n", 0) + 1
    if STATE["n"] % 200 == 0:
        _healthy_read()
    if ERRORS.records:
        rec = ERRORS.records[0]
        raise AssertionError(f"the NBD server logged: {rec.getMessage()}") from (
            rec.exc_info[1] if rec.exc_info else None)


if __name__ == "__main__":
    STATE["parser"] = find_parser()
    if STATE["parser"] is None:
        start_server()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
