"""Several connections to one export, used as one: for servers that advertise multi-conn.

With NBD_FLAG_CAN_MULTI_CONN a FLUSH on any connection covers the writes already answered on all
of them, so requests can be spread freely and one flush at the end suffices. Without it the pool
keeps a single connection, as nbdcopy does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pynbd.client.client import Client, Extent, connect


class ClientPool:
    """Spreads requests over its connections, each request to the least busy one."""

    def __init__(self, clients: list[Client]) -> None:
        if not clients:
            raise ValueError("a pool needs at least one connection")
        self.clients = clients

    @property
    def primary(self) -> Client:
        return self.clients[0]

    def __getattr__(self, name: str):
        # size, flags, can_*, contexts, block_size, ...: the same on every connection
        return getattr(self.clients[0], name)

    def pick(self) -> Client:
        return min(self.clients, key=lambda c: c.in_flight)

    async def pread(self, count: int, offset: int, **kw) -> bytes:
        return await self.pick().pread(count, offset, **kw)

    async def pread_into(self, buf, offset: int, **kw) -> None:
        await self.pick().pread_into(buf, offset, **kw)

    async def pwrite(self, buf, offset: int, **kw) -> None:
        await self.pick().pwrite(buf, offset, **kw)

    async def zero(self, count: int, offset: int, **kw) -> None:
        await self.pick().zero(count, offset, **kw)

    async def trim(self, count: int, offset: int, **kw) -> None:
        await self.pick().trim(count, offset, **kw)

    async def cache(self, count: int, offset: int) -> None:
        await self.pick().cache(count, offset)

    async def block_status(self, count: int, offset: int, contexts: Sequence[str] | None = None, **kw):
        return await self.pick().block_status(count, offset, contexts, **kw)

    async def map_extents(self, *args, **kw) -> dict[str, list[Extent]]:
        return await self.pick().map_extents(*args, **kw)

    async def flush(self) -> None:
        await self.clients[0].flush()

    async def disconnect(self) -> None:
        await asyncio.gather(*(c.disconnect() for c in self.clients), return_exceptions=True)
        await self.clients[0].endpoint.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        await self.clients[0].endpoint.close()

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc) -> None:
        await (self.disconnect() if exc[0] is None else self.close())


async def connect_pool(target, connections: int = 1, **kwargs) -> ClientPool:
    """Open one connection, and up to ``connections`` if the server advertises multi-conn."""
    first = await connect(target, **kwargs)
    clients = [first]
    if connections > 1 and first.can_multi_conn and first.endpoint.reusable:
        first.owns_endpoint = False
        results = await asyncio.gather(
            *(connect(target, endpoint=first.endpoint, **kwargs) for _ in range(connections - 1)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
                for other in results:
                    if isinstance(other, Client):
                        await other.close()
                await first.endpoint.close()
                raise result
            clients.append(result)
    return ClientPool(clients)
