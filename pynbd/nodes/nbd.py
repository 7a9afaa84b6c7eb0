"""The ``nbd`` driver: a node whose bytes live on a remote NBD export (nbdkit, qemu-nbd, pynbd).

It puts a remote server into the graph as qemu's nbd driver does: one connection, opened when the
node is opened and closed when it is closed, with many requests in flight on it (the asyncio
client of :mod:`pynbd.client` multiplexes them). Each node operation maps onto one NBD command:

- ``block_status`` is the remote ``base:allocation`` context, passed through unchanged (or, with
  qemu's unstable ``x-dirty-bitmap``, that context read as if it were base:allocation);
- ``write_zeroes`` is WRITE_ZEROES (NO_HOLE when trimming is not allowed, FAST_ZERO when asked),
  ``discard`` TRIM, ``flush`` FLUSH, ``cache`` CACHE; what the remote does not offer falls back
  as qemu's block layer would (zero buffers, no-op hints, write-then-flush for FUA);
- a refusal by the remote becomes :class:`BlockError` with the NBD errno, so the export in front
  of this node answers its own client with the same error; a lost connection is EIO.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Awaitable
from typing import Any, TypeVar

from pynbd.client import Client, NBDConnectionError, NBDError, OptionError, connect
from pynbd.client.uri import NBDURI
from pynbd.nodes.base import DATA, BlockError, BlockNode, Extent, NotFast, merge_extents
from pynbd.protocol.constants import BASE_ALLOCATION, State

log = logging.getLogger("pynbd.nodes.nbd")

T = TypeVar("T")
CONNECT_TIMEOUT = 30.0  # a server that accepts but never negotiates must not hang blockdev-add
ZERO_CHUNK = 1 << 20


class NBDNode(BlockNode):
    driver = "nbd"

    def __init__(
        self,
        uri: NBDURI,
        node_name: str = "",
        read_only: bool = False,
        auto_read_only: bool = False,
        dirty_bitmap: str | None = None,
        tls_certificates: str | None = None,
        tls_verify_peer: bool = True,
    ) -> None:
        super().__init__(node_name)
        self.target = uri
        self.read_only = read_only
        self.auto_read_only = auto_read_only
        self.context = dirty_bitmap or BASE_ALLOCATION
        self.tls_certificates = tls_certificates
        self.tls_verify_peer = tls_verify_peer
        self.client: Client | None = None
        self._has_context = False

    @property
    def uri(self) -> str:
        """The filename qemu shows for an nbd node (query-named-block-nodes)."""
        export = f"/{self.target.export}" if self.target.export else ""
        if self.target.transport == "unix":
            return f"nbd+unix://{export}?socket={self.target.socket_path}"
        return f"nbd://{self.target.host}:{self.target.port}{export}"

    @property
    def address(self) -> str:
        """The server's address as qemu names it in connection errors."""
        if self.target.transport == "unix":
            return str(self.target.socket_path)
        return f"{self.target.host}:{self.target.port}"

    async def open(self) -> None:
        """Connect and negotiate; raise BlockError with a message naming the server on failure."""
        where = self.address
        tls = "require" if self.target.tls else "off"
        try:
            self.client = await asyncio.wait_for(
                connect(
                    self.target,
                    meta_contexts=[self.context],
                    tls=tls,
                    tls_certificates=self.tls_certificates,
                    tls_verify_peer=self.tls_verify_peer,
                ),
                CONNECT_TIMEOUT,
            )
        except TimeoutError:
            raise BlockError(errno.ETIMEDOUT, f"Failed to connect to '{where}': negotiation timed out") from None
        except OptionError as exc:
            raise BlockError(errno.EINVAL, f"Requested export not available: {where}: {exc}") from None
        except (OSError, ConnectionError) as exc:
            detail = os.strerror(exc.errno) if exc.errno else str(exc)
            raise BlockError(exc.errno or errno.EIO, f"Failed to connect to '{where}': {detail}") from None
        except Exception as exc:  # TLS failures and protocol violations: the node cannot be used
            raise BlockError(errno.EIO, f"Failed to connect to '{where}': {exc}") from None
        self._has_context = self.context in self.client.contexts
        if self.client.read_only and not self.read_only:
            if not self.auto_read_only:
                await self.close()
                raise BlockError(errno.EACCES, "NBD export is read-only")  # qemu's words (bdrv_apply_auto_read_only)
            self.read_only = True
        if self.context != BASE_ALLOCATION and not self._has_context:
            await self.close()
            raise BlockError(errno.EINVAL, f"Requested dirty bitmap context {self.context!r} is not available")

    @property
    def size(self) -> int:
        return self.client.size if self.client is not None else 0

    def _need(self) -> Client:
        if self.client is None:
            raise BlockError(errno.EIO, f"nbd node {self.node_name!r} is not connected")
        return self.client

    async def _call(self, what: str, request: Awaitable[T]) -> T:
        """Run one client request, turning the client's exceptions into BlockError."""
        try:
            return await request
        except NBDError as exc:
            raise BlockError(exc.errno or errno.EIO, f"{self.uri}: {what}: {exc.message or exc.strerror}") from None
        except (NBDConnectionError, ConnectionError, OSError) as exc:
            raise BlockError(errno.EIO, f"{self.uri}: {what}: {exc}") from None

    async def read_into(self, offset: int, buf: memoryview) -> None:
        client = self._need()
        await self._call("read", client.pread_into(buf, offset))

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        client = self._need()
        await self._call("write", client.pwrite(data, offset, fua=fua and client.can_fua))
        if fua and not client.can_fua:
            await self.flush()

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, fast: bool = False
    ) -> None:
        client = self._need()
        if client.can_zero and (client.can_fast_zero or not fast):
            await self._call(
                "write zeroes",
                client.zero(length, offset, no_hole=not may_trim, fast=fast, fua=fua and client.can_fua),
            )
        elif fast:
            raise NotFast("the NBD server cannot zero fast")
        else:  # as qemu's block layer: fall back to writing zero buffers
            end = offset + length
            while offset < end:
                step = min(ZERO_CHUNK, end - offset)
                await self._call("write", client.pwrite(bytes(step), offset))
                offset += step
        if fua and not client.can_fua:
            await self.flush()

    async def discard(self, offset: int, length: int) -> None:
        client = self._need()
        if client.can_trim:  # a hint: nothing to do where the server has no TRIM
            await self._call("trim", client.trim(length, offset))

    async def flush(self) -> None:
        client = self.client
        if client is not None and client.can_flush and not client.closed:
            await self._call("flush", client.flush())

    async def cache(self, offset: int, length: int) -> None:
        client = self._need()
        if client.can_cache:
            await self._call("cache", client.cache(length, offset))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        client = self._need()
        if not self._has_context:  # qemu: a server without base:allocation reports everything as data
            return [(length, DATA)]
        # Ask for whole blocks of the server's minimum size, then cut back to the range asked for.
        align = client.alignment
        start = offset - offset % align
        end = min(-(-(offset + length) // align) * align, client.size)
        mapped = await self._call("block status", client.map_extents([self.context], start, end - start))
        extents = []
        for ext in mapped[self.context]:
            lo, hi = max(ext.offset, offset), min(ext.end, offset + length)
            if lo < hi:
                extents.append((hi - lo, ext.flags & int(State.HOLE | State.ZERO)))
        return merge_extents(extents)

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        """As qemu: a range is allocated in this node if it holds data or reads as zeroes."""
        extents = await self.block_status(offset, length)
        return merge_extents((n, 1 if not state & State.HOLE or state & State.ZERO else 0) for n, state in extents)

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if not self.read_only and client.can_flush and not client.closed:
                await client.flush()
        except Exception as exc:  # the server may be gone already; closing must still succeed
            log.warning("%s: flush before disconnect failed: %s", self.uri, exc)
        try:
            await client.disconnect()
        except Exception as exc:
            log.warning("%s: disconnect failed: %s", self.uri, exc)
            await client.close()

    def describe(self) -> str:
        return f"nbd export {self.uri!r}"


def target_from_options(server: dict[str, Any], export: str, tls: bool, tls_hostname: str | None) -> NBDURI:
    """An NBDURI from qemu's ``server`` (SocketAddress) and ``export`` options."""
    kind = server.get("type")
    if kind == "unix":
        if "path" not in server:
            raise BlockError(errno.EINVAL, "Parameter 'server.path' is missing")
        if server.get("abstract"):
            raise BlockError(errno.EINVAL, "abstract Unix sockets are not supported")
        return NBDURI("unix", export=export, socket_path=server["path"], tls=tls, tls_hostname=tls_hostname)
    if kind == "inet":
        for key in ("host", "port"):
            if key not in server:
                raise BlockError(errno.EINVAL, f"Parameter 'server.{key}' is missing")
        try:
            port = int(server["port"])
        except ValueError:
            raise BlockError(errno.EINVAL, f"Invalid port '{server['port']}' (pynbd needs a number)") from None
        return NBDURI("tcp", export=export, host=server["host"], port=port, tls=tls, tls_hostname=tls_hostname)
    raise BlockError(errno.EINVAL, f"NBD server address type '{kind}' is not supported (use unix or inet)")
