"""Reference counts: the refcount table, its blocks, cluster allocation and deferred freeing.

Why the order matters (the crash-safety rule qemu follows): a cluster's refcount must be on disk
before any L2 or L1 entry that points at it, and an entry must stop pointing at a cluster before
the cluster's refcount drops. Increments are therefore written in the first stage of the node's
write-back, and decrements are not applied at all until the L2/L1 tables that dropped the
references have been written (:meth:`Refcounts.free_later` queues them). A crash at any moment
then leaves at most clusters whose refcount is too high: leaks, which ``check -r leaks`` repairs,
never a referenced cluster that could be handed out twice.
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable

from pynbd.nodes.base import BlockError, BlockNode
from pynbd.qcow2.layout import OFFSET_MASK, REFT_RESERVED, Header, table_from_bytes, table_to_bytes

_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def decode_block(data: bytes, bits: int) -> array:
    """A refcount block as an array of counts (sub-byte widths unpacked, least significant bits first)."""
    if bits >= 8:
        return table_from_bytes(data, _TYPECODES[bits])
    mask = (1 << bits) - 1
    return array("B", [(byte >> shift) & mask for byte in data for shift in range(0, 8, bits)])


def encode_block(block: array, bits: int) -> bytes:
    if bits >= 8:
        return table_to_bytes(block)
    per_byte = 8 // bits
    out = bytearray(len(block) // per_byte)
    for i, count in enumerate(block):
        if count:
            out[i // per_byte] |= count << ((i % per_byte) * bits)
    return bytes(out)


def new_block(entries: int, bits: int) -> array:
    return array(_TYPECODES.get(bits, "B"), bytes(entries * array(_TYPECODES.get(bits, "B")).itemsize))


class Refcounts:
    """Refcounts of one image, with a write-back cache of refcount blocks."""

    def __init__(
        self, file: BlockNode | Callable[[], BlockNode], header: Header, table: array, max_cached_blocks: int = 0
    ) -> None:
        #: the node's current ``file`` child (a callable, so that a graph may re-point the link)
        self._file = file if callable(file) else (lambda: file)
        self.header = header
        self.cluster_size = header.cluster_size
        self.bits = header.refcount_bits
        self.max_count = (1 << self.bits) - 1
        self.per_block = self.cluster_size * 8 // self.bits
        self.table = table
        self.blocks: OrderedDict[int, array] = OrderedDict()
        self.dirty_blocks: set[int] = set()
        self.dirty_table: set[int] = set()
        #: (first cluster, count) whose refcount drops once the tables that referenced them are on disk
        self.pending_free: list[tuple[int, int]] = []
        self.free_hint = 0
        #: clusters from here on have never been allocated since the image was opened, and lie past
        #: what the file held then: they read as zeroes until written (set by the owner at open)
        self.fresh_from = 1 << 62
        self.max_cached_blocks = max_cached_blocks or max(64, (32 << 20) // self.cluster_size)

    @property
    def file(self) -> BlockNode:
        return self._file()

    @classmethod
    async def load(cls, file: BlockNode | Callable[[], BlockNode], header: Header) -> Refcounts:
        node = file() if callable(file) else file
        size = header.refcount_table_clusters * header.cluster_size
        buf = bytearray(size)
        await node.read_into(header.refcount_table_offset, memoryview(buf))
        return cls(file, header, table_from_bytes(buf))

    # -- lookups -----------------------------------------------------------------------------

    def block_offset(self, index: int) -> int:
        if index >= len(self.table):
            return 0
        entry = self.table[index]
        if entry & REFT_RESERVED:
            raise BlockError(errno.EIO, f"qcow2: refcount table entry {index} is corrupt ({entry:#x})")
        return entry & ~REFT_RESERVED

    async def block(self, index: int) -> array | None:
        """The refcount block ``index`` (None if it does not exist: all its counts are 0)."""
        cached = self.blocks.get(index)
        if cached is not None:
            self.blocks.move_to_end(index)
            return cached
        offset = self.block_offset(index)
        if not offset:
            return None
        if offset % self.cluster_size:
            raise BlockError(errno.EIO, f"qcow2: refcount block {index} at unaligned offset {offset:#x}")
        buf = bytearray(self.cluster_size)
        await self.file.read_into(offset, memoryview(buf))
        blk = decode_block(buf, self.bits)
        await self._insert(index, blk)
        return blk

    async def _insert(self, index: int, blk: array) -> None:
        self.blocks[index] = blk
        while len(self.blocks) > self.max_cached_blocks:
            old, old_blk = next(iter(self.blocks.items()))
            if old in self.dirty_blocks:
                # early writing of a block is always safe: increments may reach the disk at any time,
                # and decrements are only ever applied after the tables that dropped them
                await self._write_block(old, old_blk)
            del self.blocks[old]

    async def get(self, cluster: int) -> int:
        blk = await self.block(cluster // self.per_block)
        return blk[cluster % self.per_block] if blk is not None else 0

    # -- allocation ----------------------------------------------------------------------------

    async def _find_free(self, count: int) -> tuple[int, int]:
        """(first free cluster at or after the hint, start of a run of ``count`` free clusters)."""
        first_free = -1
        c = self.free_hint
        while True:
            bi, idx = divmod(c, self.per_block)
            blk = await self.block(bi)
            if blk is not None:
                try:
                    idx = blk.index(0, idx)
                except ValueError:
                    c = (bi + 1) * self.per_block
                    continue
                c = bi * self.per_block + idx
            if first_free < 0:
                first_free = c
            run_end = await self._free_run_end(c, c + count)
            if run_end - c >= count:
                return first_free, c
            c = run_end + 1

    async def _free_run_end(self, start: int, limit: int) -> int:
        """End of the run of free clusters from ``start`` (searching no further than ``limit``)."""
        c = start
        while c < limit:
            bi, idx = divmod(c, self.per_block)
            blk = await self.block(bi)
            stop = min(limit, (bi + 1) * self.per_block)
            if blk is None:
                c = stop
                continue
            while c < stop and blk[c - bi * self.per_block] == 0:
                c += 1
            if c < stop:
                return c
        return c

    async def alloc(self, count: int) -> int:
        """Byte offset of ``count`` newly allocated contiguous clusters (refcount 1 each, in the cache)."""
        return (await self.alloc_fresh(count))[0]

    async def alloc_fresh(self, count: int) -> tuple[int, bool]:
        """Like :meth:`alloc`, and whether the clusters are fresh (never written: they read as zeroes)."""
        while True:
            first_free, start = await self._find_free(count)
            missing = self._first_missing_block(start, count)
            if missing is None:
                await self._add(start, count, 1)
                self.free_hint = start + count if first_free == start else first_free
                fresh = start >= self.fresh_from
                self.fresh_from = max(self.fresh_from, start + count)
                return start * self.cluster_size, fresh
            if missing >= len(self.table):
                await self._grow_table(missing + 1)
                continue
            # a new refcount block, placed inside the range it describes so that it counts itself
            place = max(start, missing * self.per_block)
            blk = new_block(self.per_block, self.bits)
            blk[place - missing * self.per_block] = 1
            self.fresh_from = max(self.fresh_from, place + 1)
            self.table[missing] = place * self.cluster_size
            self.dirty_table.add(missing)
            self.dirty_blocks.add(missing)
            await self._insert(missing, blk)

    def _first_missing_block(self, start: int, count: int) -> int | None:
        for bi in range(start // self.per_block, (start + count - 1) // self.per_block + 1):
            if bi >= len(self.table) or not self.table[bi]:
                return bi
        return None

    async def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a bigger place; the header switches to it atomically."""
        per_cluster = self.cluster_size // 8
        entries = max(min_entries, len(self.table) * 3 // 2 + 1)
        entries = (entries + per_cluster - 1) // per_cluster * per_cluster
        old_offset = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        self.table.extend(array("Q", bytes(8 * (entries - len(self.table)))))
        new_clusters = entries // per_cluster
        offset = await self.alloc(new_clusters)
        await self.write_dirty(table_too=False)  # the blocks the new table names exist first
        await self.file.write(offset, table_to_bytes(self.table))
        await self.file.flush()
        await self.file.write(48, struct.pack(">QI", offset, new_clusters))
        await self.file.flush()
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = new_clusters
        self.dirty_table.clear()
        self.free_later(old_offset // self.cluster_size, old_clusters)

    async def _add(self, start: int, count: int, delta: int) -> list[tuple[int, int]]:
        """Change counts; return the (start, count) runs of clusters whose count became 0."""
        freed: list[tuple[int, int]] = []
        c, end = start, start + count
        while c < end:
            bi, idx = divmod(c, self.per_block)
            blk = await self.block(bi)
            stop = min(end, (bi + 1) * self.per_block)
            if blk is None:
                raise BlockError(errno.EIO, f"qcow2: refcount block for cluster {c} missing")
            for i in range(idx, idx + stop - c):
                value = blk[i] + delta
                if value < 0 or value > self.max_count:
                    raise BlockError(errno.EIO, f"qcow2: refcount of cluster {bi * self.per_block + i} out of range")
                blk[i] = value
                if value == 0:
                    cluster = bi * self.per_block + i
                    if freed and freed[-1][0] + freed[-1][1] == cluster:
                        freed[-1] = (freed[-1][0], freed[-1][1] + 1)
                    else:
                        freed.append((cluster, 1))
            self.dirty_blocks.add(bi)
            c = stop
        return freed

    async def increment(self, start: int, count: int) -> None:
        await self._add(start, count, 1)

    def free_later(self, start: int, count: int) -> None:
        """Queue clusters to lose one reference after the next table write-back."""
        if count > 0:
            self.pending_free.append((start, count))

    def free_bytes_later(self, offset: int, length: int) -> None:
        """Queue the clusters a byte range touches (compressed data shares clusters)."""
        first = offset // self.cluster_size
        last = (offset + length - 1) // self.cluster_size
        self.free_later(first, last - first + 1)

    async def apply_frees(self) -> list[tuple[int, int]]:
        """Drop the queued references; return the runs of clusters now free (to punch)."""
        pending, self.pending_free = self.pending_free, []
        freed: list[tuple[int, int]] = []
        for start, count in pending:
            freed.extend(await self._add(start, count, -1))
        if freed:
            self.free_hint = min(self.free_hint, min(start for start, _ in freed))
        return freed

    # -- write-back ------------------------------------------------------------------------------

    async def _write_block(self, index: int, blk: array) -> None:
        offset = self.block_offset(index)
        await self.file.write(offset, encode_block(blk, self.bits))
        self.dirty_blocks.discard(index)

    async def write_dirty(self, table_too: bool = True) -> bool:
        """Write dirty blocks, then the table entries that name new blocks. True if anything was written."""
        wrote = False
        for index in sorted(self.dirty_blocks):
            blk = self.blocks.get(index)
            if blk is not None:
                await self._write_block(index, blk)
                wrote = True
        self.dirty_blocks.clear()
        if table_too and self.dirty_table:
            for first, last in _runs(sorted(self.dirty_table)):
                data = table_to_bytes(self.table[first : last + 1])
                await self.file.write(self.header.refcount_table_offset + first * 8, data)
            self.dirty_table.clear()
            wrote = True
        return wrote

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_blocks or self.dirty_table)

    def clear_cache(self) -> None:
        self.blocks.clear()


def _runs(indices: list[int]):
    """Consecutive runs (first, last) of sorted integers."""
    if not indices:
        return
    first = last = indices[0]
    for i in indices[1:]:
        if i == last + 1:
            last = i
        else:
            yield first, last
            first = last = i
    yield first, last


def offset_of(entry: int) -> int:
    return entry & OFFSET_MASK
