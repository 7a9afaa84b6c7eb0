"""Encoders and decoders for every NBD message: pure functions on bytes, no sockets.

Server and client both build on these, so a field is laid out in exactly one place.
Decoders raise :class:`ProtocolError` on anything malformed; they never read past
what they were given.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pynbd.protocol.constants import (
    EXPORT_NAME_PADDING,
    EXTENDED_REPLY_MAGIC,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Info,
    ReplyFlag,
)


class ProtocolError(Exception):
    """The peer sent bytes that break the protocol; the stream cannot be trusted any more."""


# --- fixed layouts -------------------------------------------------------------------------

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OLDSTYLE_GREETING = struct.Struct(">QQQI124x")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes unless NO_ZEROES)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
EXTENT = struct.Struct(">II")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
OFFSET_HOLE = struct.Struct(">QI")
ERROR_HEAD = struct.Struct(">IH")

ZERO_PADDING = bytes(EXPORT_NAME_PADDING)


def _check_string(data: bytes, what: str) -> str:
    if len(data) > MAX_STRING:
        raise ProtocolError(f"{what} longer than {MAX_STRING} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} is not valid UTF-8") from exc


# --- handshake -----------------------------------------------------------------------------


def encode_greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


@dataclass(frozen=True)
class Greeting:
    oldstyle: bool
    handshake_flags: int = 0
    size: int = 0  # oldstyle only
    transmission_flags: int = 0  # oldstyle only


def decode_greeting_start(data: bytes) -> tuple[bool, int]:
    """Decode the first 16 bytes a server sends; returns (oldstyle, handshake flags or 0).

    For newstyle two more bytes of handshake flags follow; for oldstyle 136 more bytes.
    """
    magic, second = struct.unpack(">QQ", data)
    if magic != NBDMAGIC:
        raise ProtocolError(f"bad server magic {magic:#x}")
    if second == IHAVEOPT:
        return False, 0
    if second == OLDSTYLE_MAGIC:
        return True, 0
    raise ProtocolError(f"unknown handshake style {second:#x}")


def encode_oldstyle_greeting(size: int, transmission_flags: int) -> bytes:
    return OLDSTYLE_GREETING.pack(NBDMAGIC, OLDSTYLE_MAGIC, size, transmission_flags)


def encode_option(option: int, payload: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(payload)) + payload


def decode_option_header(data: bytes) -> tuple[int, int]:
    """Return (option, payload length) of a client option header."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return option, length


def encode_option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def decode_option_reply_header(data: bytes) -> tuple[int, int, int]:
    """Return (option, reply type, payload length) of a server option reply header."""
    magic, option, reply, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return option, reply, length


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + ZERO_PADDING


# INFO / GO payload: name length (32), name, count (16), count x info type (16)


def encode_info_request(name: str, infos: list[int]) -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def decode_info_request(payload: bytes) -> tuple[str, list[int]]:
    if len(payload) < 6:
        raise ProtocolError("INFO/GO payload too short")
    (name_len,) = U32.unpack_from(payload)
    if name_len > len(payload) - 6:
        raise ProtocolError("INFO/GO export name length overruns the payload")
    name = _check_string(payload[4 : 4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = U16.unpack_from(payload, pos)
    pos += 2
    if len(payload) != pos + 2 * count:
        raise ProtocolError("INFO/GO payload length does not match its info count")
    infos = [U16.unpack_from(payload, pos + 2 * i)[0] for i in range(count)]
    return name, infos


def encode_info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return U16.pack(Info.NAME) + name.encode()


def encode_info_description(description: str) -> bytes:
    return U16.pack(Info.DESCRIPTION) + description.encode()


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


@dataclass
class ExportInfo:
    """What a client learns about an export from NBD_REP_INFO replies (or EXPORT_NAME)."""

    name: str = ""
    size: int = 0
    flags: int = 0
    description: str | None = None
    canonical_name: str | None = None
    block_size: tuple[int, int, int] | None = None  # minimum, preferred, maximum


def decode_info_reply(payload: bytes, into: ExportInfo) -> None:
    """Fold one NBD_REP_INFO payload into ``into``; unknown info types are ignored."""
    if len(payload) < 2:
        raise ProtocolError("NBD_REP_INFO payload too short")
    (kind,) = U16.unpack_from(payload)
    if kind == Info.EXPORT:
        if len(payload) != INFO_EXPORT.size:
            raise ProtocolError("NBD_INFO_EXPORT of wrong length")
        _, into.size, into.flags = INFO_EXPORT.unpack(payload)
    elif kind == Info.NAME:
        into.canonical_name = _check_string(payload[2:], "export name")
    elif kind == Info.DESCRIPTION:
        into.description = _check_string(payload[2:], "description")
    elif kind == Info.BLOCK_SIZE:
        if len(payload) != INFO_BLOCK_SIZE.size:
            raise ProtocolError("NBD_INFO_BLOCK_SIZE of wrong length")
        _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(payload)
        into.block_size = (minimum, preferred, maximum)


def encode_rep_server(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + description.encode()


def decode_rep_server(payload: bytes) -> tuple[str, str]:
    if len(payload) < 4:
        raise ProtocolError("NBD_REP_SERVER payload too short")
    (name_len,) = U32.unpack_from(payload)
    if name_len > len(payload) - 4:
        raise ProtocolError("NBD_REP_SERVER name overruns the payload")
    name = _check_string(payload[4 : 4 + name_len], "export name")
    return name, _check_string(payload[4 + name_len :], "description")


# LIST/SET_META_CONTEXT payload: name length (32), name, query count (32), queries (len 32 + text)


def encode_meta_context_request(export: str, queries: list[str]) -> bytes:
    raw = export.encode()
    parts = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for query in queries:
        q = query.encode()
        parts += [U32.pack(len(q)), q]
    return b"".join(parts)


def decode_meta_context_request(payload: bytes) -> tuple[str, list[str]]:
    if len(payload) < 8:
        raise ProtocolError("meta context payload too short")
    (name_len,) = U32.unpack_from(payload)
    if name_len > len(payload) - 8:
        raise ProtocolError("meta context export name overruns the payload")
    export = _check_string(payload[4 : 4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = U32.unpack_from(payload, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(payload):
            raise ProtocolError("meta context query overruns the payload")
        (qlen,) = U32.unpack_from(payload, pos)
        pos += 4
        if pos + qlen > len(payload):
            raise ProtocolError("meta context query overruns the payload")
        queries.append(_check_string(payload[pos : pos + qlen], "meta context query"))
        pos += qlen
    if pos != len(payload):
        raise ProtocolError("meta context payload has trailing bytes")
    return export, queries


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


def decode_rep_meta_context(payload: bytes) -> tuple[int, str]:
    if len(payload) < 4:
        raise ProtocolError("NBD_REP_META_CONTEXT payload too short")
    (context_id,) = U32.unpack_from(payload)
    return context_id, _check_string(payload[4:], "meta context name")


# --- transmission --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def encode_request(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def decode_request(data: bytes | memoryview) -> Request:
    magic, flags, cmd, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, cmd, cookie, offset, length)


def encode_simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(flags: int, kind: int, cookie: int, length: int) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def encode_offset_data_header(cookie: int, offset: int, data_len: int, done: bool) -> bytes:
    """Chunk header plus the 8-byte offset; the data itself follows separately (no copy)."""
    flags = ReplyFlag.DONE if done else 0
    return encode_chunk_header(flags, Chunk.OFFSET_DATA, cookie, 8 + data_len) + U64.pack(offset)


def encode_offset_hole(cookie: int, offset: int, length: int, done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return encode_chunk_header(flags, Chunk.OFFSET_HOLE, cookie, 12) + OFFSET_HOLE.pack(offset, length)


def encode_none_chunk(cookie: int) -> bytes:
    return encode_chunk_header(ReplyFlag.DONE, Chunk.NONE, cookie, 0)


def encode_error_chunk(cookie: int, error: int, message: str = "", done: bool = True) -> bytes:
    raw = message.encode()[:MAX_STRING]
    flags = ReplyFlag.DONE if done else 0
    return encode_chunk_header(flags, Chunk.ERROR, cookie, 6 + len(raw)) + ERROR_HEAD.pack(error, len(raw)) + raw


def encode_block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    body = bytearray(4 + 8 * len(extents))
    U32.pack_into(body, 0, context_id)
    pos = 4
    for length, status in extents:
        EXTENT.pack_into(body, pos, length, status)
        pos += 8
    return encode_chunk_header(flags, Chunk.BLOCK_STATUS, cookie, len(body)) + bytes(body)


@dataclass(slots=True)
class ReplyHeader:
    """A decoded reply header: simple (``structured`` False) or one structured chunk."""

    structured: bool
    cookie: int
    error: int = 0  # simple replies
    flags: int = 0  # structured chunks
    type: int = 0
    length: int = 0

    @property
    def done(self) -> bool:
        return not self.structured or bool(self.flags & ReplyFlag.DONE)


SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size
CHUNK_HEADER_SIZE = CHUNK_HEADER.size


def reply_header_size(magic_bytes: bytes) -> int:
    """Given the first 4 bytes of a reply, how long its header is."""
    (magic,) = U32.unpack(magic_bytes)
    if magic == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY.size
    if magic == STRUCTURED_REPLY_MAGIC:
        return CHUNK_HEADER.size
    if magic == EXTENDED_REPLY_MAGIC:
        raise ProtocolError("extended reply header without extended headers negotiated")
    raise ProtocolError(f"bad reply magic {magic:#x}")


def decode_reply_header(data: bytes) -> ReplyHeader:
    (magic,) = U32.unpack_from(data)
    if magic == SIMPLE_REPLY_MAGIC:
        _, error, cookie = SIMPLE_REPLY.unpack(data)
        return ReplyHeader(False, cookie, error=error)
    if magic == STRUCTURED_REPLY_MAGIC:
        _, flags, kind, cookie, length = CHUNK_HEADER.unpack(data)
        return ReplyHeader(True, cookie, flags=flags, type=kind, length=length)
    raise ProtocolError(f"bad reply magic {magic:#x}")


@dataclass
class ErrorChunk:
    error: int
    message: str
    offset: int | None = None


def decode_error_chunk(kind: int, payload: bytes) -> ErrorChunk:
    if len(payload) < 6:
        raise ProtocolError("error chunk too short")
    error, msg_len = ERROR_HEAD.unpack_from(payload)
    if 6 + msg_len > len(payload):
        raise ProtocolError("error chunk message overruns the chunk")
    message = payload[6 : 6 + msg_len].decode("utf-8", "replace")
    offset = None
    if kind == Chunk.ERROR_OFFSET:
        if len(payload) != 6 + msg_len + 8:
            raise ProtocolError("ERROR_OFFSET chunk of wrong length")
        (offset,) = U64.unpack_from(payload, 6 + msg_len)
    return ErrorChunk(error or 22, message, offset)


@dataclass
class BlockStatusChunk:
    context_id: int
    extents: list[tuple[int, int]] = field(default_factory=list)


def decode_block_status_chunk(payload: bytes) -> BlockStatusChunk:
    if len(payload) < 12 or (len(payload) - 4) % 8:
        raise ProtocolError("BLOCK_STATUS chunk of wrong length")
    (context_id,) = U32.unpack_from(payload)
    extents = list(EXTENT.iter_unpack(memoryview(payload)[4:]))
    if any(length == 0 for length, _ in extents):
        raise ProtocolError("zero-length block status extent")
    return BlockStatusChunk(context_id, extents)
