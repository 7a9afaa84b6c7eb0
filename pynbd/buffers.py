"""Payload buffers and the budgets that bound them.

Clients send requests of a few uniform sizes; handing the same buffers back out avoids a fresh
allocation, and the page faults of first touch, for every multi-MiB payload. The server keeps
one :class:`BufferPool` for all its connections and bounds two things separately:

- the bytes of buffers in use (payloads received and not yet written, read data not yet sent):
  a :class:`ByteBudget` that a connection waits on (backpressure) before it takes a buffer;
- the bytes of free buffers kept for reuse: the pool's ``cache_limit``; the server empties the pool
  once it has had no client for a moment, so memory goes back to the system when it is idle.

Buffers come in size classes (four per power of two, so at most a quarter is wasted) rather than
exact sizes, so a client that varies its request sizes still reuses buffers. Classes from 64 KiB
up are anonymous private mmaps: freeing one unmaps it at once. A ``bytearray`` would come from
malloc, whose dynamic mmap threshold rises with the first large free, after which multi-MiB
buffers are carved from the heap and stay in the process's RSS when freed.
"""

from __future__ import annotations

import asyncio
import mmap
from collections import OrderedDict, deque

SMALLEST_CLASS = 512
MMAP_CLASS = 64 * 1024  # classes from this size up are mmapped


def size_class(size: int) -> int:
    """The buffer size that serves ``size`` bytes: 512, or a power of two plus a multiple of a
    quarter of it (4096, 5120, 6144, 7168, 8192, ...); powers of two are their own class."""
    if size <= SMALLEST_CLASS:
        return SMALLEST_CLASS
    step = 1 << max((size - 1).bit_length() - 3, 0)  # a quarter of the power of two below size
    return -(-size // step) * step


def _allocate(capacity: int) -> bytearray | mmap.mmap:
    if capacity >= MMAP_CLASS:
        return mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return bytearray(capacity)


class BufferPool:
    """Reusable buffers in size classes; at most ``cache_limit`` bytes of free ones are kept."""

    def __init__(self, cache_limit: int = 32 * 1024 * 1024) -> None:
        self.cache_limit = cache_limit
        self._free: OrderedDict[int, list[bytearray | mmap.mmap]] = OrderedDict()  # least recently returned first
        self.cached = 0

    def get(self, size: int) -> memoryview:
        """A writable view of exactly ``size`` bytes; its contents are whatever was there before."""
        capacity = size_class(size)
        free = self._free.get(capacity)
        if free:
            self.cached -= capacity
            buf = free.pop()  # an emptied class keeps its (empty) list: the next put needs no new one
        else:
            buf = _allocate(capacity)
        return memoryview(buf)[:size]

    def put(self, view: memoryview) -> None:
        """Take back a view that :meth:`get` gave out (its caller is done with the bytes)."""
        buf = view.obj
        capacity = len(buf)  # type: ignore[arg-type]  # get() only gives out views of our buffers
        if capacity > self.cache_limit:
            return
        if self.cached + capacity > self.cache_limit:
            self._make_room(capacity)
        free = self._free.get(capacity)
        if free is None:
            free = self._free[capacity] = []
        else:
            self._free.move_to_end(capacity)
        free.append(buf)  # type: ignore[arg-type]
        self.cached += capacity

    def _make_room(self, capacity: int) -> None:
        """Forget free buffers, stalest class first, until ``capacity`` more bytes fit."""
        for stale_capacity, stale in list(self._free.items()):
            while stale and self.cached + capacity > self.cache_limit:
                stale.pop()
                self.cached -= stale_capacity
            if not stale:
                del self._free[stale_capacity]
            if self.cached + capacity <= self.cache_limit:
                return

    def clear(self) -> None:
        """Forget every free buffer (their memory goes back to the system)."""
        self._free.clear()
        self.cached = 0


class ByteBudget:
    """A count of bytes that callers take before they hold memory and give back after.

    :meth:`take` waits while the bytes in use plus the request would pass ``limit``; waiters are
    served in order, so a large request is not starved by a stream of small ones. A request
    larger than the whole limit is let through when nothing else is in use, so any single
    request can make progress whatever the limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def try_take(self, size: int) -> bool:
        """Take ``size`` bytes if that needs no wait (the hot path: no task switch, no future)."""
        used = self.used
        if (used + size <= self.limit or not used) and not self._waiters:
            self.used = used + size
            return True
        return False

    async def take(self, size: int) -> None:
        if self.try_take(size):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((size, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(size)  # granted just as we were cancelled: hand it on
            else:
                self._waiters.remove((size, waiter))
                self._grant()  # we may have been the one holding up those behind us
            raise

    def release(self, size: int) -> None:
        self.used -= size
        if self._waiters:
            self._grant()

    def _grant(self) -> None:
        while self._waiters:
            size, waiter = self._waiters[0]
            if self.used + size > self.limit and self.used:
                return
            self._waiters.popleft()
            self.used += size
            waiter.set_result(None)
