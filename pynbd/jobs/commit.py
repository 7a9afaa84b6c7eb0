"""Intermediate commit (``block-commit`` with ``top`` below the active layer).

The data allocated from ``top`` down to just above ``base`` is copied into ``base``; then the
overlay above ``top`` is pointed at ``base`` and the committed layers leave the graph. The chain
from the overlay down to the base is frozen while the job runs, so nobody re-points it under the
copy. Beyond qemu: with ``x-discard-committed`` each chunk is dropped from the committed layers
as soon as the base holds it (pynbd/jobs/punch.py: space back on long chains, at the price of
flushes; off by default). Ranges no layer above the base allocates are never read nor written:
the allocation depth tells, from metadata alone.
"""

from __future__ import annotations

import os

from pynbd.graph.core import BlockGraph, ChildLink, GraphUser, chain_links
from pynbd.graph.io import drained
from pynbd.graph.perms import ALL, Perm
from pynbd.graph.reopen import restore, set_read_only
from pynbd.jobs.copy import DEFAULT_CHUNK, CopyEngine, copy_chunk
from pynbd.jobs.core import Job
from pynbd.jobs.punch import HolePunch
from pynbd.nodes.base import BlockNode


class CommitJob(Job):
    job_type = "commit"

    def __init__(
        self,
        job_id: str,
        graph: BlockGraph,
        overlay_link: ChildLink,
        top: BlockNode,
        base: BlockNode,
        on_error: str = "report",
        discard_committed: bool = False,
        backing_file: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(job_id, **kwargs)
        self.graph = graph
        self.overlay_link = overlay_link  # the backing link of the node above top
        self.top = top
        self.base = base
        self.on_error = on_error
        self.backing_file = backing_file
        self.device = overlay_link.parent.node_name
        self.user = GraphUser(job_id, "block-job", f"commit job {job_id!r}")
        self.users = [self.user]
        self.layers = len(chain_links(top, base))
        self.reopened: list[BlockNode] = []
        #: hole punching: the committed layers and the job's links to them (None: off)
        self.punch = HolePunch(graph, self.user, top, base) if discard_committed else None

    def install(self, tran) -> None:
        # the overlay's backing link is re-pointed at the base on completion: this job owns that change
        chain = [self.overlay_link, *chain_links(self.top, self.base)]
        self.frozen = self.graph.freeze_links(chain, self.holder, changes=[self.overlay_link])
        tran.add(abort=lambda: self.graph.unfreeze_links(self.frozen, self.holder))
        self.reader = self.graph.attach_user(self.user, self.top, Perm(0), ALL)
        tran.add(abort=lambda: self.graph.detach_user(self.user))

    async def work(self) -> None:
        self.reopened = await set_read_only(self.graph, self.base, False)
        if self.punch is not None:
            await self.punch.make_writable()
        perm = Perm.CONSISTENT_READ | Perm.WRITE
        async with drained([self.base], owner=self.user):
            self.writer = self.graph.attach_user(
                self.user, self.base, perm, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
            )
            if self.punch is not None:
                self.punch.attach(self.writer)
        ranges, offset = [], 0
        async with self.user.busy():
            extents = await self.reader.allocation_depth(0, self.reader.size)
        for length, depth in extents:
            if 1 <= depth <= self.layers:
                ranges.append((offset, length))
            offset += length
        copy, chunk = self._copy, DEFAULT_CHUNK
        if self.punch is not None:  # whole clusters of every layer per chunk: only those can go
            unit = self.punch.granularity
            ranges = align_ranges(ranges, unit, self.reader.size)
            copy, chunk = self._copy_and_punch, max(chunk, unit)
        self.total_progress = sum(length for _, length in ranges)
        engine = CopyEngine(self, copy, self.on_error, self.on_error, chunk=chunk)
        await engine.run(ranges)
        async with self.user.busy():
            await self.writer.flush()
            if self.punch is not None:
                await self.punch.flush_top()

    async def _copy(self, offset: int, length: int) -> None:
        await copy_chunk(self.reader, self.writer, offset, length)

    async def _copy_and_punch(self, offset: int, length: int) -> None:
        """Copy what the layers hold of a cluster-aligned chunk, then drop the chunk from them
        (only once it is all in the base: a failed copy raises before anything is dropped)."""
        assert self.punch is not None
        pos, layers = offset, len(self.punch.layers)
        for ext_len, depth in await self.reader.allocation_depth(offset, length):
            if 1 <= depth <= layers:
                await copy_chunk(self.reader, self.writer, pos, ext_len)
            pos += ext_len
        await self.punch.release_below_top(offset, length)
        await self.punch.release_top(offset, length)  # nobody else writes it: no check needed

    async def prepare(self) -> None:
        async with drained([self.overlay_link.parent, self.base], owner=self.user):
            self._pivot()
        await record_backing(self.overlay_link.parent, self.base, self.backing_file)

    def _pivot(self) -> None:
        self.graph.unfreeze_links(self.frozen, self.holder)
        self.frozen = []
        self.graph.replace_child(self.overlay_link, self.base)

    async def clean(self) -> None:
        await self.leave_graph(self.graph, [self.top, self.base])
        if self.reopened:
            await restore(self.graph, self.reopened, True)
        if self.punch is not None:  # the layers stay nodes of the graph (named, or below one)
            await self.punch.restore()


def align_ranges(ranges: list[tuple[int, int]], unit: int, size: int) -> list[tuple[int, int]]:
    """``ranges`` (sorted) widened to multiples of ``unit`` (but not past ``size``), merged."""
    out: list[list[int]] = []
    for offset, length in ranges:
        start, end = offset // unit * unit, min(size, -(-(offset + length) // unit) * unit)
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(start, end - start) for start, end in out]


async def record_backing(node: BlockNode, backing: BlockNode | None, name: str | None = None) -> None:
    """Write the new backing file into ``node``'s image header (qcow2), as qemu does after commit
    and stream: by default the backing image's file name, relative when it sits beside the image."""
    setter = getattr(node, "set_backing_file", None)
    if setter is None or node.read_only:
        return
    if backing is None:
        await setter(None, None)
        return
    if name is None:
        target = getattr(backing, "filename", "") or ""
        here = os.path.dirname(getattr(node, "filename", "") or "")
        if not target:
            return  # not a file (an nbd node, say): nothing a header could name
        name = os.path.relpath(target, here) if here and os.path.dirname(target) == here else target
    await setter(name, backing.driver if backing.driver in ("raw", "qcow2") else "raw")
