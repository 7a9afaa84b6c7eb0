"""Numbers of the NBD protocol (doc/proto.md of NetworkBlockDevice/nbd).

Kept in one place so the server, the client and the tests speak the same names.
"""

from __future__ import annotations

import enum

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

DEFAULT_PORT = 10809
MAX_STRING = 4096  # names, descriptions, messages: the spec's hard limit
MAX_OPTION_LENGTH = 32 * 1024 * 1024  # qemu drops clients above this; so do we
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE we accept (the spec's portable maximum)
EXPORT_NAME_PADDING = 124


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009
    ERR_EXT_HEADER_REQD = 0x8000000A

    @property
    def is_error(self) -> bool:
        return bool(self & 0x80000000)


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


# Which command flags each command accepts (anything else is EINVAL, as qemu and nbdkit do).
ALLOWED_CMD_FLAGS: dict[int, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag(0),
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class Chunk(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


class Errno(enum.IntEnum):
    """Error values on the wire; they are Linux errno numbers, but fixed by the spec."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class State(enum.IntFlag):
    """base:allocation status bits."""

    DATA = 0
    HOLE = 1 << 0
    ZERO = 1 << 1


STATE_DIRTY = 1  # qemu:dirty-bitmap:NAME bit 0
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
