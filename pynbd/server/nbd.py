"""The asyncio NBD server: sockets in, the sans-I/O core in the middle, block nodes out.

One task per connection reads requests in order; each request then runs as its own task, so
replies go out as soon as they are ready (out of order), serialised by a per-connection lock.

Memory is bounded against hostile and careless clients alike (docs/protocol.md, "Limits"): a
connection may have at most ``max_connection_bytes`` of READ/WRITE payload in flight, after which
its reader stops reading (backpressure, never an error); every payload buffer comes from one pool
whose bytes in use are capped for the whole server; and the read data a connection holds unsent
is capped by a small window, so a client that does not read its replies stalls only itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from typing import cast

from pynbd.buffers import BufferPool, ByteBudget, size_class
from pynbd.channel import BufferedReader, Channel, ConnectionClosed, SocketChannel, TLSChannel
from pynbd.nodes.base import BlockError, NotFast
from pynbd.priority import foreground
from pynbd.protocol.constants import (
    ALLOWED_CMD_FLAGS,
    MAX_OPTION_LENGTH,
    Cmd,
    CmdFlag,
    Errno,
    State,
)
from pynbd.protocol.negotiation import Action, ServerNegotiation, Session, TLSMode
from pynbd.protocol.wire import (
    CLIENT_FLAGS,
    OPTION_HEADER,
    REQUEST,
    ProtocolError,
    decode_option_header,
    decode_request,
    encode_block_status_chunk,
    encode_error_chunk,
    encode_none_chunk,
    encode_offset_data_header,
    encode_offset_hole,
    encode_simple_reply,
)
from pynbd.server.export import Export, ExportRegistry

log = logging.getLogger("pynbd.server")

MiB = 1024 * 1024
MAX_IN_FLIGHT = 64  # requests of one connection being served at once (bounds tasks)
MAX_EXTENTS = 128 * 1024  # descriptors per block-status chunk, as qemu caps it
SMALL_READ = 64 * 1024  # reads up to this size are answered from a buffer, in one data chunk

# Limits (documented in docs/protocol.md, "Limits"; `pynbd serve` options and nbd-server-start
# arguments set them).
DEFAULT_MAX_CONNECTIONS = 100  # qemu's nbd-server-start default since the CVE-2024-7409 fix
HANDSHAKE_LIMIT = 10.0  # seconds to finish negotiation, as qemu-nbd and qemu-storage-daemon
MAX_CONNECTION_BYTES = 64 * MiB  # READ/WRITE payload bytes one connection may have in flight
BUFFER_LIMIT = 128 * MiB  # payload buffers in use at once, all connections together
BUFFER_CACHE = 32 * MiB  # free buffers kept for reuse while clients are connected (at most)
REPLY_WINDOW = 8 * MiB  # read data one connection may hold in buffers, not yet sent
IDLE_TRIM = 2.0  # seconds without clients after which the free buffers go back to the system
LISTEN_BACKLOG = 4096  # SOMAXCONN, as qemu-nbd and nbdkit (the kernel caps it at net.core.somaxconn)

# The hot path tests flags with plain ints: ``int & IntFlag`` goes through enum's Python-level
# __rand__ (about 2 µs each, five per request: a tenth of a 4 KiB read's time in the server).
_FUA, _DF, _NO_HOLE = int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.NO_HOLE)
_FAST_ZERO, _REQ_ONE, _STATE_ZERO = int(CmdFlag.FAST_ZERO), int(CmdFlag.REQ_ONE), int(State.ZERO)
_ALLOWED_FLAGS = {int(cmd): int(flags) for cmd, flags in ALLOWED_CMD_FLAGS.items()}
_READ, _WRITE, _DISC = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC)

# Host errno -> NBD error, as qemu maps them (anything else becomes EINVAL... or EIO for I/O)
_ERRNO_MAP = {
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(err: int | None) -> int:
    return _ERRNO_MAP.get(err or errno.EIO, Errno.EINVAL)


class ClientGone(Exception):
    """The client's socket failed under a send: nothing more can be answered on this connection."""


class RequestError(Exception):
    """A request the export refuses; answered with ``error`` and ``message``."""

    def __init__(self, error: Errno, message: str) -> None:
        super().__init__(message)
        self.error = error


@dataclass
class ServerConfig:
    tls_mode: TLSMode = TLSMode.OFF
    tls_context: ssl.SSLContext | None = None
    #: clients served at once (0: no limit); later ones wait unaccepted, as with qemu-nbd -e
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: seconds a client has to finish negotiation (0: no limit)
    handshake_limit: float = HANDSHAKE_LIMIT
    #: READ/WRITE payload bytes one connection may have in flight before its reader waits
    max_connection_bytes: int = MAX_CONNECTION_BYTES
    #: payload buffer bytes in use at once across all connections
    buffer_limit: int = BUFFER_LIMIT


class NBDServer:
    """Serves the exports of a registry on any number of listening sockets."""

    def __init__(self, registry: ExportRegistry, config: ServerConfig | None = None) -> None:
        self.registry = registry
        self.config = config or ServerConfig()
        self.connections: set[ServerConnection] = set()
        self._listeners: list[asyncio.Task] = []
        self._sockets: list[socket.socket] = []
        self._slot_freed = asyncio.Event()
        self.client_gone = asyncio.Event()  # set whenever a client's connection ends (for --once)
        self.closing = False
        self.buffers = BufferPool(cache_limit=min(BUFFER_CACHE, self.config.buffer_limit))
        #: bytes of pool buffers in use (payloads and read data), all connections together
        self.memory = ByteBudget(self.config.buffer_limit)
        self._trim: asyncio.TimerHandle | None = None

    # -- listening ------------------------------------------------------------------------------

    def listen_unix(self, path: str) -> socket.socket:
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        return self.listen_socket(sock)

    def listen_tcp(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return self.listen_socket(sock)

    def listen_socket(self, sock: socket.socket) -> socket.socket:
        """Serve on a socket that is bound (or already listening, as with socket activation: listening
        again only raises its backlog, so a storm of connects is queued, not refused)."""
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self._sockets.append(sock)
        self._listeners.append(asyncio.create_task(self._accept_loop(sock)))
        return sock

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._free_slot()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if self.closing:
                    return
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)  # e.g. EMFILE: back off instead of spinning
                continue
            await self._free_slot()  # another listening socket may have taken the slot meanwhile
            connection = ServerConnection(self, SocketChannel(conn))
            self.connections.add(connection)
            connection.task = asyncio.create_task(self._run_connection(connection))

    async def _free_slot(self) -> None:
        """Wait until a client may be served. At the limit nothing is accepted, as qemu-nbd -e and
        qemu's nbd-server-start do it: further clients wait in the listen backlog, connected but
        not greeted, until a served client leaves."""
        limit = self.config.max_connections
        while limit and len(self.connections) >= limit:
            self._slot_freed.clear()
            await self._slot_freed.wait()

    async def _run_connection(self, connection: ServerConnection) -> None:
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            self._slot_freed.set()
            self.client_gone.set()
            if not self.connections:
                # idle: give the cached buffers back to the system, unless a client comes soon (a
                # tool reconnecting would otherwise fault every buffer in again: first touch is slow)
                if self._trim is not None:
                    self._trim.cancel()
                self._trim = asyncio.get_running_loop().call_later(IDLE_TRIM, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim = None
        if not self.connections:
            self.buffers.clear()

    # -- shutdown -------------------------------------------------------------------------------

    async def stop_listening(self) -> None:
        self.closing = True
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        for sock in self._sockets:
            if sock.family == socket.AF_UNIX:
                try:
                    path = sock.getsockname()
                    if path and os.path.exists(path):
                        os.unlink(path)
                except OSError:
                    pass
            sock.close()
        self._listeners.clear()
        self._sockets.clear()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, then close every connection."""
        await self.stop_listening()
        await asyncio.gather(*(c.stop() for c in list(self.connections)), return_exceptions=True)
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None

    async def close_export(self, export: Export) -> None:
        """Disconnect the clients of one export (after in-flight requests finish)."""
        await asyncio.gather(*(c.stop() for c in list(self.connections) if c.export is export), return_exceptions=True)


class ServerConnection:
    """One client, from greeting to disconnect."""

    #: set when negotiation reaches transmission (``negotiated``); requests only exist after that
    session: Session
    export: Export

    def __init__(self, server: NBDServer, channel: SocketChannel) -> None:
        self.server = server
        self.channel: Channel = channel
        self.reader = BufferedReader(channel)
        self.negotiated = False
        self.task: asyncio.Task | None = None
        self._reply_lock = asyncio.Lock()
        self._in_flight: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        #: READ/WRITE bytes read from the client and not yet answered: the reader waits on it
        self._in_flight_bytes = ByteBudget(server.config.max_connection_bytes)
        #: bytes of read data (and block status replies) held in memory, not yet sent
        self._reply_window = ByteBudget(REPLY_WINDOW)
        self._waiting_for_memory: set[asyncio.Task] = set()
        self._stopping = False
        self._gone: OSError | None = None  # why a send failed: the client is gone
        self._reading: asyncio.Task | None = None
        self._mid_message = False  # a header announced a payload that has not fully arrived yet
        try:
            self.peer = str(channel.sock.getpeername() or "unix")
        except OSError:
            self.peer = "?"

    async def run(self) -> None:
        """Serve the client; whichever way it ends, the end is one line in the log."""
        try:
            limit = self.server.config.handshake_limit
            try:
                if limit:
                    await asyncio.wait_for(self._negotiate(), limit)
                else:
                    await self._negotiate()
            except TimeoutError:
                log.info("%s: negotiation not finished within %g s, disconnecting", self.peer, limit)
                return
            if self.negotiated:
                await self._transmission()
            if self._gone is not None:
                log.info("%s: client went away: %s", self.peer, _reason(self._gone))
        except ConnectionClosed as exc:
            if exc.partial or self._mid_message:  # a request or option was cut short: worth a warning
                log.warning("%s: client disconnected mid-message: %s", self.peer, exc)
            else:
                log.info("%s: client went away", self.peer)
        except ProtocolError as exc:
            log.warning("%s: protocol error, closing: %s", self.peer, exc)
        except ssl.SSLError as exc:
            log.warning("%s: TLS connection error, closing: %s", self.peer, exc)
        except ConnectionError as exc:  # reset, broken pipe: the client is gone
            if self._mid_message:
                log.warning("%s: client disconnected mid-message: %s", self.peer, _reason(exc))
            else:
                log.info("%s: client went away: %s", self.peer, _reason(exc))
        except OSError as exc:
            log.warning("%s: connection error: %s", self.peer, exc)
        except asyncio.CancelledError:
            pass
        finally:
            await self._finish()

    async def stop(self) -> None:
        """Graceful stop: no new requests; in-flight ones complete and are answered."""
        self._stopping = True
        if self._reading is not None:
            self._reading.cancel()
        elif not self.negotiated and self.task is not None:
            self.task.cancel()  # still negotiating: nothing to finish
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)

    async def _finish(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self.channel.close()

    def _lost(self, exc: OSError) -> None:
        """A send failed: stop reading, and stop requests that only wait for memory (requests in
        a node run to their end: a write's buffer may be in a worker thread's hands)."""
        if self._gone is None:
            self._gone = exc
            if self._reading is not None:
                self._reading.cancel()
            for task in self._waiting_for_memory:
                task.cancel()

    # -- negotiation ----------------------------------------------------------------------------

    async def _negotiate(self) -> None:
        config = self.server.config
        negotiation = ServerNegotiation(self.server.registry, config.tls_mode)
        negotiation.shutting_down = self.server.closing
        await self.channel.send([negotiation.greeting()])
        (flags,) = CLIENT_FLAGS.unpack(await self.reader.readexactly(CLIENT_FLAGS.size))
        negotiation.receive_client_flags(flags)
        memory = self.server.memory
        while True:
            option, length = decode_option_header(await self.reader.readexactly(OPTION_HEADER.size))
            if length > MAX_OPTION_LENGTH:
                raise ProtocolError(f"option {option} payload of {length} bytes is over the limit")
            self._mid_message = True
            if length:
                await memory.take(length)  # option payloads count with the server's buffers
            try:
                payload = await self.reader.readexactly(length) if length else b""
                self._mid_message = False
                outcome = negotiation.handle_option(option, payload)
                del payload
            finally:
                if length:
                    memory.release(length)
            log.debug("%s: option %d -> %s", self.peer, option, outcome.action.value)
            if outcome.replies:
                try:
                    await self.channel.send(outcome.replies)
                except ConnectionError:
                    if outcome.action is not Action.CLOSE:
                        raise
                    # a client may hang up right after NBD_OPT_ABORT without waiting for our ACK
            if outcome.action is Action.CLOSE:
                log.info("%s: closing during negotiation: %s", self.peer, outcome.reason)
                return
            if outcome.action is Action.STARTTLS:
                await self._start_tls()
                negotiation.tls_established()
            elif outcome.action is Action.TRANSMISSION:
                assert negotiation.session is not None  # TRANSMISSION is only reached with one
                self.session = negotiation.session
                self.export = cast(Export, self.session.export)  # our registry holds only Exports
                self.negotiated = True
                log.info("%s: serving export %r", self.peer, self.export.name)
                return

    async def _start_tls(self) -> None:
        context = self.server.config.tls_context
        assert context is not None and isinstance(self.channel, SocketChannel)
        tls = TLSChannel(self.channel, context, server_side=True, already_received=self.reader.take_buffered())
        await tls.handshake()
        self.channel = tls
        self.reader = BufferedReader(tls)

    # -- transmission ---------------------------------------------------------------------------

    async def _transmission(self) -> None:
        header = memoryview(bytearray(REQUEST.size))
        in_flight_bytes = self._in_flight_bytes
        max_payload = self.export.max_payload
        while not self._stopping and self._gone is None:
            self._reading = asyncio.current_task()
            try:
                await self.reader.readinto(header)
                request = decode_request(header)
                cmd = request.type
                # READ and WRITE payloads count against the connection's bytes in flight; at the
                # cap the reader waits here, reading nothing more, until replies have gone out
                cost = request.length if (cmd == _READ or cmd == _WRITE) and request.length <= max_payload else 0
                if cost and not in_flight_bytes.try_take(cost):
                    await in_flight_bytes.take(cost)
                payload = None
                if cmd == _WRITE:
                    self._mid_message = True
                    payload = await self._receive_payload(request)
                    self._mid_message = False
            except asyncio.CancelledError:
                if self._stopping or self._gone is not None:
                    return
                raise
            finally:
                self._reading = None
            if cmd == _DISC:
                log.info("%s: client disconnected", self.peer)
                return
            await self._slots.acquire()
            task = asyncio.create_task(self._handle(request, payload, cost))
            self._in_flight.add(task)
            task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _take_memory(self, size: int) -> None:
        """Take ``size`` bytes of the server's buffer budget, waiting (cancellably, should the
        client go away meanwhile) while other connections hold it. Callers try
        ``memory.try_take`` first: most of the time it succeeds and no coroutine is made."""
        memory = self.server.memory
        if memory.try_take(size):
            return
        task = asyncio.current_task()
        assert task is not None
        self._waiting_for_memory.add(task)
        try:
            await memory.take(size)
        finally:
            self._waiting_for_memory.discard(task)

    def _release_buffer(self, buf: memoryview) -> None:
        capacity = size_class(len(buf))
        self.server.buffers.put(buf)
        self.server.memory.release(capacity)

    async def _receive_payload(self, request) -> memoryview | RequestError:
        """Read a WRITE payload; one we refuse is consumed anyway so the stream stays in sync."""
        length = request.length
        if length > self.export.max_payload:
            await self.reader.skip(length)
            return RequestError(Errno.EINVAL, f"write of {length} bytes is over the 32 MiB limit")
        charge = size_class(length)
        if not self.server.memory.try_take(charge):
            await self._take_memory(charge)
        payload = self.server.buffers.get(length)
        try:
            await self.reader.readinto(payload)
        except BaseException:
            self._release_buffer(payload)
            raise
        return payload

    async def _handle(self, request, payload: memoryview | RequestError | None, cost: int) -> None:
        cookie = request.cookie
        foreground.enter()
        try:
            try:
                if isinstance(payload, RequestError):
                    raise payload
                answered = await self._dispatch(request, payload)
            finally:
                if payload is not None and not isinstance(payload, RequestError):
                    self._release_buffer(payload)  # written: the buffer is free before the reply goes
            if not answered:
                await self._send([encode_simple_reply(0, cookie)])
        except (ClientGone, asyncio.CancelledError):
            pass  # the client is gone (logged once, by run); nothing to answer
        except RequestError as exc:
            level = logging.DEBUG if exc.error == Errno.ENOTSUP else logging.WARNING
            log.log(level, "%s: request %s refused: %s", self.peer, _describe(request), exc)
            await self._answer_error(cookie, exc.error, str(exc))
        except BlockError as exc:
            log.warning("%s: request %s failed: %s", self.peer, _describe(request), exc)
            await self._answer_error(cookie, nbd_errno(exc.errno), str(exc))
        except OSError as exc:  # from the node: the client's socket errors are ClientGone
            log.warning("%s: request %s failed: %s", self.peer, _describe(request), exc)
            await self._answer_error(cookie, nbd_errno(exc.errno), exc.strerror or str(exc))
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("%s: request %s crashed", self.peer, _describe(request))
            await self._answer_error(cookie, Errno.EIO, f"internal error: {exc.__class__.__name__}")
        finally:
            foreground.leave()
            if cost:
                self._in_flight_bytes.release(cost)

    async def _send(self, buffers) -> None:
        async with self._reply_lock:
            await self._transmit(buffers)

    async def _transmit(self, buffers) -> None:
        """Send under the reply lock; a socket error means the client is gone (:class:`ClientGone`)."""
        if self._gone is not None:
            raise ClientGone
        try:
            await self.channel.send(buffers)
        except OSError as exc:
            self._lost(exc)
            raise ClientGone from None

    async def _answer_error(self, cookie: int, error: int, message: str) -> None:
        try:
            if self.session.structured:
                await self._send([encode_error_chunk(cookie, error, message[:200])])
            else:
                await self._send([encode_simple_reply(error, cookie)])
        except ClientGone:
            pass

    def _check_request(self, request) -> None:
        export = self.export
        cmd, flags = request.type, request.flags
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            raise RequestError(Errno.EINVAL, f"unknown command {cmd}")
        if flags & ~allowed:
            raise RequestError(Errno.EINVAL, f"flags {flags:#x} not valid for command {Cmd(cmd).name}")
        if flags & _DF and not self.session.structured:
            raise RequestError(Errno.EINVAL, "DF requires structured replies")
        if cmd in (Cmd.FLUSH,):
            if request.offset or request.length:
                raise RequestError(Errno.EINVAL, "flush takes no offset or length")
            return
        writes = cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)
        if writes and export.read_only:
            raise RequestError(Errno.EPERM, "export is read-only")
        end = request.offset + request.length
        if end > export.size:
            error = Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
            raise RequestError(
                error, f"request [{request.offset}, {end}) is past the end of the export ({export.size})"
            )
        if cmd in (Cmd.READ, Cmd.CACHE) and request.length > export.max_payload:
            raise RequestError(Errno.EINVAL, f"request of {request.length} bytes is over the 32 MiB limit")
        if cmd == Cmd.BLOCK_STATUS:
            if not self.session.contexts:
                raise RequestError(Errno.EINVAL, "no meta context was negotiated")
            if request.length == 0:
                raise RequestError(Errno.EINVAL, "block status of zero length")

    async def _dispatch(self, request, payload) -> bool:
        """Carry out a request; True if it was answered here (reads, block status), False if it
        only needs the plain OK that :meth:`_handle` sends."""
        self._check_request(request)
        node = self.export.io
        cmd, flags = request.type, request.flags
        fua = bool(flags & _FUA)
        if cmd == _READ:
            if fua:
                await node.flush()
            await self._read(request)
            return True
        if cmd == _WRITE:
            await node.write(request.offset, payload, fua=fua)
        elif cmd == Cmd.WRITE_ZEROES:
            try:
                await node.write_zeroes(
                    request.offset,
                    request.length,
                    may_trim=not flags & _NO_HOLE,
                    fua=fua,
                    fast=bool(flags & _FAST_ZERO),
                )
            except NotFast as exc:
                raise RequestError(Errno.ENOTSUP, str(exc)) from None
        elif cmd == Cmd.TRIM:
            await node.discard(request.offset, request.length)
            if fua:
                await node.flush()
        elif cmd == Cmd.FLUSH:
            await node.flush()
        elif cmd == Cmd.CACHE:
            await node.cache(request.offset, request.length)
        elif cmd == Cmd.BLOCK_STATUS:
            await self._block_status(request)
            return True
        return False

    async def _hold_reply_memory(self, size: int) -> None:
        """Before reply data is put in memory: take it from the connection's reply window (a
        client that does not read its replies holds at most that much) and from the server's
        buffer budget."""
        window = self._reply_window
        if not window.try_take(size):
            await window.take(size)
        try:
            if not self.server.memory.try_take(size):
                await self._take_memory(size)
        except BaseException:
            window.release(size)
            raise

    def _drop_reply_memory(self, size: int) -> None:
        self._reply_window.release(size)
        self.server.memory.release(size)

    async def _read(self, request) -> None:
        node, cookie, offset, length = self.export.io, request.cookie, request.offset, request.length
        buffers = self.server.buffers
        if not self.session.structured:
            charge = size_class(length)
            await self._hold_reply_memory(charge)
            buf = buffers.get(length)
            try:
                await node.read_into(offset, buf)
                await self._send([encode_simple_reply(0, cookie), buf])
            finally:
                buffers.put(buf)
                self._drop_reply_memory(charge)
            return
        if length == 0:
            await self._send([encode_none_chunk(cookie)])
            return
        if length <= SMALL_READ:
            # Small reads: one data chunk, no allocation lookup (two lseeks cost more than the
            # zeroes they might save) and no sendfile (one sendmsg beats header + sendfile). At most
            # 64 requests of 64 KiB per connection: no reply window needed, only the server's budget.
            memory = self.server.memory
            charge = size_class(length)
            if not memory.try_take(charge):
                await self._take_memory(charge)
            buf = buffers.get(length)
            try:
                await node.read_into(offset, buf)
                await self._send([encode_offset_data_header(cookie, offset, length, True), buf])
            finally:
                buffers.put(buf)
                memory.release(charge)
            return
        if request.flags & _DF:
            extents = [(length, 0)]
        else:
            extents = await node.block_status(offset, length)
        # Read every data extent before sending anything, so an I/O error becomes a clean
        # error reply instead of a half-sent one; sendfile ranges go out while the lock is held.
        df = bool(request.flags & _DF)
        use_sendfile = length > SMALL_READ and self.export.node.can_sendfile and self.channel.supports_sendfile
        charge = 0
        if not use_sendfile:
            charge = sum(size_class(ext_len) for ext_len, state in extents if df or not state & _STATE_ZERO)
            await self._hold_reply_memory(charge)
        pieces: list[tuple[int, int, memoryview | None]] = []  # (offset, length, data); data None: hole
        pos = offset
        try:
            for ext_len, state in extents:
                data: memoryview | None = None
                if df or not state & _STATE_ZERO:
                    if use_sendfile:
                        data = _SENDFILE
                    else:
                        data = buffers.get(ext_len)
                        pieces.append((pos, ext_len, data))  # listed at once: put back whatever happens
                        await node.read_into(pos, data)
                        pos += ext_len
                        continue
                pieces.append((pos, ext_len, data))
                pos += ext_len
            # a sendfile reads the file while it sends: the whole reply is then a request in flight
            tracking = self.export.reading(offset, length) if use_sendfile else contextlib.nullcontext()
            async with tracking as source, self._reply_lock:
                for i, (pos, ext_len, piece) in enumerate(pieces):
                    done = i == len(pieces) - 1
                    if piece is None:
                        await self._transmit([encode_offset_hole(cookie, pos, ext_len, done)])
                    elif piece is _SENDFILE:
                        await self._transmit([encode_offset_data_header(cookie, pos, ext_len, done)])
                        await self._sendfile(source, pos, ext_len)
                    else:
                        await self._transmit([encode_offset_data_header(cookie, pos, ext_len, done), piece])
        finally:
            if charge:
                for _, _, piece in pieces:
                    if piece is not None:
                        buffers.put(piece)
                self._drop_reply_memory(charge)

    async def _sendfile(self, node, offset: int, length: int) -> None:
        fd, file_offset = node.sendfile_source(offset, length)
        try:
            await self.channel.sendfile(fd, file_offset, length)
        except (EOFError, OSError) as exc:
            # Part of a chunk is already on the wire: the stream cannot be repaired.
            if not isinstance(exc, ConnectionError):  # the file failed, not the client
                log.error("%s: sendfile failed mid-reply, disconnecting: %s", self.peer, exc)
            self.channel.close()
            self._lost(exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc)))
            raise ClientGone from None

    async def _block_status(self, request) -> None:
        offset, length = request.offset, request.length
        req_one = bool(request.flags & _REQ_ONE)
        answers: list[tuple[int, list[tuple[int, int]]]] = []
        for context_id, name in self.session.contexts.items():
            extents = await self.export.contexts[name](offset, length)
            if req_one:
                extents = extents[:1]
            answers.append((context_id, extents))
        # Too many descriptors: cut every context at the same offset so that all cover one range.
        if any(len(extents) > MAX_EXTENTS for _, extents in answers):
            cut = min(sum(ln for ln, _ in extents[:MAX_EXTENTS]) for _, extents in answers)
            answers = [(cid, _clip(extents, cut)) for cid, extents in answers]
        last = len(answers) - 1
        chunks = [
            encode_block_status_chunk(request.cookie, cid, extents, i == last)
            for i, (cid, extents) in enumerate(answers)
        ]
        del answers
        # a reply waiting for a client that does not read counts like read data
        size = sum(len(chunk) for chunk in chunks)
        await self._hold_reply_memory(size)
        try:
            await self._send(chunks)
        finally:
            self._drop_reply_memory(size)


_SENDFILE = memoryview(bytearray())  # marks a piece that is sent with sendfile rather than from a buffer


def _clip(extents: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    out = []
    for length, state in extents:
        if total <= 0:
            break
        out.append((min(length, total), state))
        total -= length
    return out


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or exc.__class__.__name__


def _describe(request) -> str:
    try:
        name = Cmd(request.type).name
    except ValueError:
        name = f"#{request.type}"
    return f"{name}(offset={request.offset}, length={request.length}, flags={request.flags:#x})"
