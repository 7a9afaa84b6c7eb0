"""Byte channels under the NBD server and client: a plain socket and TLS on top of it.

Both work on non-blocking sockets through the event loop directly (no asyncio streams) so that
payloads land in preallocated buffers (``recv_into``), go out scatter-gathered (``sendmsg``) and,
for raw files, straight from the page cache (``sendfile``). TLS runs ``ssl.SSLObject`` over
memory BIOs on the same socket, which is how STARTTLS upgrades a connection mid-stream.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import cast

Buffer = bytes | bytearray | memoryview
READ_CHUNK = 256 * 1024
UNIX_SNDBUF = 4 * 1024 * 1024
SMALL_READ = 4096  # reads up to this size are served from the receive buffer


class ConnectionClosed(ConnectionError):
    """The peer closed the connection; ``partial`` if it did so in the middle of a read."""

    def __init__(self, message: str = "connection closed by peer", partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


class SocketChannel:
    """A connected non-blocking socket."""

    supports_sendfile = True

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock.family == socket.AF_UNIX:
            # Unix sockets have no autotuning; a larger send buffer means fewer wake-ups per
            # multi-MiB read reply (TCP buffers are left to the kernel's autotuning).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.closed = False

    async def recv_into(self, view: memoryview) -> int:
        return await self.loop.sock_recv_into(self.sock, view)

    def recv_into_now(self, view: memoryview) -> int | None:
        """Receive what has arrived, at once: ``None`` if nothing has (0 is the peer's EOF).

        The bytes are written before this returns, never later from a callback, which is what
        lets a reader decide right up to the write whether the destination is still its to fill.
        """
        try:
            return self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return None

    async def wait_readable(self) -> None:
        """Wait until a receive may find data (or the EOF); touches no buffer."""
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_reader(fd, lambda: _wake(fut))
        try:
            await fut
        finally:
            self.loop.remove_reader(fd)

    async def _writable(self) -> None:
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_writer(fd, lambda: _wake(fut))
        try:
            await fut
        finally:
            self.loop.remove_writer(fd)

    async def send(self, buffers: Sequence[Buffer]) -> None:
        """Send every buffer in order, with as few system calls and copies as the kernel allows."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        while views:
            try:
                sent = self.sock.sendmsg(views[:512])
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of file ``fd`` from ``offset``; raises if the file ends first."""
        out = self.sock.fileno()
        while count:
            try:
                sent = os.sendfile(out, fd, offset, count)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            if sent == 0:
                raise EOFError("file ended before sendfile completed")
            offset += sent
            count -= sent

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class TLSChannel:
    """TLS over a :class:`SocketChannel`, driven through memory BIOs."""

    supports_sendfile = False

    def __init__(
        self,
        raw: SocketChannel,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
        already_received: bytes = b"",
    ) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        if already_received:
            self.incoming.write(already_received)
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side, server_hostname)
        self._recv_buf = bytearray(READ_CHUNK)
        self._send_lock = asyncio.Lock()

    @property
    def sock(self) -> socket.socket:
        return self.raw.sock

    async def _flush(self) -> None:
        if self.outgoing.pending:
            async with self._send_lock:
                data = self.outgoing.read()
                if data:
                    await self.raw.send([data])

    async def _fill(self) -> None:
        n = await self.raw.recv_into(memoryview(self._recv_buf))
        if n == 0:
            self.incoming.write_eof()
        else:
            self.incoming.write(memoryview(self._recv_buf)[:n])

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return _read_into(self.tls, view)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLEOFError:
                return 0

    def recv_into_now(self, view: memoryview) -> int | None:
        """As :meth:`SocketChannel.recv_into_now`: decrypt what has arrived into ``view``, or ``None``."""
        while True:
            try:
                return _read_into(self.tls, view)
            except ssl.SSLWantReadError:
                n = self.raw.recv_into_now(memoryview(self._recv_buf))
                if n is None:
                    return None
                if n == 0:
                    self.incoming.write_eof()
                else:
                    self.incoming.write(memoryview(self._recv_buf)[:n])
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0

    async def wait_readable(self) -> None:
        await self._flush()  # reading may have produced TLS records the peer waits for
        await self.raw.wait_readable()

    async def send(self, buffers: Sequence[Buffer]) -> None:
        for buf in buffers:
            view = memoryview(buf).cast("B")
            while view:
                n = self.tls.write(view)
                view = view[n:]
                if self.outgoing.pending > READ_CHUNK:
                    await self._flush()
        await self._flush()

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        raise NotImplementedError("sendfile cannot go through TLS")

    def close(self) -> None:
        try:
            self.tls.unwrap()
            data = self.outgoing.read()
            if data:
                self.raw.sock.send(data)
        except (ssl.SSLError, OSError, ValueError):
            pass
        self.raw.close()


Channel = SocketChannel | TLSChannel


class BufferedReader:
    """Reads exact amounts from a channel, batching small reads into one receive buffer.

    Headers come out of the buffer; large payloads are received straight into the caller's
    buffer after whatever was already buffered, so a 4 MiB WRITE is never copied twice.
    """

    def __init__(self, channel: Channel, size: int = 64 * 1024) -> None:
        self.channel = channel
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def take_buffered(self) -> bytes:
        """Hand over (and forget) bytes already received: used when TLS takes over the socket."""
        data = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        return data

    @property
    def buffered(self) -> int:
        return self._end - self._start

    async def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        n = await self.channel.recv_into(self._view[self._end :])
        if n == 0:
            if pending := self._end - self._start:
                raise ConnectionClosed(f"connection closed by peer {pending} bytes into a message", partial=True)
            raise ConnectionClosed()
        self._end += n

    async def _buffer_at_least(self, n: int) -> None:
        """Receive until ``n`` bytes (at most the buffer's size) are buffered."""
        while self._end - self._start < n:
            if len(self._buf) - self._start < n:  # not enough room after start: compact
                pending = self._end - self._start
                self._view[:pending] = self._view[self._start : self._end]
                self._start, self._end = 0, pending
            await self._fill()

    async def readexactly(self, n: int) -> bytes:
        if n > len(self._buf):
            out = bytearray(n)
            await self.readinto(memoryview(out))
            return bytes(out)
        await self._buffer_at_least(n)
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        return data

    async def readinto(self, view: memoryview) -> None:
        """Fill ``view`` completely.

        Small reads (request headers) go through the receive buffer, so one system call brings in
        every header a pipelining client has sent; large payloads bypass it after what is buffered.
        """
        if len(view) <= SMALL_READ:
            await self._buffer_at_least(len(view))
        have = min(self._end - self._start, len(view))
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
        done = have
        while done < len(view):
            n = await self.channel.recv_into(view[done:])
            if n == 0:
                if done:
                    raise ConnectionClosed(f"connection closed by peer after {done} of {len(view)} bytes", partial=True)
                raise ConnectionClosed()
            done += n

    async def readinto_revocable(self, view: memoryview, revoked: Callable[[], bool]) -> None:
        """Fill ``view`` as :meth:`readinto` does, for an owner that may take it back at any await.

        ``revoked()`` is asked right before every write into ``view``, and the write follows the
        answer without yielding to the event loop in between; once it says yes, the rest of the
        payload is received and dropped, so the stream stays in step and ``view`` is not touched
        again. (An NBD client's READ reply for a request whose caller was cancelled.)
        """
        size = len(view)
        if size <= SMALL_READ:
            await self._buffer_at_least(size)
            if not revoked():
                view[:] = self._view[self._start : self._start + size]
            self._start += size
            return
        done = min(self._end - self._start, size)
        if done and not revoked():
            view[:done] = self._view[self._start : self._start + done]
        self._start += done
        while done < size:
            if revoked():
                await self.skip(size - done)
                return
            n = self.channel.recv_into_now(view[done:])
            if n is None:
                await self.channel.wait_readable()
                continue
            if n == 0:
                raise ConnectionClosed(f"connection closed by peer after {done} of {size} bytes", partial=True)
            done += n

    async def skip(self, n: int) -> None:
        """Consume and drop ``n`` bytes (a payload we refuse but must stay in sync with)."""
        scratch = memoryview(bytearray(min(n, 1024 * 1024)))
        while n:
            step = min(n, len(scratch))
            await self.readinto(scratch[:step])
            n -= step


def _wake(future: asyncio.Future) -> None:
    """Resolve a readiness future once (the loop may report readiness again before it runs)."""
    if not future.done():
        future.set_result(None)


def _read_into(tls: ssl.SSLObject, view: memoryview) -> int:
    """SSLObject.read with a buffer returns the byte count (typeshed says bytes: it is the
    no-buffer form's type)."""
    return cast(int, tls.read(len(view), view))
