"""NBD wire constants and the request header parser (the NBD project's doc/proto.md).

The bottom of the NBD server: numbers and struct layouts shared by negotiation
(`zcore.nbd.negotiation`) and transmission (`zcore.nbd.transmission`), and
`parse_request`, the one place untrusted request headers are decoded.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from zcore.errors import ProtocolError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9
REP_FLAG_ERROR = 1 << 31

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
KNOWN_CMD_FLAGS = (CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE
                   | CMD_FLAG_FAST_ZERO)

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2
REPLY_TYPE_FLAG_ERROR = 1 << 15  # every error chunk type has it

# NBD error values (the protocol's own numbering, which matches Linux errno)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

HELLO = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
CHUNK_DATA = struct.Struct(">IHHQIQ")
CHUNK_ERROR = struct.Struct(">IHHQIIH")
EXPORT_REPLY = struct.Struct(">QH")
INFO_EXPORT_REPLY = struct.Struct(">HQH")
INFO_BLOCK_REPLY = struct.Struct(">HIII")
REQUEST_SIZE = REQUEST.size  # 28
CHUNK_STATUS = struct.Struct(">IHHQII")  # chunk header, then the metadata context id
CLIENT_FLAGS = struct.Struct(">I")
MAX_ERROR_MESSAGE = 4096  # doc/proto.md: an error chunk's message is at most 4096 bytes

# the one metadata context served (doc/proto.md "base:allocation"): per extent, bit 0 a
# hole (no storage), bit 1 reads as zeros (the values of zcore.fsutil.STATE_HOLE / _ZERO)
META_BASE_ALLOCATION = "base:allocation"
META_BASE_ALLOCATION_ID = 1
STATE_HOLE = 1
STATE_ZERO = 2
# the one flag of QEMU's qemu:dirty-bitmap:NAME contexts (QEMU docs/interop/nbd.rst), bit 0
STATE_DIRTY = 1
# extents in one BLOCK_STATUS reply (8 bytes each: a 16 KiB reply at most), and the span
# of the export one request looks at: a client asks again from where the reply ended
MAX_STATUS_EXTENTS = 2048
MAX_STATUS_SPAN = 1 << 30

SECTOR = 512
PREFERRED_BLOCK = 4096
DEFAULT_PORT = 10809
DEFAULT_MAX_REQUEST = 32 << 20
MAX_REQUEST_LIMIT = 256 << 20
MAX_OPTION_DATA = 16 << 10  # a GO with a 4096-byte name and every info request fits
MAX_OPTIONS = 1024  # options in one handshake before the client is considered hostile
MAX_NAME = 4096


class Request(NamedTuple):
    """One transmission request header.  `length` is the payload length of a WRITE (which
    follows the header on the wire) and the data length of every other command."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int


_unpack_request = REQUEST.unpack
# tuple.__new__ straight from the unpacked fields: about half the cost of Request(...)
# with five arguments, on the path every request takes
_new_request = tuple.__new__


def parse_request(header: bytes | bytearray | memoryview) -> Request:
    """Decode exactly one `REQUEST_SIZE`-byte request header.

    Checks the framing only: a header of another length or with a bad magic raises
    `ProtocolError` (the connection is dropped).  Flags, command, offset and length are
    returned as sent, whatever their values: transmission answers what it does not
    accept with an NBD error, and the connection stays up."""
    if len(header) != REQUEST_SIZE:
        raise ProtocolError(f"request header of {len(header)} bytes, not {REQUEST_SIZE}")
    fields = _unpack_request(header)
    if fields[0] != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {fields[0]:#x}")
    return _new_request(Request, fields[1:])
