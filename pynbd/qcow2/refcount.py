"""Reference counts: the refcount table, its blocks, cluster allocation and deferred freeing.

Why the order matters (the crash-safety rule qemu follows): a cluster's refcount must be on disk
before any L2 or L1 entry that points at it, and an entry must stop pointing at a cluster before
the cluster's refcount drops. Increments are therefore written in the first stage of the node's
write-back, and decrements are not applied at all until the L2/L1 tables that dropped the
references have been written (:meth:`Refcounts.free_later` queues them). A crash at any moment
then leaves at most clusters whose refcount is too high: leaks, which ``check -r leaks`` repairs,
never a referenced cluster that could be handed out twice.

Concurrency: every method is called with the owning node's metadata lock held (allocation finds
free clusters, then counts them: two allocators interleaving there would get the same clusters).
The block cache is nonetheless safe across its own awaits: a block's dirty flag is cleared
*before* its write starts (so a change made while the write is in flight marks it dirty again,
and a failed write marks it again), a block is only dropped from the cache while it is clean, and
a load that finds the block cached by the time its read returns keeps the cached copy.
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from pynbd.nodes.base import BlockError

if TYPE_CHECKING:
    from pynbd.nodes.base import Storage
from pynbd.qcow2.layout import OFFSET_MASK, REFT_RESERVED, Header, table_from_bytes, table_to_bytes

_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def decode_block(data: bytes | bytearray, bits: int) -> array:
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


#: blocks cached when the owner does not say (qemu keeps 4; a Python block costs little more than its bytes)
DEFAULT_CACHE_BYTES = 32 << 20
MIN_CACHED_BLOCKS = 4  # qemu's MIN_REFCOUNT_CACHE_SIZE


def cached_blocks(cache_bytes: int | None, cluster_size: int) -> int:
    """How many refcount blocks a cache of ``cache_bytes`` holds (None: the default), at least qemu's 4."""
    if cache_bytes is None:
        return max(64, DEFAULT_CACHE_BYTES // cluster_size)
    return max(MIN_CACHED_BLOCKS, cache_bytes // cluster_size)


class Refcounts:
    """Refcounts of one image, with a write-back cache of refcount blocks."""

    def __init__(
        self, file: Storage | Callable[[], Storage], header: Header, table: array, max_cached_blocks: int = 0
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
        #: a soft limit: blocks that are dirty stay cached until written (see :meth:`_make_room`)
        self.max_cached_blocks = max_cached_blocks or cached_blocks(None, self.cluster_size)
        #: refcounts were written since the owner's last flush of the file: the owner must flush
        #: before writing an L2 or L1 entry that relies on them (eviction writes blocks at any time)
        self.unflushed = False
        #: (offset, clusters) of a bigger table not yet named by the header (see :meth:`_move_table`)
        self.moving_to: tuple[int, int] | None = None

    @property
    def file(self) -> Storage:
        return self._file()

    @classmethod
    async def load(
        cls, file: Storage | Callable[[], Storage], header: Header, cache_bytes: int | None = None
    ) -> Refcounts:
        node = file() if callable(file) else file
        size = header.refcount_table_clusters * header.cluster_size
        buf = bytearray(size)
        await node.read_into(header.refcount_table_offset, memoryview(buf))
        return cls(file, header, table_from_bytes(buf), cached_blocks(cache_bytes, header.cluster_size))

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
        await self._make_room()
        cached = self.blocks.get(index)
        if cached is not None:  # loaded (and perhaps changed) by someone else meanwhile: theirs counts
            self.blocks.move_to_end(index)
            return cached
        blk = decode_block(buf, self.bits)
        self.blocks[index] = blk
        return blk

    async def _insert_new(self, index: int, blk: array) -> None:
        """Cache a block that exists nowhere else yet (dirty: it must reach the disk)."""
        await self._make_room()
        self.blocks[index] = blk
        self.dirty_blocks.add(index)

    async def _make_room(self) -> None:
        """Drop the least recently used clean block(s) until one more fits.

        If every cached block is dirty, the oldest ones are written first: early writing of a
        block is always safe (increments may reach the disk at any time, and decrements are only
        ever applied after the tables that dropped them). A block changed again while its write
        was in flight is dirty again and stays; if that keeps happening the cache grows past its
        limit rather than lose the change."""
        written: set[int] = set()
        while len(self.blocks) >= self.max_cached_blocks:
            victim = next((index for index in self.blocks if index not in self.dirty_blocks), None)
            if victim is not None:
                del self.blocks[victim]
                continue
            oldest = next((index for index in self.blocks if index not in written), None)
            if oldest is None:
                return
            written.add(oldest)
            await self._write_block(oldest, self.blocks[oldest])

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
            await self._insert_new(missing, blk)
            self.table[missing] = place * self.cluster_size
            self.dirty_table.add(missing)

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
        self.table.extend(array("Q", bytes(8 * (entries - len(self.table)))))
        new_clusters = entries // per_cluster
        offset = await self.alloc(new_clusters)  # may need new blocks itself: their entries are in the new table
        if self.moving_to is not None:  # an earlier move that failed: its place was never used
            self.free_later(self.moving_to[0] // self.cluster_size, self.moving_to[1])
        self.moving_to = (offset, new_clusters)
        await self._move_table()

    async def _move_table(self) -> None:
        """Write the whole table at its new place, then switch the header to it.

        Until the header names the new place, no entry may be written to the old one (the new
        entries lie past its end): a move that failed stays pending in ``moving_to``, and the next
        :meth:`write_dirty` tries it again."""
        assert self.moving_to is not None
        offset, clusters = self.moving_to
        await self.write_dirty(table_too=False)  # the blocks the new table names exist first
        self.dirty_table.clear()  # the whole table is written; changes from here on are dirty again
        await self.file.write(offset, table_to_bytes(self.table))
        await self._barrier()
        await self.file.write(48, struct.pack(">QI", offset, clusters))
        await self._barrier()
        old_offset, old_clusters = self.header.refcount_table_offset, self.header.refcount_table_clusters
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self.moving_to = None
        self.free_later(old_offset // self.cluster_size, old_clusters)

    async def _barrier(self) -> None:
        """Flush the file: every refcount written so far is on disk afterwards."""
        self.unflushed = False
        try:
            await self.file.flush()
        except BaseException:
            self.unflushed = True
            raise

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
        # clusters are queued one L2 entry at a time: joined into runs, a commit that gives a
        # whole image back punches its file a few times, not once per cluster
        runs: list[tuple[int, int]] = []
        for start, count in sorted(freed):
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + count)
            else:
                runs.append((start, count))
        return runs

    # -- write-back ------------------------------------------------------------------------------

    async def _write_block(self, index: int, blk: array) -> None:
        """Write one block as it is now; a change made while the write is in flight (or a failed
        write) leaves it dirty."""
        offset = self.block_offset(index)
        data = encode_block(blk, self.bits)
        self.dirty_blocks.discard(index)
        self.unflushed = True
        try:
            await self.file.write(offset, data)
        except BaseException:
            self.dirty_blocks.add(index)
            raise

    async def write_dirty(self, table_too: bool = True) -> bool:
        """Write dirty blocks, then the table entries that name new blocks. True if anything was written."""
        wrote = False
        for index in sorted(self.dirty_blocks):
            if index in self.dirty_blocks:  # not written by an eviction meanwhile
                await self._write_block(index, self.blocks[index])  # a dirty block is never evicted
                wrote = True
        if table_too and self.moving_to is not None:
            await self._move_table()
            return True
        if table_too and self.dirty_table:
            indices, self.dirty_table = sorted(self.dirty_table), set()
            self.unflushed = True
            try:
                for first, last in _runs(indices):
                    data = table_to_bytes(self.table[first : last + 1])
                    await self.file.write(self.header.refcount_table_offset + first * 8, data)
            except BaseException:
                self.dirty_table.update(indices)
                raise
            wrote = True
        return wrote

    @property
    def dirty(self) -> bool:
        return bool(self.dirty_blocks or self.dirty_table or self.moving_to)


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
