"""``copy-on-read``: data read through this filter from the backing chain is written into the top.

With ``bottom``, only data allocated above ``bottom`` is copied up (what a stream down to that
base needs); without it, anything not allocated in the top. A range lock makes each copy-up (read
then write back) atomic against guest writes to the same bytes, so a copy-up never overwrites
newer data. Beyond qemu, ``track-copied`` remembers clusters that were only copied up and never
written since: :meth:`release_copied` gives their space back, since the backing files still hold
the same bytes.
"""

from __future__ import annotations

import errno

from pynbd.bitmap import DirtyBitmap
from pynbd.graph.core import chain_links
from pynbd.graph.perms import PASSTHROUGH, Perm
from pynbd.nodes.base import BlockError, BlockNode, FilterNode
from pynbd.nodes.tracking import RangeLock

TRACK_GRANULARITY = 64 * 1024


class CopyOnReadNode(FilterNode):
    driver = "copy-on-read"

    def __init__(self, node_name: str = "", bottom: BlockNode | None = None, track_copied: bool = False) -> None:
        super().__init__(node_name)
        self.bottom = bottom
        self.lock = RangeLock()
        self.copied: DirtyBitmap | None = None
        self.track_copied = track_copied

    def child_perm(self, link, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # copy-ups write the top without changing what it shows: WRITE_UNCHANGED, always
        return (perm & PASSTHROUGH) | Perm.WRITE_UNCHANGED, (shared & PASSTHROUGH) | Perm.WRITE_UNCHANGED

    def _layers_above_bottom(self) -> int | None:
        if self.bottom is None:
            return None
        return len(chain_links(self.filtered.node, self.bottom)) + 1

    async def copy_up_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Sub-ranges the top does not hold but a layer above ``bottom`` (or any layer) does."""
        limit = self._layers_above_bottom()
        out, pos = [], offset
        for ext_len, depth in await self.filtered.allocation_depth(offset, length):
            if depth > 1 and (limit is None or depth <= limit):
                out.append((pos, ext_len))
            pos += ext_len
        return out

    async def read_into(self, offset: int, buf: memoryview) -> None:
        async with self.lock.hold(offset, offset + len(buf)):
            await self.filtered.read_into(offset, buf)
            for start, length in await self.copy_up_ranges(offset, len(buf)):
                piece = buf[start - offset : start - offset + length]
                await self.filtered.write(start, piece)
                if self.track_copied:
                    self._copied().set_range(start, length)

    def _copied(self) -> DirtyBitmap:
        if self.copied is None:
            self.copied = DirtyBitmap(self.size, TRACK_GRANULARITY)
        return self.copied

    async def release_copied(self) -> int:
        """Discard, in the top, the clusters only ever copied up (the backing holds them too)."""
        if self.copied is None:
            return 0
        released = 0
        for start, length in self.copied.dirty_ranges():
            async with self.lock.hold(start, start + length):
                if not self.filtered.node.can_unallocate:
                    what = self.filtered.describe()
                    raise BlockError(errno.ENOTSUP, f"{what} cannot give clusters back to its backing")
                await self.filtered.unallocate(start, length)
                self.copied.reset_range(start, length)
                released += length
        return released

    async def _guest(self, offset: int, length: int, apply) -> None:
        async with self.lock.hold(offset, offset + length):
            if self.copied is not None:  # every cluster touched now holds data of its own
                first = offset // TRACK_GRANULARITY
                last = (offset + length + TRACK_GRANULARITY - 1) // TRACK_GRANULARITY
                self.copied.bits[first:last] = 0
            await apply()

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self._guest(offset, len(data), lambda: self.filtered.write(offset, data, fua))

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        await self._guest(offset, length, lambda: self.filtered.write_zeroes(offset, length, may_trim, fua, fast))

    async def discard(self, offset: int, length: int) -> None:
        await self._guest(offset, length, lambda: self.filtered.discard(offset, length))
