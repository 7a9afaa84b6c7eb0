"""The backup job (``blockdev-backup``): copy-before-write plus a background copy.

At start a copy-before-write filter is put above the source (every user of the source now writes
through it), so the target receives the data as it was at that instant. ``sync`` chooses what the
background loop copies: nothing (``none``: fleecing, the target is read by others), every cluster
(``full``), the clusters allocated in the top layer (``top``), or the clusters of a dirty bitmap
(``bitmap``, ``incremental``). The bitmap gets a successor that records writes during the job;
``bitmap-mode`` decides at the end whether the bitmap becomes the successor (abdicate) or takes
it back (reclaim).
"""

from __future__ import annotations

import errno
import logging

from pynbd.bitmap import DirtyBitmap, NodeBitmap
from pynbd.graph.core import BlockGraph, GraphUser
from pynbd.graph.perms import ALL, Perm
from pynbd.jobs.copy import CopyEngine
from pynbd.jobs.core import Job
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.cbw import CopyBeforeWriteNode

log = logging.getLogger("pynbd.backup")

SYNC_MODES = ("none", "full", "top", "incremental", "bitmap")


class BackupJob(Job):
    job_type = "backup"

    def __init__(
        self,
        job_id: str,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        sync: str,
        bitmap: NodeBitmap | None = None,
        bitmap_mode: str = "on-success",
        filter_node_name: str | None = None,
        on_source_error: str = "report",
        on_target_error: str = "report",
        **kwargs,
    ) -> None:
        super().__init__(job_id, **kwargs)
        self.graph = graph
        self.source = source
        self.target = target
        self.sync = sync
        self.bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.device = source.node_name
        self.user = GraphUser(job_id, "block-job", f"backup job {job_id!r}")
        self.users = [self.user]
        self.cbw = CopyBeforeWriteNode(filter_node_name or graph.auto_name())
        self.cbw.implicit = filter_node_name is None  # type: ignore[attr-defined]
        self.cbw.owner_job = job_id
        self.copy_set: DirtyBitmap | None = None

    # -- set-up (inside the QMP command or transaction) --------------------------------------------

    def install(self, tran) -> None:
        """Insert the filter above the source and take the bitmap; undone if ``tran`` aborts."""
        if self.source.size != self.target.size:
            raise BlockError(errno.EINVAL, "Source and target must have the same size")
        graph = self.graph
        graph.insert_filter(tran, self.cbw, self.source, target=self.target)
        self.cbw.activate()
        for node in (self.cbw, self.target):
            graph.attach_user(self.user, node, Perm(0), ALL)
        tran.add(abort=lambda: graph.detach_user(self.user))
        if self.bitmap is not None:
            self.bitmap.successor = DirtyBitmap(self.bitmap.bitmap.size, self.bitmap.granularity)
            tran.add(abort=lambda: setattr(self.bitmap, "successor", None))
        # the clusters the backup wants; copy-before-write only saves those
        copy_set = DirtyBitmap(self.source.size, self.cbw.cluster_size)
        if self.sync in ("full", "none", "top"):
            copy_set.fill()
        else:
            copy_set.merge(self.bitmap.bitmap)
        self.cbw.access = copy_set
        self.copy_set = copy_set

    # -- work -----------------------------------------------------------------------------------

    async def work(self) -> None:
        if self.sync == "none":
            self.total_progress = 0
            await self._cancel_event().wait()  # fleecing: copy-before-write only, until cancelled
            return
        if self.sync == "top":
            await self._drop_unallocated()
        ranges = self.copy_set.dirty_ranges()
        self.total_progress = sum(length for _, length in ranges)
        engine = CopyEngine(
            self, self.cbw.copy_range, self.on_source_error, self.on_target_error, chunk=self.cbw.cluster_size
        )
        await engine.run(ranges)

    async def _drop_unallocated(self) -> None:
        """sync=top: only clusters allocated in the source's own layer."""
        offset = 0
        async with self.user.busy():
            extents = await self.cbw.file.allocation_depth(0, self.cbw.size)
        for length, depth in extents:
            if depth != 1:
                self.copy_set.reset_range(offset, length)
            offset += length
            await self.checkpoint()

    # -- end ------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        if self.bitmap is not None:
            if self.bitmap_mode == "never":
                self._reclaim()
            else:
                self._abdicate()

    async def abort(self) -> None:
        if self.bitmap is None:
            return
        if self.bitmap_mode == "always":
            # what was not copied must stay dirty for the next backup
            uncopied = self.copy_set.copy()
            uncopied.bits &= ~self.cbw.done.bits
            self._abdicate()
            self.bitmap.bitmap.merge(uncopied)
        else:
            self._reclaim()

    def _abdicate(self) -> None:
        self.bitmap.bitmap, self.bitmap.successor = self.bitmap.successor, None

    def _reclaim(self) -> None:
        successor, self.bitmap.successor = self.bitmap.successor, None
        self.bitmap.bitmap.merge(successor)

    async def clean(self) -> None:
        if self.bitmap is not None and self.bitmap.successor is not None:
            self._reclaim()
        try:
            async with self.user.busy():
                await self.cbw.target.flush()
        except (BlockError, OSError) as exc:
            log.warning("backup %s: flushing the target failed: %s", self.id, exc)
        await self.leave_graph(self.graph, [self.cbw, self.target], self.cbw, self.source)
