"""Mirror (``blockdev-mirror``) and active commit (``block-commit`` of the active layer).

Both copy a source to a target while the source keeps being written: a ``mirror_top`` filter
marks what guests write, the job copies what is dirty until nothing is, reports ``ready``, keeps
the target in step, and on ``complete`` switches to write-blocking (every new guest write reaches
both sides before it is acknowledged). The pivot itself runs **drained**: guest writes that were
already inside the filter finish (and mark their ranges) before the last dirty ranges are copied
and every user of the source is moved to the target, so no acknowledged write is left behind. Active
commit is the same with the target being the source's own base, and the chain between them frozen
for the job's lifetime. With hole punching (``x-discard-committed``, pynbd/jobs/punch.py) each
copied chunk is dropped from the layers above the base once the base holds it, and guest writes
over ranges no such layer allocates go to the base only (nodes/mirror_top.py).

Convergence: the first pass gives way to client requests (pynbd.priority), so a backup-sized copy
does not stretch guest latency; later passes, which chase what guests keep dirtying, do not; and
if a pass does not at least halve what is dirty, the filter switches to write-blocking (qemu's
``copy-mode=write-blocking``), after which the dirty set can only shrink: the job reaches READY
under a steady writer, as qemu's does.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from pynbd.graph.core import BlockGraph, GraphUser, can_replace, chain_links
from pynbd.graph.io import drained
from pynbd.graph.perms import ALL, Perm
from pynbd.graph.reopen import restore
from pynbd.jobs.copy import CopyEngine, read_chunk, write_chunk
from pynbd.jobs.core import Job, JobCancelled, JobStatus
from pynbd.jobs.punch import HolePunch
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.mirror_top import MirrorTopNode

log = logging.getLogger("pynbd.mirror")


class MirrorJob(Job):
    job_type = "mirror"

    def __init__(
        self,
        job_id: str,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        sync: str = "full",
        granularity: int = 65536,
        filter_node_name: str | None = None,
        on_source_error: str = "report",
        on_target_error: str = "report",
        base: BlockNode | None = None,
        discard_committed: bool = False,
        replaces: BlockNode | None = None,
        **kwargs,
    ) -> None:
        super().__init__(job_id, **kwargs)
        self.graph = graph
        self.source = source
        self.target = target
        self.sync = sync
        self.base = base  # active commit: the target is this base of the source's chain
        #: blockdev-mirror ``replaces``: the node the pivot replaces by the target (the source or
        #: a node below it through filters only); None: the source
        self.replaces = replaces
        self.device = source.node_name
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        if base is not None:
            self.job_type = "commit"
        self.user = GraphUser(job_id, "block-job", f"{self.job_type} job {job_id!r}")
        #: active commit with hole punching: the layers above the base, given back as it goes
        self.punch = HolePunch(graph, self.user, source, base) if discard_committed and base is not None else None
        if self.punch is not None:  # a chunk must cover whole clusters of every layer
            granularity = max(granularity, self.punch.granularity)
        self.top = MirrorTopNode(filter_node_name or graph.auto_name(), granularity, active_commit=base is not None)
        self.top.implicit = filter_node_name is None  # type: ignore[attr-defined]
        self.top.owner_job = job_id
        self.users = [self.user]
        self.pivoted = False
        #: active commit: the base nodes reopened read-write for the job (read-only again at the
        #: end unless the job pivoted to them)
        self.reopened: list[BlockNode] = []

    # -- set-up ---------------------------------------------------------------------------------

    def install(self, tran) -> None:
        graph = self.graph
        if self.base is None and self.source.size != self.target.size:
            raise BlockError(errno.EINVAL, "Source and target image have different sizes")
        if self.base is not None:  # active commit: reads the chain, changes none of its links
            self.frozen = graph.freeze_chain(self.source, self.base, self.holder)
            tran.add(abort=lambda: graph.unfreeze_links(self.frozen, self.holder))
        graph.insert_filter(tran, self.top, self.source)
        self.reader = graph.attach_user(self.user, self.top, Perm(0), ALL)
        shared = Perm.WRITE_UNCHANGED
        if self.base is not None:
            shared |= Perm.CONSISTENT_READ | Perm.WRITE
        self.writer = graph.attach_user(self.user, self.target, Perm.WRITE, shared)
        tran.add(abort=lambda: graph.detach_user(self.user))
        self.top.activate(self.writer)
        if self.punch is not None:
            self.punch.attach(self.writer)
            self.top.skip_depth = len(self.punch.layers)

    # -- work -----------------------------------------------------------------------------------

    async def _initial_dirty(self) -> None:
        dirty = self.top.dirty
        if self.sync == "none":
            return
        offset = 0
        size = self.reader.size
        if self.base is not None:  # active commit: what lies above the base
            layers = len(chain_links(self.source, self.base))
            async with self.user.busy():
                extents = await self.reader.allocation_depth(0, size)
            for length, depth in extents:
                if 1 <= depth <= layers:
                    dirty.set_range(offset, length)
                offset += length
        elif self.sync == "top":
            async with self.user.busy():
                extents = await self.reader.allocation_depth(0, size)
            for length, depth in extents:
                if depth == 1:
                    dirty.set_range(offset, length)
                offset += length
        else:
            dirty.fill()

    async def _copy(self, offset: int, length: int) -> None:
        """Copy one chunk; guests wait only while it is read (see nodes/mirror_top.py)."""
        top = self.top
        async with top.copy_lock.hold(offset, offset + length):
            async with top.lock.hold(offset, offset + length):
                top.dirty.reset_range(offset, length)
                try:
                    staged = await read_chunk(self.reader, offset, length)
                except BaseException:
                    top.dirty.set_range(offset, length)
                    raise
            try:
                await write_chunk(self.writer, staged)
            except BaseException:
                top.dirty.set_range(offset, length)
                raise
            if self.punch is not None:
                await self._punch(offset, length)

    async def _punch(self, offset: int, length: int) -> None:
        """Give a copied chunk back from the layers above the base (the caller holds the copy
        lock, so no write to the base alone slips in). The top's clusters go under the guests'
        range lock, and only where no guest wrote since the copy read the chunk: such a write
        re-marked its part dirty and lives in the top alone until that part is copied again."""
        top = self.top
        await self.punch.release_below_top(offset, length)
        async with top.lock.hold(offset, offset + length):
            pos = offset
            for run, dirty in top.dirty.extents(offset, length):
                if not dirty:
                    await self.punch.release_top(pos, run)
                pos += run

    async def _copy_dirty(self, engine: CopyEngine, converge: bool = False) -> None:
        """Copy until nothing is dirty. With ``converge``, a pass that does not at least halve what
        is dirty (guests dirty about as fast as the job copies) switches the filter to
        write-blocking, qemu's active mode: guest writes then reach both sides before they are
        acknowledged and dirty nothing, so what is left only shrinks and the job reaches READY."""
        before = None
        while True:
            ranges = self.top.dirty.dirty_ranges()
            if not ranges:
                return
            self.top.new_dirt.clear()
            total = sum(length for _, length in ranges)
            if converge and before is not None and total * 2 > before and not self.top.write_blocking:
                log.info("mirror %s: guests dirty as fast as it copies; switching to write-blocking", self.id)
                self.top.write_blocking = True
            before = total
            self.total_progress = max(self.total_progress, self.current_progress + total)
            await engine.run(ranges)

    def _engine(self, yield_to_clients: bool) -> CopyEngine:
        return CopyEngine(
            self,
            self._copy,
            self.on_source_error,
            self.on_target_error,
            chunk=self.top.granularity * 16,
            yield_to_clients=yield_to_clients,
        )

    async def work(self) -> None:
        await self._initial_dirty()
        # one pass over what was dirty at the start, giving way to clients; then converge
        first = self.top.dirty.dirty_ranges()
        self.total_progress = sum(length for _, length in first)
        await self._engine(yield_to_clients=True).run(first)
        engine = self._engine(yield_to_clients=False)
        await self._copy_dirty(engine, converge=True)
        self.set_ready()
        while not self.complete_requested:
            waiter = asyncio.create_task(self.top.new_dirt.wait())
            completer = asyncio.create_task(self.wait_complete_requested())
            await asyncio.wait([waiter, completer], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            completer.cancel()
            if self.cancelled and self.force_cancel:
                raise JobCancelled()
            await self._copy_dirty(engine)
        # complete (or cancel after ready): from now on guest writes reach both sides; what was
        # dirtied before is copied here, and what writes already in flight dirty is copied by
        # the drained final pass (in prepare(), or below when cancelled)
        self.top.write_blocking = True
        await self._copy_dirty(engine)
        if self.cancelled:  # a point-in-time copy: settle it now, no pivot will follow
            await self._final_pass(pivot=False)

    async def _final_pass(self, pivot: bool) -> None:
        """With the filter drained (no guest write in flight or starting), copy what is still
        dirty and flush the target: it then holds every write acknowledged so far. With
        ``pivot``, every user of the source then moves to the target, still drained."""
        async with drained([self.top, self.target], owner=self.user):
            for offset, length in self.top.dirty.dirty_ranges():
                await self._copy(offset, length)
            await self.writer.flush()
            if self.punch is not None:
                await self.punch.flush_top()
            if pivot:
                self._check_replaceable()
                self.graph.unfreeze_links(self.frozen, self.holder)
                self.frozen = []
                self.graph.detach_user(self.user)
                if self.replaces is None or self.replaces is self.source:
                    self.graph.replace_node(self.top, self.target)  # the source's users are the filter's
                else:  # the filters between the source and the node stay, now above the target
                    self.graph.replace_node(self.replaces, self.target)
                self.pivoted = True

    def _check_replaceable(self) -> None:
        """As qemu's mirror_exit_common: the graph may have changed since the job started (a
        reopen re-pointed a filter), so the node to replace must still be in the graph and still
        lie below the source through filters only; otherwise the job fails without a pivot."""
        node = self.replaces
        if node is None:
            return
        if self.graph.nodes.get(node.node_name) is not node or not can_replace(self.source, node):
            raise BlockError(
                errno.EPERM,
                f"Can no longer replace '{node.node_name}' by '{self.target.node_name}', because it can no "
                "longer be guaranteed that doing so would not lead to an abrupt change of visible data",
            )

    # -- end ------------------------------------------------------------------------------------

    async def prepare(self) -> None:
        if not self.cancelled:  # cancelled when ready: a point-in-time copy, no pivot
            await self._final_pass(pivot=True)

    async def clean(self) -> None:
        await self.leave_graph(self.graph, [self.top], self.top, self.source)
        if self.reopened and not self.pivoted:
            await restore(self.graph, self.reopened, True)
        if self.punch is not None:  # layers reopened for the job stay nodes of the graph
            await self.punch.restore()


__all__ = ["MirrorJob", "JobStatus"]
