"""A write-back LRU cache of L2 tables.

Tables are ``array('Q')`` in host order (for extended L2 entries, pairs of entry and subcluster
bitmap). A dirty table may only reach the disk after the refcounts of the clusters it points at,
so evicting a dirty table goes through the owner's ordered write-back (``writeback``), never a
plain write.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from pynbd.nodes.base import BlockNode
from pynbd.qcow2.layout import table_from_bytes, table_to_bytes


class L2Cache:
    def __init__(
        self,
        file: BlockNode | Callable[[], BlockNode],
        cluster_size: int,
        writeback: Callable[[], Awaitable[None]],
        max_bytes: int = 8 << 20,
    ) -> None:
        self._file = file if callable(file) else (lambda: file)
        self.cluster_size = cluster_size
        self.writeback = writeback
        self.max_tables = max(16, max_bytes // cluster_size)
        self.tables: OrderedDict[int, array] = OrderedDict()
        self.dirty: set[int] = set()

    @property
    def file(self) -> BlockNode:
        return self._file()

    async def get(self, offset: int) -> array:
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table
        buf = bytearray(self.cluster_size)
        await self.file.read_into(offset, memoryview(buf))
        table = table_from_bytes(buf)
        await self.insert(offset, table)
        return table

    async def insert(self, offset: int, table: array, dirty: bool = False) -> None:
        if len(self.tables) >= self.max_tables:
            await self._evict()
        self.tables[offset] = table
        if dirty:
            self.dirty.add(offset)

    async def _evict(self) -> None:
        while len(self.tables) >= self.max_tables:
            victim = next((off for off in self.tables if off not in self.dirty), None)
            if victim is None:
                await self.writeback()  # writes every dirty table in the safe order
                continue
            del self.tables[victim]

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    async def write_dirty(self) -> bool:
        wrote = False
        for offset in sorted(self.dirty):
            table = self.tables.get(offset)
            if table is not None:
                await self.file.write(offset, table_to_bytes(table))
                wrote = True
        self.dirty.clear()
        return wrote

    def forget(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)
