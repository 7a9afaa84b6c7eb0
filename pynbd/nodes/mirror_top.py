"""``mirror_top``: the filter a mirror (or active commit) job puts above its source.

Writes pass through to the source and mark :attr:`dirty`, which the job keeps copying to the
target; once the job is told to complete it switches to write-blocking, so from then on every
write reaches both sides before it is acknowledged.

Two range locks keep the copy correct without making guests wait for a slow target: ``lock`` is
held by a guest write and by a copy only while the copy clears the dirty bits and reads the
source (a write after that re-marks the range, so it is copied again); ``copy_lock`` orders the
target writes of copies of the same range (an older copy never lands after a newer one) and is
taken by guest writes only in write-blocking mode, when they write the target themselves.

In a hole-punching active commit (``block-commit x-discard-committed``, pynbd/jobs/punch.py) a
guest write over a range that no layer above the base allocates (:attr:`skip_depth`; qcow2
metadata only, never the data) goes to the base alone: the top stays unallocated there and reads
fall through to the base, which has the new bytes. Such a write holds both locks over the whole
clusters it touches, so no copy of the range writes older data into the base after it, no other
write allocates the cluster in the top meanwhile (which would copy the old base bytes into it),
and the decision cannot go stale before the write is done.
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
        #: hole-punching active commit: how many layers (top first) lie above the base; a write
        #: none of them allocates goes to the base only. 0: every write goes to the source.
        self.skip_depth = 0

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

    async def _guest_write(self, offset: int, length: int, apply, fua: bool = False) -> None:
        if self.skip_depth and await self._base_only(offset, length):
            # decided again under the locks; the first look only spares other writes the wait
            gran = self.granularity
            start, end = offset // gran * gran, -(-(offset + length) // gran) * gran
            async with self.copy_lock.hold(start, end), self.lock.hold(start, end):
                if await self._base_only(offset, length):
                    await apply(self.target)
                    if fua:  # the top's dropped clusters too: on disk it must not hide the write
                        await self.source.flush()
                    return
                await self._to_source(offset, length, apply)
            return
        if self.write_blocking:
            async with self.copy_lock.hold(offset, offset + length), self.lock.hold(offset, offset + length):
                await self._to_source(offset, length, apply)
            return
        async with self.lock.hold(offset, offset + length):
            await self._to_source(offset, length, apply)

    async def _to_source(self, offset: int, length: int, apply) -> None:
        """The write as without hole punching (the caller holds the locks that mode needs).
        With hole punching a write-blocking write marks its range too: it may have allocated
        clusters in the top over ranges already committed, which the job must give back again."""
        await apply(self.source)
        if self.write_blocking:
            await apply(self.target)
        if not self.write_blocking or self.skip_depth:
            self.dirty.set_range(offset, length)
            self.new_dirt.set()

    async def _base_only(self, offset: int, length: int) -> bool:
        """Whether no layer above the base allocates any of the range (metadata only)."""
        if offset + length > self.target.size:
            return False
        extents = await self.source.allocation_depth(offset, length)
        return not any(1 <= depth <= self.skip_depth for _, depth in extents)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self._guest_write(offset, len(data), lambda node: node.write(offset, data, fua), fua)

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        await self._guest_write(
            offset, length, lambda node: node.write_zeroes(offset, length, may_trim, fua, fast), fua
        )

    async def discard(self, offset: int, length: int) -> None:
        await self._guest_write(offset, length, lambda node: node.discard(offset, length))

    async def flush(self) -> None:
        """With writes going to the base only, a guest's flush must reach the base too."""
        await self.source.flush()
        if self.skip_depth:
            await self.target.flush()

