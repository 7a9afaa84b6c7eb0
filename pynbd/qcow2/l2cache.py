"""A write-back LRU cache of L2 tables.

Tables are ``array('Q')`` in host order (for extended L2 entries, pairs of entry and subcluster
bitmap). A dirty table may only reach the disk after the refcounts of the clusters it points at,
so evicting a dirty table goes through the owner's ordered write-back (``writeback``), never a
plain write.

Callers hold the owner's metadata lock (so no two loads or write-backs of a table overlap), and
the cache is careful across its own awaits all the same: a table is only dropped while it
is clean and not pinned (a caller that changes a table after an ``await`` pins it for that long,
so the table it marks dirty is still the cached one); a table's dirty flag is cleared *before*
its write starts (a change made meanwhile, or a failed write, leaves it dirty); and a load that
finds the table cached by the time its read returns keeps the cached copy.
"""

from __future__ import annotations

import errno
from array import array
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pynbd.nodes.base import BlockError

if TYPE_CHECKING:
    from pynbd.nodes.base import Storage
from pynbd.qcow2.layout import table_from_bytes, table_to_bytes

DEFAULT_CACHE_BYTES = 8 << 20
MIN_TABLES = 2  # qemu's MIN_L2_CACHE_SIZE


def cached_tables(cache_bytes: int | None, cluster_size: int) -> int:
    """How many L2 tables a cache of ``cache_bytes`` holds (None: the default), at least qemu's 2."""
    if cache_bytes is None:
        return max(16, DEFAULT_CACHE_BYTES // cluster_size)
    return max(MIN_TABLES, cache_bytes // cluster_size)


class L2Cache:
    def __init__(
        self,
        file: Storage | Callable[[], Storage],
        cluster_size: int,
        writeback: Callable[[], Awaitable[None]],
        max_tables: int | None = None,
    ) -> None:
        self._file = file if callable(file) else (lambda: file)
        self.cluster_size = cluster_size
        self.writeback = writeback
        #: a soft limit: when every table is pinned, the cache grows rather than drop one in use
        self.max_tables = max_tables or cached_tables(None, cluster_size)
        self.tables: OrderedDict[int, array] = OrderedDict()
        self.dirty: set[int] = set()
        self._pins: Counter[int] = Counter()

    @property
    def file(self) -> Storage:
        return self._file()

    async def get(self, offset: int) -> array:
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table
        buf = bytearray(self.cluster_size)
        await self.file.read_into(offset, memoryview(buf))
        await self._make_room()
        table = self.tables.get(offset)
        if table is not None:  # loaded (and perhaps changed) by someone else meanwhile: theirs counts
            self.tables.move_to_end(offset)
            return table
        table = table_from_bytes(buf)
        self.tables[offset] = table
        return table

    async def insert(self, offset: int, table: array, dirty: bool = False) -> None:
        """Cache a table that is not on disk yet (a new one: ``dirty``)."""
        await self._make_room()
        self.tables[offset] = table
        if dirty:
            self.dirty.add(offset)

    async def _make_room(self) -> None:
        """Drop the least recently used clean, unpinned table; if there is none, write every
        dirty table back (in the owner's safe order) once and look again."""
        wrote_back = False
        while len(self.tables) >= self.max_tables:
            victim = next((off for off in self.tables if off not in self.dirty and not self._pins[off]), None)
            if victim is not None:
                del self.tables[victim]
                continue
            if wrote_back or not self.dirty:
                return  # every table is pinned, or changed again as soon as written
            await self.writeback()
            wrote_back = True

    @contextmanager
    def pinned(self, offset: int) -> Iterator[None]:
        """Keep the table at ``offset`` cached while the caller works on it across awaits."""
        self._pins[offset] += 1
        try:
            yield
        finally:
            self._pins[offset] -= 1
            if not self._pins[offset]:
                del self._pins[offset]

    def mark_dirty(self, offset: int) -> None:
        if offset not in self.tables:  # the change was made to a table the cache no longer holds
            raise BlockError(errno.EIO, f"qcow2: internal error: L2 table {offset:#x} changed after eviction")
        self.dirty.add(offset)

    async def write_dirty(self) -> bool:
        """Write every dirty table as it is now. True if anything was written."""
        offsets = sorted(self.dirty)
        self.dirty.clear()
        for n, offset in enumerate(offsets):
            try:
                await self.file.write(offset, table_to_bytes(self.tables[offset]))  # dirty tables stay cached
            except BaseException:
                self.dirty.update(offsets[n:])
                raise
        return bool(offsets)
