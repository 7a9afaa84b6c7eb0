"""The asyncio NBD client: negotiation, then many requests in flight on one connection.

One reader task owns the receiving side. It demultiplexes replies by cookie into the futures of
the waiting requests, and receives read payloads straight into the caller's buffer (structured
OFFSET_DATA chunks land at their offset, OFFSET_HOLE chunks are zero-filled in place). Anything
that breaks the protocol fails every pending request with :class:`ProtocolViolation` and closes
the connection: a misbehaving server costs an exception, never a hang.

A caller may stop waiting (its task is cancelled, a timeout runs out) while its request is on
the wire. The request is then *abandoned*, not forgotten: its reply is still received, in step,
and dropped; nothing of it is written into the caller's buffer any more, which the caller is
free to reuse at once (a server's pooled reply buffer, say). It also keeps its slot among the
``max_requests`` until that reply (or the connection's end) arrives, so the server never has
more requests to answer than the limit.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pynbd.channel import BufferedReader, Channel, ConnectionClosed, SocketChannel, TLSChannel
from pynbd.client.endpoint import ActivatedCommand, Endpoint, StdioCommand, TCPEndpoint, UnixEndpoint
from pynbd.client.errors import NBDConnectionError, NBDError, ProtocolViolation
from pynbd.client.uri import NBDURI, format_uri, parse_uri
from pynbd.protocol.client_negotiation import (
    MAX_OPTION_REPLY,
    ExportInfoRequest,
    ListExports,
    MetaContextRequest,
    Negotiated,
    OptionError,
    OptionRequest,
    client_flags_for,
    decode_export_name_reply,
    decode_oldstyle_rest,
    export_name_reply_size,
    sanitize_transmission_flags,
)
from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    MAX_PAYLOAD,
    MAX_STRING,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Opt,
    ReplyFlag,
    TransmissionFlag,
)
from pynbd.protocol.wire import (
    CHUNK_HEADER,
    CLIENT_FLAGS,
    OFFSET_HOLE,
    OPTION_REPLY_HEADER,
    SIMPLE_REPLY,
    U16,
    U32,
    U64,
    ExportInfo,
    ProtocolError,
    decode_block_status_chunk,
    decode_error_chunk,
    decode_greeting_start,
    decode_option_reply_header,
    encode_request,
)
from pynbd.tls import client_context

log = logging.getLogger("pynbd.client")

DEFAULT_MAX_REQUESTS = 64  # requests in flight per connection
MAX_EFFECT = 1 << 30  # largest TRIM / WRITE_ZEROES / CACHE length sent in one request
MAX_BLOCK_STATUS = (1 << 32) - (1 << 16)  # 32-bit length, multiple of any legal minimum block size
MAX_CHUNK_PAYLOAD = 64 * 1024 * 1024 + 8  # a bigger structured chunk is a broken server (libnbd's limit)
MAX_ERROR_CHUNK = MAX_STRING + 14
DISCONNECT_TIMEOUT = 10.0
_ZEROS = bytes(1 << 20)


class Extent(NamedTuple):
    """A run of bytes with one status value of a meta context."""

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class _Pending:
    cmd: int
    offset: int
    length: int
    future: asyncio.Future
    buffer: memoryview | None = None  # READ: where the data goes
    covered: list[tuple[int, int]] = field(default_factory=list)  # READ: content chunks seen
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # BLOCK_STATUS by context id
    error: BaseException | None = None
    abandoned: bool = False  # the caller stopped waiting: the reply is received and dropped

    def abandon(self) -> None:
        """The caller gave up: its buffer is no longer ours to write."""
        self.abandoned = True
        self.buffer = None

    def is_abandoned(self) -> bool:
        return self.abandoned


def _zero_fill(view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        step = min(len(view) - pos, len(_ZEROS))
        view[pos : pos + step] = _ZEROS[:step]
        pos += step


class Client:
    """One NBD connection. Create it with :func:`connect`; use it from one event loop."""

    def __init__(self, channel: SocketChannel, endpoint: Endpoint, *, max_requests: int = DEFAULT_MAX_REQUESTS):
        self.channel: Channel = channel
        self.reader = BufferedReader(channel)
        self.endpoint = endpoint
        self.owns_endpoint = True
        self.max_requests = max_requests
        self.negotiated: Negotiated | None = None
        self.export_name = ""
        self.uri: NBDURI | None = None
        self.opt_mode = False
        self._no_zeroes = False
        self._in_options = False  # fixed-newstyle option haggling: leave with NBD_OPT_ABORT
        self._structured_requested = False
        self._structured = False
        self._tls = False
        self._protocol = "newstyle-fixed"
        self._pending: dict[int, _Pending] = {}  # sent and not yet answered, abandoned ones included
        self._cookies = itertools.count(1)
        self._slots = asyncio.Semaphore(max_requests)  # one per entry of _pending, or per request about to be
        self._idle = asyncio.Event()
        self._idle.set()
        self._send_lock = asyncio.Lock()
        self._reader_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._disconnecting = False
        self._context_names: dict[int, str] = {}

    # -- properties --------------------------------------------------------------------------

    @property
    def info(self) -> ExportInfo:
        return self._need_transmission().info

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def flags(self) -> TransmissionFlag:
        return TransmissionFlag(self.info.flags)

    @property
    def protocol(self) -> str:
        return self._protocol

    @property
    def structured(self) -> bool:
        return self._structured

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def description(self) -> str | None:
        return self.info.description

    @property
    def contexts(self) -> list[str]:
        """Meta contexts the server selected for this connection."""
        return list(self.negotiated.contexts) if self.negotiated else []

    @property
    def block_size(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum payload) the server advertised, or the spec's defaults."""
        return self.info.block_size or (1, 4096, MAX_PAYLOAD)

    @property
    def alignment(self) -> int:
        return self.block_size[0]

    @property
    def max_payload(self) -> int:
        minimum, _, maximum = self.block_size
        return max(minimum, min(maximum, MAX_PAYLOAD) // minimum * minimum)

    def _can(self, flag: TransmissionFlag) -> bool:
        return bool(self.info.flags & flag)

    @property
    def read_only(self) -> bool:
        return self._can(TransmissionFlag.READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._can(TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._can(TransmissionFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._can(TransmissionFlag.SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return self._can(TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return self._can(TransmissionFlag.SEND_FAST_ZERO)

    @property
    def can_df(self) -> bool:
        return self._can(TransmissionFlag.SEND_DF)

    @property
    def can_multi_conn(self) -> bool:
        return self._can(TransmissionFlag.CAN_MULTI_CONN)

    @property
    def can_cache(self) -> bool:
        return self._can(TransmissionFlag.SEND_CACHE)

    @property
    def is_rotational(self) -> bool:
        return self._can(TransmissionFlag.ROTATIONAL)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, including those whose callers gave up waiting."""
        return len(self._pending)

    async def wait_idle(self) -> None:
        """Wait until every request sent has been answered (abandoned ones too) or the connection ended.

        After a caller gave up on requests, this is the point from which the server has nothing
        of them left to send.
        """
        await self._idle.wait()

    @property
    def closed(self) -> bool:
        return self._dead is not None

    def _need_transmission(self) -> Negotiated:
        """What negotiation settled; refuses while still negotiating."""
        if self.negotiated is None:
            raise RuntimeError("the connection is still negotiating (opt mode): call opt_go() first")
        return self.negotiated

    # -- negotiation -------------------------------------------------------------------------

    async def _handshake(
        self,
        export: str,
        meta_contexts: Sequence[str],
        tls: str,
        tls_context: ssl.SSLContext | None,
        server_hostname: str | None,
        opt_mode: bool,
        structured: bool,
    ) -> None:
        self.export_name = export
        oldstyle, _ = decode_greeting_start(await self.reader.readexactly(16))
        if oldstyle:
            size, flags = decode_oldstyle_rest(await self.reader.readexactly(136))
            if tls == "require":
                raise NBDConnectionError("TLS is required but the server speaks oldstyle NBD (no TLS possible)")
            self._protocol = "oldstyle"
            self._finish_negotiation(ExportInfo(name=export, size=size, flags=flags), {})
            return
        (handshake_flags,) = U16.unpack(await self.reader.readexactly(2))
        client_flags = client_flags_for(handshake_flags)
        await self.channel.send([CLIENT_FLAGS.pack(client_flags)])
        self._no_zeroes = bool(client_flags & HandshakeFlag.NO_ZEROES)
        if not handshake_flags & HandshakeFlag.FIXED_NEWSTYLE:
            self._protocol = "newstyle"
            if tls == "require":
                raise NBDConnectionError("TLS is required but the server is not fixed-newstyle (no STARTTLS)")
            await self._export_name(export)
            return
        self._protocol = "newstyle-fixed"
        self._in_options = True
        if tls != "off":
            await self._starttls(tls, tls_context, server_hostname)
        self._structured_requested = structured
        if opt_mode:
            self.opt_mode = True
            return
        await self.opt_go(export, meta_contexts)

    async def _option(self, request: OptionRequest) -> OptionRequest:
        """Send one option and read its replies up to the final one."""
        await self.channel.send([request.encode()])
        while True:
            option, reply, length = decode_option_reply_header(await self.reader.readexactly(OPTION_REPLY_HEADER.size))
            if length > MAX_OPTION_REPLY:
                raise ProtocolViolation(f"option reply of {length} bytes")
            payload = await self.reader.readexactly(length) if length else b""
            if request.feed(option, reply, payload):
                return request

    async def _starttls(self, tls: str, context: ssl.SSLContext | None, server_hostname: str | None) -> None:
        try:
            await self._option(OptionRequest(Opt.STARTTLS))
        except OptionError as exc:
            if tls == "require":
                raise NBDConnectionError(f"TLS is required but the server refused STARTTLS ({exc})") from exc
            log.info("server refused STARTTLS, continuing without TLS: %s", exc)
            return
        assert context is not None and isinstance(self.channel, SocketChannel)
        channel = TLSChannel(
            self.channel,
            context,
            server_side=False,
            server_hostname=server_hostname,
            already_received=self.reader.take_buffered(),
        )
        try:
            await channel.handshake()
        except ssl.SSLError as exc:
            raise NBDConnectionError(f"TLS handshake failed: {exc}") from exc
        self.channel = channel
        self.reader = BufferedReader(channel)
        self._tls = True

    async def _ensure_structured(self) -> None:
        if self._structured_requested and not self._structured:
            self._structured_requested = False  # ask once: a repeat may be refused
            try:
                await self._option(OptionRequest(Opt.STRUCTURED_REPLY))
                self._structured = True
            except OptionError as exc:
                log.debug("no structured replies: %s", exc)

    def _need_opt_mode(self) -> None:
        if not self.opt_mode:
            raise RuntimeError("only available while negotiating (connect with opt_mode=True)")

    async def opt_list(self) -> list[tuple[str, str]]:
        """NBD_OPT_LIST: (name, description) of every export the server names."""
        self._need_opt_mode()
        await self._ensure_structured()
        request = ListExports()
        await self._option(request)
        return request.exports

    async def opt_info(self, export: str | None = None) -> ExportInfo:
        """NBD_OPT_INFO: what GO would say about ``export``, without committing to it."""
        self._need_opt_mode()
        await self._ensure_structured()
        request = ExportInfoRequest(Opt.INFO, self.export_name if export is None else export)
        await self._option(request)
        info = request.info
        if info.flags & TransmissionFlag.HAS_FLAGS:
            info.flags = sanitize_transmission_flags(info.flags, self._structured)
        return info

    async def opt_list_meta_context(self, export: str | None = None, queries: Sequence[str] = ()) -> list[str]:
        """NBD_OPT_LIST_META_CONTEXT: contexts matching ``queries`` (all of them when empty)."""
        self._need_opt_mode()
        await self._ensure_structured()
        if not self._structured:
            return []
        request = MetaContextRequest(
            Opt.LIST_META_CONTEXT, self.export_name if export is None else export, list(queries)
        )
        await self._option(request)
        return list(request.contexts)

    async def opt_go(self, export: str | None = None, meta_contexts: Sequence[str] = ()) -> None:
        """Select meta contexts and enter the transmission phase (GO, or EXPORT_NAME on old servers)."""
        if export is not None:
            self.export_name = export
        export = self.export_name
        await self._ensure_structured()
        contexts: dict[str, int] = {}
        if meta_contexts and self._structured:
            request = MetaContextRequest(Opt.SET_META_CONTEXT, export, list(meta_contexts))
            try:
                await self._option(request)
                contexts = request.contexts
            except OptionError as exc:
                log.warning("server refused meta contexts %s: %s", list(meta_contexts), exc)
        go = ExportInfoRequest(Opt.GO, export)
        try:
            await self._option(go)
        except OptionError as exc:
            if exc.unsupported:  # a server without GO: the old way, which cannot fail politely
                self.opt_mode = False
                await self._export_name(export, contexts)
                return
            if exc.tls_required:
                raise OptionError(exc.option, exc.reply, "server requires TLS (use nbds:// or tls=...)") from exc
            raise
        self.opt_mode = False
        self._finish_negotiation(go.info, contexts)

    async def opt_abort(self) -> None:
        """NBD_OPT_ABORT and close: the polite way to leave during negotiation."""
        self._need_opt_mode()
        self._in_options = False
        try:
            await self.channel.send([OptionRequest(Opt.ABORT).encode()])
            await asyncio.wait_for(self.reader.readexactly(OPTION_REPLY_HEADER.size), 5.0)
        except (OSError, ConnectionError, TimeoutError, ProtocolError):
            pass  # servers may close without the ACK
        await self.close()

    async def _export_name(self, export: str, contexts: dict[str, int] | None = None) -> None:
        self._in_options = False  # no way back: the server answers or hangs up
        await self.channel.send([OptionRequest(Opt.EXPORT_NAME, export.encode()).encode()])
        try:
            reply = await self.reader.readexactly(export_name_reply_size(self._no_zeroes))
        except ConnectionClosed as exc:
            raise NBDConnectionError(f"server closed the connection on NBD_OPT_EXPORT_NAME {export!r}") from exc
        size, flags = decode_export_name_reply(reply)
        self._finish_negotiation(ExportInfo(name=export, size=size, flags=flags), contexts or {})

    def _finish_negotiation(self, info: ExportInfo, contexts: dict[str, int]) -> None:
        self._in_options = False
        info.flags = sanitize_transmission_flags(info.flags, self._structured)
        self.negotiated = Negotiated(self._protocol, info, self._structured, self._tls, dict(contexts))
        self._context_names = {cid: name for name, cid in contexts.items()}
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies())

    # -- transmission: sending -----------------------------------------------------------------

    async def _request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: memoryview | bytes | None = None,
        buffer: memoryview | None = None,
    ) -> _Pending:
        """Send one request and wait for its complete reply.

        The slot taken here belongs to the request from the moment it is registered in
        ``_pending``: :meth:`_retire` gives it back when the reply has been received (or
        :meth:`_fail` when the connection ends), never the caller. A caller cancelled while
        waiting abandons the request, whose reply is then received and dropped.
        """
        if self._dead is not None:
            raise NBDConnectionError(f"connection is closed: {self._dead}") from self._dead
        self._need_transmission()
        await self._slots.acquire()
        registered = False
        try:
            if self._dead is not None:
                raise NBDConnectionError(f"connection is closed: {self._dead}") from self._dead
            cookie = next(self._cookies)
            future = asyncio.get_running_loop().create_future()
            pending = _Pending(cmd, offset, length, future, buffer)
            header = encode_request(flags, cmd, cookie, offset, length)
            async with self._send_lock:
                if self._dead is not None:
                    raise NBDConnectionError(f"connection is closed: {self._dead}") from self._dead
                self._pending[cookie] = pending
                self._idle.clear()
                registered = True
                try:
                    await self.channel.send([header, payload] if payload is not None else [header])
                except asyncio.CancelledError:
                    # part of the request may be on the wire: the stream cannot be trusted any more
                    self._fail(NBDConnectionError("a request was cancelled while it was being sent"))
                    raise
                except (OSError, ssl.SSLError) as exc:
                    self._fail(NBDConnectionError(f"sending to the server failed: {exc}"))
        finally:
            if not registered:
                self._slots.release()
        try:
            await future
        except asyncio.CancelledError:
            pending.abandon()
            raise
        return pending

    def _check_range(self, count: int, offset: int) -> None:
        if count < 0 or offset < 0:
            raise ValueError("negative offset or count")
        if offset + count > self.size:
            raise NBDError(errno.EINVAL, f"request [{offset}, {offset + count}) is beyond the export size {self.size}")

    def _check_writable(self, what: str, flag: TransmissionFlag | None = None) -> None:
        if self.read_only:
            raise NBDError(errno.EPERM, f"{what}: the export is read-only")
        if flag is not None and not self._can(flag):
            raise NBDError(errno.ENOTSUP, f"{what}: the server does not support it")

    def _pieces(self, offset: int, count: int, step: int) -> list[tuple[int, int]]:
        return [(pos, min(step, offset + count - pos)) for pos in range(offset, offset + count, step)]

    # -- commands ----------------------------------------------------------------------------

    async def pread(self, count: int, offset: int, *, fua: bool = False) -> bytes:
        """Read ``count`` bytes at ``offset`` (holes read as zeroes)."""
        buf = bytearray(count)
        await self.pread_into(buf, offset, fua=fua)
        return bytes(buf)

    async def pread_into(self, buf: bytearray | memoryview, offset: int, *, fua: bool = False) -> None:
        """Fill ``buf`` from ``offset``; the data is received directly into it."""
        view = memoryview(buf).cast("B")
        count = len(view)
        self._check_range(count, offset)
        if not count:
            return
        align = self.alignment
        if offset % align or count % align:
            start = offset - offset % align
            end = min(-(-(offset + count) // align) * align, self.size)
            bounce = bytearray(end - start)
            await self._read_aligned(memoryview(bounce), start, fua)
            view[:] = memoryview(bounce)[offset - start : offset - start + count]
            return
        await self._read_aligned(view, offset, fua)

    async def _read_aligned(self, view: memoryview, offset: int, fua: bool) -> None:
        flags = CmdFlag.FUA if fua and self.can_fua else 0
        pieces = self._pieces(offset, len(view), self.max_payload)
        if len(pieces) == 1:
            await self._request(Cmd.READ, offset, len(view), flags, buffer=view)
            return
        await _gather(
            [self._request(Cmd.READ, pos, n, flags, buffer=view[pos - offset : pos - offset + n]) for pos, n in pieces]
        )

    async def pwrite(self, buf: bytes | bytearray | memoryview, offset: int, *, fua: bool = False) -> None:
        """Write ``buf`` at ``offset``. Unaligned edges are read, patched and rewritten (not atomic)."""
        view = memoryview(buf).cast("B")
        count = len(view)
        self._check_range(count, offset)
        self._check_writable("write")
        if not count:
            return
        align = self.alignment
        if offset % align or count % align:
            start = offset - offset % align
            end = min(-(-(offset + count) // align) * align, self.size)
            bounce = bytearray(end - start)
            if offset != start:
                await self.pread_into(memoryview(bounce)[: min(align, end - start)], start)
            if offset + count != end:
                tail = max(start, (end - 1) // align * align)
                await self.pread_into(memoryview(bounce)[tail - start :], tail)
            bounce[offset - start : offset - start + count] = view
            view, offset = memoryview(bounce), start
        flags = CmdFlag.FUA if fua and self.can_fua else 0
        await _gather(
            [
                self._request(Cmd.WRITE, pos, n, flags, payload=view[pos - offset : pos - offset + n])
                for pos, n in self._pieces(offset, len(view), self.max_payload)
            ]
        )

    async def zero(
        self, count: int, offset: int, *, no_hole: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        """WRITE_ZEROES: the range reads as zeroes afterwards.

        ``no_hole`` keeps it allocated; ``fast`` (FAST_ZERO) fails with ENOTSUP instead of being slow.
        """
        self._check_range(count, offset)
        self._check_writable("write zeroes", TransmissionFlag.SEND_WRITE_ZEROES)
        if fast and not self.can_fast_zero:
            raise NBDError(errno.ENOTSUP, "fast zero: the server does not support it")
        if not count:
            return
        align = self.alignment
        start, end = -(-offset // align) * align, (offset + count) // align * align
        if start >= end:  # inside one block
            await self.pwrite(_ZEROS[:count] if count <= len(_ZEROS) else bytes(count), offset, fua=fua)
            return
        edges = []
        if start > offset:
            edges.append(self.pwrite(_ZEROS[: start - offset], offset, fua=fua))
        if offset + count > end:
            edges.append(self.pwrite(_ZEROS[: offset + count - end], end, fua=fua))
        flags = (CmdFlag.NO_HOLE if no_hole else 0) | (CmdFlag.FAST_ZERO if fast else 0)
        flags |= CmdFlag.FUA if fua and self.can_fua else 0
        step = MAX_EFFECT // align * align
        pieces = self._pieces(start, end - start, step)
        await _gather(edges + [self._request(Cmd.WRITE_ZEROES, pos, n, flags) for pos, n in pieces])

    async def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        """TRIM (discard): a hint; unaligned edges are left alone."""
        self._check_range(count, offset)
        self._check_writable("trim", TransmissionFlag.SEND_TRIM)
        align = self.alignment
        start, end = -(-offset // align) * align, (offset + count) // align * align
        flags = CmdFlag.FUA if fua and self.can_fua else 0
        step = MAX_EFFECT // align * align
        if start < end:
            await _gather([self._request(Cmd.TRIM, pos, n, flags) for pos, n in self._pieces(start, end - start, step)])

    async def flush(self) -> None:
        if not self.can_flush:
            raise NBDError(errno.ENOTSUP, "flush: the server does not support it")
        await self._request(Cmd.FLUSH)

    async def cache(self, count: int, offset: int) -> None:
        """CACHE: ask the server to prefetch a range."""
        self._check_range(count, offset)
        if not self.can_cache:
            raise NBDError(errno.ENOTSUP, "cache: the server does not support it")
        align = self.alignment
        start = offset - offset % align
        end = min(-(-(offset + count) // align) * align, self.size)
        step = min(MAX_EFFECT, self.max_payload)
        if start < end:
            await _gather([self._request(Cmd.CACHE, pos, n) for pos, n in self._pieces(start, end - start, step)])

    async def block_status(
        self, count: int, offset: int, contexts: Sequence[str] | None = None, *, req_one: bool = False
    ) -> dict[str, list[Extent]]:
        """One BLOCK_STATUS request: each context's extents from ``offset``, as the server gave them.

        The server may describe less than ``count`` bytes (ask again from where it stopped) or a
        little more; extents are clamped to the end of the export.
        """
        negotiated = self._need_transmission()
        if not negotiated.contexts:
            raise NBDError(errno.ENOTSUP, "block status: no meta context was negotiated")
        wanted = list(contexts) if contexts is not None else self.contexts
        for name in wanted:
            if name not in negotiated.contexts:
                raise ValueError(f"meta context {name!r} was not negotiated (have {self.contexts})")
        if offset < 0 or count <= 0 or offset >= self.size:
            raise ValueError(f"block status of [{offset}, {offset + count}) outside the export")
        count = min(count, self.size - offset, MAX_BLOCK_STATUS)
        pending = await self._request(Cmd.BLOCK_STATUS, offset, count, CmdFlag.REQ_ONE if req_one else 0)
        result: dict[str, list[Extent]] = {}
        for name in wanted:
            context_id = negotiated.contexts[name]
            raw = pending.extents.get(context_id)
            if raw is None:
                raise ProtocolViolation(f"block status reply has no extents for {name}")
            extents = []
            pos = offset
            for length, flags in raw:
                if pos >= self.size:
                    break
                length = min(length, self.size - pos)
                extents.append(Extent(pos, length, flags))
                pos += length
            result[name] = extents
        return result

    async def map_extents(
        self, contexts: Sequence[str] | None = None, offset: int = 0, count: int | None = None, *, req_one: bool = False
    ) -> dict[str, list[Extent]]:
        """Extents covering exactly ``[offset, offset+count)`` for each context, adjacent equal runs merged."""
        wanted = list(contexts) if contexts is not None else self.contexts
        end = self.size if count is None else min(self.size, offset + count)
        result: dict[str, list[Extent]] = {name: [] for name in wanted}
        async for step in self.iter_extents(wanted, offset, end - offset, req_one=req_one):
            for name, extents in step.items():
                _append_merged(result[name], extents)
        return result

    async def iter_extents(
        self, contexts: Sequence[str], offset: int = 0, count: int | None = None, *, req_one: bool = False
    ):
        """Yield, step by step, every context's extents over one common range, covering the request."""
        end = self.size if count is None else min(self.size, offset + count)
        pos = offset
        while pos < end:
            answer = await self.block_status(end - pos, pos, contexts, req_one=req_one)
            advance = min(ext[-1].end for ext in answer.values())
            advance = min(advance, end)
            if advance <= pos:
                raise ProtocolViolation("block status reply made no progress")
            yield {name: _clip(extents, pos, advance) for name, extents in answer.items()}
            pos = advance

    # -- transmission: receiving -----------------------------------------------------------------

    def _retire(self, cookie: int) -> None:
        """The reply to ``cookie`` has been received: its slot is free for another request."""
        del self._pending[cookie]
        self._slots.release()
        if not self._pending:
            self._idle.set()

    def _fail(self, exc: BaseException) -> None:
        """The connection is unusable: fail everything pending and close it."""
        if self._dead is None:
            self._dead = exc
            if not self._disconnecting:
                log.debug("connection failed: %s", exc)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(exc)
                pending.future.exception()  # retrieved: nobody may be waiting for it any more
            self._slots.release()
        self._pending.clear()
        self._idle.set()
        self.channel.close()

    async def _read_replies(self) -> None:
        try:
            while True:
                await self._read_one_reply()
        except ConnectionClosed as exc:
            if self._disconnecting and not self._pending:
                self._fail(NBDConnectionError("disconnected"))
            else:
                self._fail(NBDConnectionError(f"server closed the connection: {exc}"))
        except ProtocolError as exc:
            violation = exc if isinstance(exc, ProtocolViolation) else ProtocolViolation(str(exc))
            log.error("protocol violation by the server, closing the connection: %s", exc)
            self._fail(violation)
        except (OSError, ssl.SSLError) as exc:
            self._fail(NBDConnectionError(f"connection error: {exc}"))
        except asyncio.CancelledError:
            self._fail(NBDConnectionError("connection closed"))
            raise
        except Exception as exc:  # a bug here must not leave requests waiting forever
            log.exception("NBD client reader crashed")
            self._fail(NBDConnectionError(f"internal error: {exc!r}"))

    def _lookup(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolViolation(f"reply for unknown cookie {cookie:#x}")
        return pending

    async def _read_one_reply(self) -> None:
        head = await self.reader.readexactly(SIMPLE_REPLY.size)
        (magic,) = U32.unpack_from(head)
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, cookie = SIMPLE_REPLY.unpack(head)
            pending = self._lookup(cookie)
            if error:
                pending.error = NBDError(error)
            elif pending.cmd == Cmd.READ:
                if self._structured:
                    raise ProtocolViolation("simple reply with data to a READ after structured replies")
                await self._receive_data(pending, 0, pending.length)
            elif pending.cmd == Cmd.BLOCK_STATUS:
                raise ProtocolViolation("simple success reply to BLOCK_STATUS")
            self._complete(cookie, pending)
            return
        if magic != STRUCTURED_REPLY_MAGIC:
            raise ProtocolViolation(f"bad reply magic {magic:#x}")
        if not self._structured:
            raise ProtocolViolation("structured reply chunk without structured replies negotiated")
        _, flags, kind, cookie, length = CHUNK_HEADER.unpack(head + await self.reader.readexactly(4))
        pending = self._lookup(cookie)
        if kind == Chunk.OFFSET_DATA:
            await self._offset_data(pending, length)
        elif kind == Chunk.OFFSET_HOLE:
            await self._offset_hole(pending, length)
        elif kind == Chunk.NONE:
            if length:
                raise ProtocolViolation("NBD_REPLY_TYPE_NONE with a payload")
            if not flags & ReplyFlag.DONE:
                raise ProtocolViolation("NBD_REPLY_TYPE_NONE without the DONE flag")
        elif kind == Chunk.BLOCK_STATUS:
            if pending.cmd != Cmd.BLOCK_STATUS:
                raise ProtocolViolation(f"block status chunk in reply to command {Cmd(pending.cmd).name}")
            if length > MAX_CHUNK_PAYLOAD:
                raise ProtocolViolation(f"block status chunk of {length} bytes")
            chunk = decode_block_status_chunk(await self.reader.readexactly(length))
            if chunk.context_id in pending.extents:
                raise ProtocolViolation(f"two block status chunks for context id {chunk.context_id}")
            if chunk.context_id not in self._context_names:
                log.warning("ignoring block status for unknown context id %d", chunk.context_id)
            else:
                pending.extents[chunk.context_id] = chunk.extents
        elif kind & 0x8000:
            if length > MAX_ERROR_CHUNK:
                raise ProtocolViolation(f"error chunk of {length} bytes")
            payload = await self.reader.readexactly(length)
            if kind in (Chunk.ERROR, Chunk.ERROR_OFFSET):
                error = decode_error_chunk(kind, payload)
                if error.offset is not None and not pending.offset <= error.offset < pending.offset + pending.length:
                    raise ProtocolViolation(f"error chunk offset {error.offset} outside the request")
                exc = NBDError(error.error, error.message)
            else:  # an error type we do not know: the request failed, the stream is still in sync
                code = U32.unpack_from(payload)[0] if len(payload) >= 4 else errno.EINVAL
                exc = NBDError(code or errno.EINVAL, f"unknown error chunk type {kind:#x}")
            if pending.error is None:
                pending.error = exc
        else:
            raise ProtocolViolation(f"unknown structured reply chunk type {kind}")
        if flags & ReplyFlag.DONE:
            self._complete(cookie, pending)

    async def _offset_data(self, pending: _Pending, length: int) -> None:
        if pending.cmd != Cmd.READ:
            raise ProtocolViolation(f"OFFSET_DATA chunk in reply to command {Cmd(pending.cmd).name}")
        if length <= 8 or length > MAX_CHUNK_PAYLOAD:
            raise ProtocolViolation(f"OFFSET_DATA chunk of bad length {length}")
        (offset,) = U64.unpack(await self.reader.readexactly(8))
        data_len = length - 8
        start = offset - pending.offset
        if start < 0 or start + data_len > pending.length:
            raise ProtocolViolation(
                f"OFFSET_DATA [{offset}, {offset + data_len}) outside the request "
                f"[{pending.offset}, {pending.offset + pending.length})"
            )
        await self._receive_data(pending, start, data_len)
        pending.covered.append((start, data_len))

    async def _receive_data(self, pending: _Pending, start: int, length: int) -> None:
        """Receive READ data for ``buffer[start:start+length]``; dropped if the caller gives up meanwhile."""
        if pending.buffer is None:
            await self.reader.skip(length)
            return
        await self.reader.readinto_revocable(pending.buffer[start : start + length], pending.is_abandoned)

    async def _offset_hole(self, pending: _Pending, length: int) -> None:
        if pending.cmd != Cmd.READ:
            raise ProtocolViolation(f"OFFSET_HOLE chunk in reply to command {Cmd(pending.cmd).name}")
        if length != OFFSET_HOLE.size:
            raise ProtocolViolation(f"OFFSET_HOLE chunk of bad length {length}")
        offset, hole = OFFSET_HOLE.unpack(await self.reader.readexactly(OFFSET_HOLE.size))
        start = offset - pending.offset
        if hole == 0 or start < 0 or start + hole > pending.length:
            raise ProtocolViolation(
                f"OFFSET_HOLE [{offset}, {offset + hole}) outside the request "
                f"[{pending.offset}, {pending.offset + pending.length})"
            )
        if pending.buffer is not None:  # else abandoned: nothing to fill
            _zero_fill(pending.buffer[start : start + hole])
        pending.covered.append((start, hole))

    def _complete(self, cookie: int, pending: _Pending) -> None:
        # validate before forgetting the request, so that a violation fails it along with the rest
        if pending.error is None and pending.cmd == Cmd.READ and self._structured:
            pos = 0
            for start, length in sorted(pending.covered):
                if start != pos:
                    kind = "overlapping" if start < pos else "missing"
                    raise ProtocolViolation(f"READ reply has {kind} data at offset {pending.offset + min(start, pos)}")
                pos = start + length
            if pos != pending.length:
                raise ProtocolViolation(f"READ reply is missing data at offset {pending.offset + pos}")
        if pending.error is None and pending.cmd == Cmd.BLOCK_STATUS:
            for context_id, extents in pending.extents.items():
                if len(extents) > 1 and sum(n for n, _ in extents[:-1]) >= pending.length:
                    raise ProtocolViolation(f"block status for context id {context_id} runs past the request")
        self._retire(cookie)
        future = pending.future
        if future.done():  # the caller gave up waiting (cancelled); the reply is consumed anyway
            log.debug("dropped the reply to abandoned request %#x (%s)", cookie, Cmd(pending.cmd).name)
            return
        if pending.error is not None:
            future.set_exception(pending.error)
        else:
            future.set_result(None)

    # -- closing -----------------------------------------------------------------------------

    async def disconnect(self) -> None:
        """Let pending requests finish, send NBD_CMD_DISC, and close (stopping a server we started)."""
        if self.opt_mode:
            await self.opt_abort()
            return
        if self._dead is None and self.negotiated is not None:
            self._disconnecting = True
            pending = [p.future for p in self._pending.values()]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            try:
                async with self._send_lock:
                    await self.channel.send([encode_request(0, Cmd.DISC, next(self._cookies), 0, 0)])
                if isinstance(self.channel, SocketChannel):
                    self.channel.sock.shutdown(socket.SHUT_WR)
                if self._reader_task is not None:
                    await asyncio.wait_for(asyncio.shield(self._reader_task), DISCONNECT_TIMEOUT)
            except (OSError, TimeoutError, ssl.SSLError):
                pass
        await self.close()

    async def close(self) -> None:
        """Close at once, failing whatever is still pending."""
        if self._in_options and self._dead is None:  # still negotiating: say goodbye properly
            self._in_options = False
            try:
                await asyncio.wait_for(self.channel.send([OptionRequest(Opt.ABORT).encode()]), 1.0)
            except (OSError, TimeoutError, ssl.SSLError):
                pass
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._fail(NBDConnectionError("connection closed"))
        if self.owns_endpoint:
            await self.endpoint.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        if exc[0] is None:
            await self.disconnect()
        else:
            await self.close()


def _clip(extents: list[Extent], start: int, end: int) -> list[Extent]:
    out = []
    for ext in extents:
        lo, hi = max(ext.offset, start), min(ext.end, end)
        if lo < hi:
            out.append(Extent(lo, hi - lo, ext.flags))
    return out


def _append_merged(into: list[Extent], extents: list[Extent]) -> None:
    for ext in extents:
        if into and into[-1].flags == ext.flags and into[-1].end == ext.offset:
            into[-1] = Extent(into[-1].offset, into[-1].length + ext.length, ext.flags)
        else:
            into.append(ext)


async def _gather(coros: list) -> None:
    """Run requests concurrently; on failure, let the others finish and raise the first error."""
    if len(coros) == 1:
        await coros[0]
        return
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


# -- connecting --------------------------------------------------------------------------------


def make_endpoint(target: str | NBDURI | Sequence[str], command_mode: str = "activation") -> tuple[Endpoint, NBDURI]:
    """An endpoint and the URI describing it, from a URI or a server command line."""
    if isinstance(target, str):
        target = parse_uri(target)
    if isinstance(target, NBDURI):
        if target.transport == "unix":
            assert target.socket_path is not None  # parse_uri refuses a unix URI without ?socket=
            return UnixEndpoint(target.socket_path), target
        return TCPEndpoint(target.host, target.port), target
    argv = list(target)
    if command_mode == "stdio":
        endpoint: Endpoint = StdioCommand(argv)
    elif command_mode == "activation":
        endpoint = ActivatedCommand(argv)
    else:
        raise ValueError(f"unknown command mode {command_mode!r} (activation or stdio)")
    return endpoint, NBDURI("unix", socket_path="(command)")


def _tls_setup(
    uri: NBDURI, tls: str | None, tls_certificates: str | None, tls_verify_peer: bool | None
) -> tuple[str, ssl.SSLContext | None, str | None]:
    mode = tls or ("require" if uri.tls else "off")
    if mode not in ("off", "on", "require"):
        raise ValueError(f"tls must be off, on or require, not {mode!r}")
    if mode == "off":
        return mode, None, None
    directory = tls_certificates or uri.tls_certificates
    verify = uri.tls_verify_peer if tls_verify_peer is None else tls_verify_peer
    context = client_context(directory, verify_server=verify)
    hostname = uri.tls_hostname or (uri.host if uri.transport == "tcp" else None)
    if hostname is None and context.check_hostname:
        context.check_hostname = False  # Unix socket: the certificate chain is still verified
    return mode, context, hostname


async def connect(
    target: str | NBDURI | Sequence[str],
    *,
    export: str | None = None,
    meta_contexts: Sequence[str] = (),
    tls: str | None = None,
    tls_certificates: str | None = None,
    tls_verify_peer: bool | None = None,
    structured_replies: bool = True,
    opt_mode: bool = False,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    command_mode: str = "activation",
    endpoint: Endpoint | None = None,
) -> Client:
    """Connect and negotiate.

    ``target`` is an NBD URI (``nbd://host:port/export``, ``nbd+unix:///export?socket=PATH``,
    ``nbds://...`` with ``tls-certificates=DIR``) or a server command line (a list) that is
    started with socket activation (``command_mode="stdio"``: inetd style on stdin/stdout).
    ``meta_contexts`` are selected with SET_META_CONTEXT (those the server knows end up in
    :attr:`Client.contexts`). ``tls``: "off", "on" (if the server agrees) or "require"; default
    from the URI scheme. With ``opt_mode`` the client stops before GO so that ``opt_list``,
    ``opt_info``, ``opt_list_meta_context`` and finally ``opt_go`` or ``opt_abort`` can be called.
    """
    made, uri = make_endpoint(target, command_mode)
    owns = endpoint is None
    endpoint = endpoint or made
    mode, context, hostname = _tls_setup(uri, tls, tls_certificates, tls_verify_peer)
    try:
        sock = await endpoint.open()
    except BaseException:
        if owns:
            await endpoint.close()
        raise
    client = Client(SocketChannel(sock), endpoint, max_requests=max_requests)
    client.owns_endpoint = owns
    client.uri = uri
    try:
        name = uri.export if export is None else export
        await client._handshake(name, meta_contexts, mode, context, hostname, opt_mode, structured_replies)
    except (ConnectionClosed, ConnectionResetError) as exc:
        why = await _command_exit_status(endpoint)
        await client.close()
        raise NBDConnectionError(why or f"server closed the connection during negotiation: {exc}") from exc
    except ProtocolError as exc:
        await client.close()
        raise ProtocolViolation(str(exc)) from exc
    except BaseException:
        await client.close()
        raise
    return client


async def _command_exit_status(endpoint: Endpoint) -> str | None:
    """Why a server we started hung up: it exited (it usually has just printed why on stderr)."""
    proc = getattr(endpoint, "proc", None)
    if proc is None:
        return None
    try:
        status = await asyncio.wait_for(asyncio.to_thread(proc.wait), 5.0)
    except TimeoutError:
        return None
    return f"the server command exited with status {status}: {endpoint.description}"


__all__ = ["BASE_ALLOCATION", "Client", "Extent", "connect", "format_uri", "make_endpoint"]
