"""One copy job for backup, mirror and active commit: :class:`CopyJob`, parametrised by ``mode``.

QEMU's design notes wanted backup, mirror and commit to share their machinery. Here they are one
job class; what differs between them is a single choice, made once, at creation:

``point-in-time`` (backup semantics)
    A ``copy-before-write`` filter goes above the source: before a guest write overwrites a
    cluster the job still has to copy, the old data is saved to the target. A background pass
    copies the rest. The target ends equal to the source *as it was when the job started*.

``converge`` (mirror semantics, and active commit)
    A ``mirror_top`` filter goes above the source and marks what guests write. The job copies its
    first pass giving way to clients, then what guests dirtied, until nothing is dirty; it reports
    READY and keeps the target in step. If a pass does not at least halve what is dirty, the
    filter switches to write-blocking (qemu's ``copy-mode=write-blocking``): guest writes then
    reach both sides before they are acknowledged, the dirty set can only shrink, and the job
    reaches READY under a steady writer, as qemu's does. On ``complete`` the last dirty ranges are
    copied with the filter **drained** (no guest write in flight or starting), so no acknowledged
    write is left behind; then, with ``pivot``, every user of the source moves to the target,
    still drained (or, with ``replaces``, the users of a node below the source through filters
    only, checked again at the pivot as in qemu). Without ``pivot`` (or after a ``cancel`` in
    READY, as in qemu) the job ends there: the target equals the source *as it was at
    completion*. Active commit is a converge copy into the source's own base, with the chain
    between them frozen for the job's lifetime. With hole punching (``x-discard-committed``,
    pynbd/jobs/punch.py) each copied chunk is dropped from the layers above the base once the
    base holds it, and guest writes over ranges no such layer allocates go to the base only
    (nodes/mirror_top.py).

Everything else is the same code in both modes:

- ``sync`` chooses the first pass the same way: every cluster (``full``), the clusters the
  source's own layer allocates (``top``; for active commit: every layer above the base), a
  dirty bitmap's clusters (``bitmap``, ``incremental``), or nothing (``none``: in point-in-time
  mode that is fleecing, the filter alone saves old data for readers of the target and the job
  runs until cancelled; in converge mode only what guests write is copied);
- a bitmap gets a successor that records the writes made during the job, and ``bitmap-mode``
  decides at the end whether the bitmap becomes the successor (abdicate) or takes it back
  (reclaim). In converge mode only ``never`` is meaningful (what guests write during the job is
  copied too, so the target does not match "the bitmap's point" at any instant) and the other
  modes are refused, as in the mirror bitmap mode proposed for qemu;
- the copy engine (``jobs/copy.py``) with the ``on-source-error``/``on-target-error`` policies,
  the speed limit, pause and cancel points, progress, and the drained clean-up.

``blockdev-backup`` (:class:`~pynbd.jobs.backup.BackupJob`), ``blockdev-mirror`` and active
``block-commit`` (:class:`~pynbd.jobs.mirror.MirrorJob`) are front-ends that fix the mode and keep
qemu's job types; ``x-blockdev-copy`` makes a ``CopyJob`` of type ``copy``, and ``pynbd img
convert``/``commit`` run converge copies to completion without a pivot.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from pynbd.bitmap import DirtyBitmap, NodeBitmap
from pynbd.graph.core import BlockGraph, GraphUser, can_replace, chain_links
from pynbd.graph.io import drained
from pynbd.graph.perms import ALL, Perm
from pynbd.graph.reopen import restore
from pynbd.jobs.copy import CopyEngine, CopyError, read_chunk, write_chunk
from pynbd.jobs.core import Job, JobCancelled
from pynbd.jobs.punch import HolePunch
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.cbw import CopyBeforeWriteNode
from pynbd.nodes.mirror_top import MirrorTopNode

log = logging.getLogger("pynbd.copy")

POINT_IN_TIME = "point-in-time"
CONVERGE = "converge"
MODES = (POINT_IN_TIME, CONVERGE)
SYNC_MODES = ("none", "full", "top", "incremental", "bitmap")
BITMAP_MODES = ("on-success", "never", "always")
DEFAULT_GRANULARITY = 65536

#: what each mode says when source and target sizes differ (qemu's backup and mirror texts)
SIZE_MISMATCH = {
    POINT_IN_TIME: "Source and target must have the same size",
    CONVERGE: "Source and target image have different sizes",
}


class CopyJob(Job):
    """Copy ``source`` to ``target`` in ``mode`` (see the module docstring).

    ``base`` makes a converge copy an active commit (``target`` is then the source's base);
    ``discard_committed`` (active commit only) gives each committed chunk back from the layers
    above the base (:class:`~pynbd.jobs.punch.HolePunch`). ``replaces`` (converge only): the
    node the pivot replaces by the target, the source or a node below it through filters only
    (blockdev-mirror's ``replaces``); None: the source.
    For ``pynbd img`` (converge only): ``zero_detect`` (bytes, 0 = off) writes aligned blocks of
    zeroes found in data as zeroes (qemu-img convert's ``-S``); ``target_is_zero`` says the
    target reads as zeroes, so the first pass skips zero ranges instead of writing them;
    ``share_target_writes`` lets the tool's own handle on the target image keep its write
    permission (and so its lock against other processes) while the job writes on its behalf.
    A copy that fails on a read or write keeps the error in :attr:`copy_error` (where it was,
    for qemu-img's messages)."""

    job_type = "copy"

    def __init__(
        self,
        job_id: str,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        mode: str,
        sync: str = "full",
        *,
        bitmap: NodeBitmap | None = None,
        bitmap_mode: str = "on-success",
        granularity: int = DEFAULT_GRANULARITY,
        filter_node_name: str | None = None,
        on_source_error: str = "report",
        on_target_error: str = "report",
        pivot: bool = True,
        write_blocking: bool = False,
        base: BlockNode | None = None,
        discard_committed: bool = False,
        replaces: BlockNode | None = None,
        zero_detect: int = 0,
        target_is_zero: bool = False,
        share_target_writes: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(job_id, **kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown copy mode {mode!r}")
        converge_only = (
            base is not None,
            replaces is not None,
            write_blocking,
            zero_detect,
            target_is_zero,
            share_target_writes,
        )
        if mode == POINT_IN_TIME and any(converge_only):
            raise ValueError(
                "base, replaces, write-blocking, zero detection, target-is-zero and shared target writes "
                "are converge options"
            )
        if discard_committed and base is None:
            raise ValueError("hole punching (discard-committed) is for active commit only")
        if mode == CONVERGE and bitmap is not None and bitmap_mode != "never":
            raise ValueError("a converge copy keeps its bitmap only with bitmap-mode 'never'")
        self.graph = graph
        self.source = source
        self.target = target
        self.mode = mode
        self.sync = sync
        self.bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.pivot = pivot
        self.base = base
        self.replaces = replaces
        self.zero_detect = zero_detect
        self.target_is_zero = target_is_zero
        self.share_target_writes = share_target_writes
        self.copy_error: CopyError | None = None
        self.device = source.node_name
        self.user = GraphUser(job_id, "block-job", f"{self.job_type} job {job_id!r}")
        self.users = [self.user]
        #: active commit with hole punching: the layers above the base, given back as it goes
        self.punch = HolePunch(graph, self.user, source, base) if discard_committed and base is not None else None
        if self.punch is not None:  # a chunk must cover whole clusters of every layer
            granularity = max(granularity, self.punch.granularity)
        name = filter_node_name or graph.auto_name()
        self.filter: CopyBeforeWriteNode | MirrorTopNode
        if mode == POINT_IN_TIME:
            self.filter = CopyBeforeWriteNode(name)
        else:
            self.filter = MirrorTopNode(name, granularity, active_commit=base is not None)
            self.filter.write_blocking = write_blocking
        self.filter.owner_job = job_id
        #: point-in-time: the clusters the job copies, which copy-before-write guards (its access)
        self.copy_set: DirtyBitmap | None = None
        self.pivoted = False
        #: active commit: the base nodes reopened read-write for the job (read-only again at the
        #: end unless the job pivoted to them); the caller reopens them before the job starts
        self.reopened: list[BlockNode] = []

    # -- set-up (inside the QMP command or transaction) --------------------------------------------

    def install(self, tran) -> None:
        """Insert the filter above the source, attach the job's links, give the bitmap its
        successor; all undone if ``tran`` aborts."""
        if self.base is None and self.source.size != self.target.size:
            raise BlockError(errno.EINVAL, SIZE_MISMATCH[self.mode])
        graph = self.graph
        if self.base is not None:  # active commit: reads the chain, changes none of its links
            self.frozen = graph.freeze_chain(self.source, self.base, self.holder)
            tran.add(abort=lambda: graph.unfreeze_links(self.frozen, self.holder))
        if self.mode == POINT_IN_TIME:
            graph.insert_filter(tran, self.filter, self.source, target=self.target)
            self.filter.activate()
            self.reader = graph.attach_user(self.user, self.filter, Perm(0), ALL)
            graph.attach_user(self.user, self.target, Perm(0), ALL)
        else:
            graph.insert_filter(tran, self.filter, self.source)
            self.reader = graph.attach_user(self.user, self.filter, Perm(0), ALL)
            shared = Perm.WRITE_UNCHANGED
            if self.base is not None:
                shared |= Perm.CONSISTENT_READ | Perm.WRITE
            if self.share_target_writes:
                shared |= Perm.WRITE
            self.writer = graph.attach_user(self.user, self.target, Perm.WRITE, shared)
        tran.add(abort=lambda: graph.detach_user(self.user))
        if self.mode == CONVERGE:
            self.filter.activate(self.writer)
        if self.punch is not None:  # active commit: converge mode, a mirror_top filter
            assert isinstance(self.filter, MirrorTopNode)
            self.punch.attach(self.writer)
            self.filter.skip_depth = len(self.punch.layers)
        if self.bitmap is not None:
            self.bitmap.successor = DirtyBitmap(self.bitmap.bitmap.size, self.bitmap.granularity)
            tran.add(abort=lambda: setattr(self.bitmap, "successor", None))
        if self.mode == POINT_IN_TIME:
            # copy-before-write saves only the clusters the job copies: the copy set is its access
            self.copy_set = self._wanted(self.filter.cluster_size)
            self.filter.access = self.copy_set

    # -- what to copy ---------------------------------------------------------------------------

    def _wanted(self, granularity: int) -> DirtyBitmap:
        """The clusters ``sync`` asks for, before ``top`` keeps only what is allocated. In
        point-in-time mode ``none`` still guards every cluster (fleecing); in converge mode it
        is nothing (only what guests write will be copied)."""
        wanted = DirtyBitmap(self.source.size, granularity)
        if self.sync in ("bitmap", "incremental"):
            wanted.merge(self.bitmap.bitmap)
        elif self.sync != "none" or self.mode == POINT_IN_TIME:
            wanted.fill()
        return wanted

    async def _keep_allocated(self, wanted: DirtyBitmap) -> None:
        """``sync=top``: keep only the clusters the source's own layer allocates; active commit:
        the clusters any layer above the base allocates (from metadata, never reading data)."""
        if self.base is not None:
            layers = len(chain_links(self.source, self.base))
        elif self.sync == "top":
            layers = 1
        else:
            return
        allocated = DirtyBitmap(wanted.size, wanted.granularity)
        offset = 0
        async with self.user.busy():
            extents = await self.reader.allocation_depth(0, self.reader.size)
        for length, depth in extents:
            if 1 <= depth <= layers:
                allocated.set_range(offset, length)
            offset += length
        await self.checkpoint()
        wanted.bits &= allocated.bits

    async def _first_pass_ranges(self) -> list[tuple[int, int]]:
        if self.mode == POINT_IN_TIME:
            await self._keep_allocated(self.copy_set)
            return [] if self.sync == "none" else self.copy_set.dirty_ranges()
        wanted = self._wanted(self.filter.granularity)
        await self._keep_allocated(wanted)
        self.filter.dirty.merge(wanted)  # with what guests already wrote since the start
        return self.filter.dirty.dirty_ranges()

    # -- work -----------------------------------------------------------------------------------

    def _engine(self, first_pass: bool) -> CopyEngine:
        """The first pass gives way to client requests (pynbd.priority); converge passes after
        it chase what guests keep dirtying, and do not."""
        if self.mode == POINT_IN_TIME:
            copy, chunk = self.filter.copy_range, self.filter.cluster_size
        else:
            copy, chunk = self._copy, self.filter.granularity * 16
        return CopyEngine(
            self, copy, self.on_source_error, self.on_target_error, chunk=chunk, yield_to_clients=first_pass
        )

    async def work(self) -> None:
        try:
            await self._work()
        except CopyError as exc:
            self.copy_error = exc
            raise

    async def _work(self) -> None:
        first = await self._first_pass_ranges()
        self.total_progress = sum(length for _, length in first)
        await self._engine(first_pass=True).run(first)
        self.target_is_zero = False  # later passes rewrite ranges the first one may have filled
        if self.mode == CONVERGE:
            await self._converge()
        elif self.sync == "none":
            await self._cancel_event().wait()  # fleecing: copy-before-write only, until cancelled

    async def _copy(self, offset: int, length: int) -> None:
        """Converge: copy one chunk; guests wait only while it is read (see nodes/mirror_top.py)."""
        top = self.filter
        async with top.copy_lock.hold(offset, offset + length):
            async with top.lock.hold(offset, offset + length):
                top.dirty.reset_range(offset, length)
                try:
                    # read below the filter, through its own link to the source: a serialising
                    # write registered on the filter (a backup's copy-before-write into this
                    # source, slow-target overlay) waits for the range lock held here, and a read
                    # through the filter would wait for it: a deadlock. Under the range lock this
                    # reads exactly what the filter would pass through.
                    staged = await read_chunk(top.source, offset, length, zero_detect=self.zero_detect)
                except BaseException:
                    top.dirty.set_range(offset, length)
                    raise
            try:
                await write_chunk(self.writer, staged, target_is_zero=self.target_is_zero)
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
        top = self.filter
        assert self.punch is not None and isinstance(top, MirrorTopNode) and top.dirty is not None
        await self.punch.release_below_top(offset, length)
        async with top.lock.hold(offset, offset + length):
            pos = offset
            for run, dirty in top.dirty.extents(offset, length):
                if not dirty:
                    await self.punch.release_top(pos, run)
                pos += run

    async def _copy_dirty(self, engine: CopyEngine, converge: bool = False) -> None:
        """Copy until nothing is dirty. With ``converge``, a pass that does not at least halve what
        is dirty switches the filter to write-blocking (see the module docstring)."""
        before = None
        while True:
            ranges = self.filter.dirty.dirty_ranges()
            if not ranges:
                return
            self.filter.new_dirt.clear()
            total = sum(length for _, length in ranges)
            if converge and before is not None and total * 2 > before and not self.filter.write_blocking:
                log.info("copy %s: guests dirty as fast as it copies; switching to write-blocking", self.id)
                self.filter.write_blocking = True
            before = total
            self.total_progress = max(self.total_progress, self.current_progress + total)
            await engine.run(ranges)

    async def _converge(self) -> None:
        engine = self._engine(first_pass=False)
        await self._copy_dirty(engine, converge=True)
        self.set_ready()
        while not self.complete_requested:
            waiter = asyncio.create_task(self.filter.new_dirt.wait())
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
        self.filter.write_blocking = True
        await self._copy_dirty(engine)
        if self.cancelled:  # a copy as of now: settle it now, no pivot will follow
            await self._final_pass(pivot=False)

    async def _final_pass(self, pivot: bool) -> None:
        """With the filter drained (no guest write in flight or starting), copy what is still
        dirty and flush the target: it then holds every write acknowledged so far. With
        ``pivot``, every user of the source then moves to the target, still drained."""
        async with drained([self.filter, self.target], owner=self.user):
            for offset, length in self.filter.dirty.dirty_ranges():
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
                    self.graph.replace_node(self.filter, self.target)  # the source's users are the filter's
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
        if self.mode == CONVERGE and not self.cancelled:  # cancelled when ready: settled in work()
            await self._final_pass(pivot=self.pivot)
        if self.bitmap is not None:
            if self.bitmap_mode == "never":
                self._reclaim()
            else:
                self._abdicate()

    async def abort(self) -> None:
        if self.bitmap is None:
            return
        if self.bitmap_mode == "always":  # point-in-time only (refused in converge mode)
            # what was not copied must stay dirty for the next backup
            uncopied = self.copy_set.copy()
            uncopied.bits &= ~self.filter.done.bits
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
        if self.mode == POINT_IN_TIME:
            # (a converge copy flushed in its final pass; a failed one leaves nothing to keep)
            try:
                async with self.user.busy():
                    await self.filter.target.flush()
            except (BlockError, OSError) as exc:
                log.warning("copy %s: flushing the target failed: %s", self.id, exc)
            # copy-before-write's own link to the target goes with the filter: drain both
            await self.leave_graph(self.graph, [self.filter, self.target], self.filter, self.source)
        else:
            await self.leave_graph(self.graph, [self.filter], self.filter, self.source)
        if self.reopened and not self.pivoted:
            await restore(self.graph, self.reopened, True)
        if self.punch is not None:  # layers reopened for the job stay nodes of the graph
            await self.punch.restore()


__all__ = ["BITMAP_MODES", "CONVERGE", "MODES", "POINT_IN_TIME", "SYNC_MODES", "CopyJob"]
