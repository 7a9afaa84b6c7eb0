"""``mirror_top``: the filter a mirror (or active commit) job puts above its source.

Writes pass through to the source and mark :attr:`dirty`, which the job keeps copying to the
target; once the job is told to complete it switches to write-blocking, so from then on every
write reaches both sides before it is acknowledged.

Two range locks keep the copy correct without making guests wait for a slow target: ``lock`` is
held by a guest write and by a copy only while the copy clears the dirty bits and reads the
source (a write after that re-marks the range, so it is copied again); ``copy_lock`` orders the
target writes of copies of the same range (an older copy never lands after a newer one) and is
taken by guest writes only in write-blocking mode, when they write the target themselves.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pynbd.bitmap import DirtyBitmap
from pynbd.graph.perms import PASSTHROUGH, Perm
from pynbd.nodes.base import FilterNode
from pynbd.nodes.tracking import RangeLock

if TYPE_CHECKING:
    from pynbd.graph.core import ChildLink


class MirrorTopNode(FilterNode):
    driver = "mirror_top"

    def __init__(self, node_name: str, granularity: int, active_commit: bool = False) -> None:
        super().__init__(node_name)
        self.granularity = granularity
        self.active_commit = active_commit
        self.dirty: DirtyBitmap | None = None
        self.target: ChildLink | None = None  # the job's link to its target
        self.write_blocking = False
        self.lock = RangeLock()
        self.copy_lock = RangeLock()
        self.new_dirt = asyncio.Event()

    def child_perm(self, link, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        child_perm = perm & PASSTHROUGH
        child_shared = (shared & PASSTHROUGH) | Perm.WRITE_UNCHANGED
        if self.active_commit:
            # the job writes the base, which lies below the source: reads of the source must
            # keep working while it does (qemu drops CONSISTENT_READ and shares WRITE here)
            child_perm &= ~Perm.CONSISTENT_READ
            child_shared |= Perm.WRITE | Perm.CONSISTENT_READ
        return child_perm, child_shared

    @property
    def source(self) -> ChildLink:
        return self.filtered

    def activate(self, target: ChildLink) -> None:
        self.target = target
        self.dirty = DirtyBitmap(self.source.size, self.granularity)

    async def _guest_write(self, offset: int, length: int, apply) -> None:
        if self.write_blocking:
            async with self.copy_lock.hold(offset, offset + length), self.lock.hold(offset, offset + length):
                await apply(self.source)
                await apply(self.target)
            return
        async with self.lock.hold(offset, offset + length):
            await apply(self.source)
            self.dirty.set_range(offset, length)
            self.new_dirt.set()

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self._guest_write(offset, len(data), lambda node: node.write(offset, data, fua))

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        await self._guest_write(offset, length, lambda node: node.write_zeroes(offset, length, may_trim, fua, fast))

    async def discard(self, offset: int, length: int) -> None:
        await self._guest_write(offset, length, lambda node: node.discard(offset, length))

