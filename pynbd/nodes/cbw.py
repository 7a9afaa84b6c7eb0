"""``copy-before-write``: a filter that saves old data to ``target`` before it is overwritten.

It sits above the live disk (``file``); every write, zero and discard first copies the clusters it
touches from ``file`` to ``target``, unless already copied. The clusters copied so far are the
``done`` bitmap; the clusters the snapshot may still be read from are ``access`` (everything, or
the clusters of the ``bitmap`` option). Readers of the point-in-time view go through
:meth:`CopyBeforeWriteNode.snapshot_read` (used by ``snapshot-access``), and the backup job's
background copy uses :meth:`copy_range`, so each cluster is copied exactly once.

Concurrency: a per-cluster lock is held while a cluster is copied and while the guest write that
caused it runs, and by snapshot reads of clusters not yet copied, so a reader never sees a
cluster half-overwritten. Copies into a target that reads through to ``file`` (old-style fleecing)
are serialising writes (see nodes/tracking.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import TYPE_CHECKING

from pynbd.bitmap import DirtyBitmap
from pynbd.graph.perms import ALL, PASSTHROUGH, Perm
from pynbd.jobs.copy import copy_chunk
from pynbd.nodes.base import BlockError, Extent, FilterNode, merge_extents

if TYPE_CHECKING:
    from pynbd.graph.core import ChildLink

log = logging.getLogger("pynbd.cbw")

MIN_CLUSTER = 64 * 1024


class CopyBeforeWriteNode(FilterNode):
    driver = "copy-before-write"

    def __init__(
        self, node_name: str = "", on_cbw_error: str = "break-guest-write", access: DirtyBitmap | None = None
    ) -> None:
        super().__init__(node_name)
        self.on_cbw_error = on_cbw_error
        self._access_seed = access
        self.cluster_size = MIN_CLUSTER
        #: set by :meth:`activate` (the fleecing point); until then nothing is copied or readable
        self.active = False
        self.done = DirtyBitmap(0, MIN_CLUSTER)
        self.access = DirtyBitmap(0, MIN_CLUSTER)
        self.snapshot_error: BlockError | None = None
        self._locks: dict[int, asyncio.Lock] = {}
        self._lock_users: dict[int, int] = {}

    # -- graph ----------------------------------------------------------------------------------

    def child_perm(self, link, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if link.name == "target":
            return Perm.WRITE, ALL & ~Perm.RESIZE
        if not self.parents:
            # Not in use yet (added, waiting for blockdev-insert-filter): claim nothing, so it can
            # be prepared beside a disk that is being written.
            return Perm.CONSISTENT_READ, ALL
        # Nobody may write beneath the filter: writes that bypass it would not be copied first.
        child_perm = (perm & PASSTHROUGH) | Perm.CONSISTENT_READ
        child_shared = ((shared & PASSTHROUGH) | Perm.WRITE_UNCHANGED) & ~(Perm.WRITE | Perm.RESIZE)
        return child_perm, child_shared

    @property
    def file(self) -> ChildLink:
        return self.filtered

    @property
    def target(self) -> ChildLink:
        return self.children["target"]

    def activate(self) -> None:
        """Called once both children are attached: size the bitmaps (the fleecing point is now)."""
        if self.target.size != self.file.size:
            raise BlockError(errno.EINVAL, "copy-before-write: file and target must have the same size")
        self.cluster_size = max(MIN_CLUSTER, self.target.node.cluster_size)
        self.done = DirtyBitmap(self.file.size, self.cluster_size)
        self.access = DirtyBitmap(self.file.size, self.cluster_size)
        if self._access_seed is None:
            self.access.fill()
        else:
            self.access.merge(self._access_seed)
        self.active = True

    # -- cluster locks --------------------------------------------------------------------------

    def _clusters(self, offset: int, length: int) -> range:
        first = offset // self.cluster_size
        last = (offset + length + self.cluster_size - 1) // self.cluster_size
        return range(first, last)

    @contextlib.asynccontextmanager
    async def _locked(self, clusters: range):
        """Hold the locks of ``clusters``. Cancellation-safe: a waiter that is cancelled before
        it got a lock releases only the locks it holds, never one it was still waiting for."""
        taken = []
        try:
            for index in clusters:  # ascending order: no two requests can deadlock
                lock = self._locks.setdefault(index, asyncio.Lock())
                self._lock_users[index] = self._lock_users.get(index, 0) + 1
                try:
                    await lock.acquire()
                except BaseException:
                    self._drop_lock_user(index)
                    raise
                taken.append(index)
            yield
        finally:
            for index in taken:
                self._locks[index].release()
                self._drop_lock_user(index)

    def _drop_lock_user(self, index: int) -> None:
        self._lock_users[index] -= 1
        if not self._lock_users[index]:
            del self._lock_users[index]
            del self._locks[index]

    def _needs_copy(self, index: int) -> bool:
        return bool(self.access.bits[index]) and not self.done.bits[index]

    async def _copy_cluster(self, index: int) -> int:
        """Copy one cluster file -> target (lock held by the caller); returns bytes copied."""
        offset = index * self.cluster_size
        length = min(self.cluster_size, self.file.size - offset)
        await copy_chunk(self.file, self.target, offset, length, serialising=True)
        self.done.bits[index] = 1
        return length

    async def copy_range(self, offset: int, length: int) -> int:
        """Make sure every accessible cluster of the range is in the target (background copy)."""
        copied = 0
        for index in self._clusters(offset, length):
            if self._needs_copy(index):
                async with self._locked(range(index, index + 1)):
                    if self._needs_copy(index):
                        copied += await self._copy_cluster(index)
        return copied

    async def _before_write(self, offset: int, length: int) -> None:
        if not self.active or self.snapshot_error is not None:
            return
        for index in self._clusters(offset, length):
            if self._needs_copy(index):
                try:
                    await self._copy_cluster(index)
                except (BlockError, OSError) as exc:
                    err = exc.errno if isinstance(exc, OSError) else exc.errno
                    if self.on_cbw_error == "break-snapshot":
                        log.warning("copy-before-write failed, snapshot broken: %s", exc)
                        self.snapshot_error = BlockError(errno.EACCES, f"snapshot broken: {exc}")
                        return
                    raise BlockError(err or errno.EIO, f"copy-before-write failed: {exc}") from exc

    # -- the filter's own I/O (the live disk's users) ---------------------------------------------

    async def write(self, offset: int, data, fua: bool = False) -> None:
        async with self._locked(self._clusters(offset, len(data))):
            await self._before_write(offset, len(data))
            await self.file.write(offset, data, fua)

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        async with self._locked(self._clusters(offset, length)):
            await self._before_write(offset, length)
            await self.file.write_zeroes(offset, length, may_trim, fua, fast)

    async def discard(self, offset: int, length: int) -> None:
        async with self._locked(self._clusters(offset, length)):
            await self._before_write(offset, length)
            await self.file.discard(offset, length)

    async def flush(self) -> None:
        await self.file.flush()
        await self.target.flush()

    # -- the snapshot API (snapshot-access) ------------------------------------------------------

    def _check_snapshot(self, offset: int, length: int) -> None:
        if self.snapshot_error is not None:
            raise self.snapshot_error
        if not self.active:
            raise BlockError(errno.EIO, "copy-before-write filter is not active")
        for index in self._clusters(offset, length):
            if not self.access.bits[index]:
                raise BlockError(errno.EACCES, "snapshot region was discarded or is outside the bitmap")

    async def snapshot_read(self, offset: int, buf: memoryview) -> None:
        self._check_snapshot(offset, len(buf))
        pos = 0
        for index in self._clusters(offset, len(buf)):
            start = max(offset + pos, index * self.cluster_size)
            end = min(offset + len(buf), (index + 1) * self.cluster_size)
            piece = buf[start - offset : end - offset]
            if self.done.bits[index]:
                await self.target.read_into(start, piece)
            else:
                async with self._locked(range(index, index + 1)):
                    source = self.target if self.done.bits[index] else self.file
                    await source.read_into(start, piece)
            pos = end - offset

    async def snapshot_block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_snapshot(offset, length)
        extents: list[Extent] = []
        for index in self._clusters(offset, length):
            start = max(offset, index * self.cluster_size)
            end = min(offset + length, (index + 1) * self.cluster_size)
            source = self.target if self.done.bits[index] else self.file
            extents += await source.block_status(start, end - start)
        return merge_extents(extents)

    async def snapshot_discard(self, offset: int, length: int) -> None:
        """The reader is done with this range: stop copying it and free it in the target."""
        first = (offset + self.cluster_size - 1) // self.cluster_size
        end = min(offset + length, self.size)
        last = self.access.bits.__len__() if end == self.size else end // self.cluster_size
        for index in range(first, last):
            async with self._locked(range(index, index + 1)):
                self.access.bits[index] = 0
                if self.done.bits[index]:
                    start = index * self.cluster_size
                    await self.target.discard(start, min(self.cluster_size, self.size - start))


class SnapshotAccessNode(FilterNode):
    """``snapshot-access``: the point-in-time view of a copy-before-write filter, read-only."""

    driver = "snapshot-access"
    #: it shows the point-in-time view, not its child's current data (qemu: not a filter either)
    is_filter = False

    def child_perm(self, link, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return Perm(0), ALL

    @property
    def cbw(self) -> CopyBeforeWriteNode:
        node = self.filtered.node
        if not isinstance(node, CopyBeforeWriteNode):
            raise BlockError(errno.EINVAL, "snapshot-access needs a copy-before-write node as its file")
        return node

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.cbw.snapshot_read(offset, buf)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        raise BlockError(errno.ENOTSUP, "snapshot-access is read-only")

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        raise BlockError(errno.ENOTSUP, "snapshot-access is read-only")

    async def discard(self, offset: int, length: int) -> None:
        await self.cbw.snapshot_discard(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.cbw.snapshot_block_status(offset, length)

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        return [(length, 1)]

