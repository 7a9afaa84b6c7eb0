"""``block-stream``: copy the data of the backing chain down to ``base`` up into the top node,
then make ``base`` the top's backing (or drop the backing altogether).

As in qemu since 6.0, the job puts a ``copy-on-read`` filter (with ``bottom`` just above the
base) over the top and reads every range the top does not allocate through it; the filter's range
lock keeps each copy-up atomic against the guest's writes. The chain is frozen while it runs.

``on-error`` follows qemu 7.2's block/stream.c exactly: the policy acts on ranges of
:data:`STREAM_CHUNK`; every failure of a copy-up (reading the chain, or writing the top) is a
``read`` error; ``stop`` pauses the job (io-status ``failed``, or ``nospace`` for ENOSPC) and
retries the range on resume; ``ignore`` goes on past the range but still fails the job at the end,
so the backing link stays and the range that was not streamed is still read from the chain. The
job's error is the errno's text (``Input/output error``), as qemu's.
"""

from __future__ import annotations

import logging
import os

from pynbd.errors import BlockError
from pynbd.graph.core import BlockGraph, ChildLink, GraphUser, chain_links
from pynbd.graph.io import drained
from pynbd.graph.perms import Perm
from pynbd.graph.reopen import restore
from pynbd.jobs.commit import record_backing
from pynbd.jobs.copy import CopyEngine, CopyError
from pynbd.jobs.core import Job
from pynbd.nodes.base import BlockNode
from pynbd.nodes.cor import CopyOnReadNode

log = logging.getLogger("pynbd.stream")

#: qemu's STREAM_CHUNK: the unit of copy-up, and so of an error policy's range
STREAM_CHUNK = 512 * 1024


class StreamJob(Job):
    job_type = "stream"

    def __init__(
        self,
        job_id: str,
        graph: BlockGraph,
        top: BlockNode,
        base: BlockNode | None,
        filter_node_name: str | None = None,
        on_error: str = "report",
        backing_file: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(job_id, **kwargs)
        self.graph = graph
        self.backing_file = backing_file
        self.top = top
        self.base = base
        self.on_error = on_error
        self.device = top.node_name
        links = chain_links(top, base)
        self.bottom: BlockNode | None = None  # the node just above the base
        if base is not None and links:
            above_base = links[-1].parent
            assert isinstance(above_base, BlockNode)  # a backing link's parent is a node
            self.bottom = above_base
        self.cor = CopyOnReadNode(filter_node_name or graph.auto_name(), bottom=self.bottom)
        self.cor.owner_job = job_id
        self.user = GraphUser(job_id, "block-job", f"stream job {job_id!r}")
        self.users = [self.user]
        #: a read-only top is reopened read-write for the job (by the command, as qemu's
        #: stream_start does) and read-only again when it ends
        self.reopened: list[BlockNode] = []

    def links_to_freeze(self) -> tuple[list[ChildLink], list[ChildLink]]:
        """The chain's links, which must stay as they are while the job copies, and among them
        the one the job changes on completion: the top's backing link, re-pointed at the base or
        dropped (none if it already points at the base)."""
        links = chain_links(self.top, self.base)
        backing = self.top.children.get("backing")
        changes = [link for link in links if link is backing and link.node is not self.base]
        return links, changes

    def check_links(self) -> None:
        """Raise as :meth:`install` would if the chain cannot be frozen, changing nothing."""
        links, changes = self.links_to_freeze()
        self.graph.check_freeze(links, self.holder, changes)

    def install(self, tran) -> None:
        graph = self.graph
        links, changes = self.links_to_freeze()
        self.frozen = graph.freeze_links(links, self.holder, changes)
        tran.add(abort=lambda: graph.unfreeze_links(self.frozen, self.holder))
        graph.insert_filter(tran, self.cor, self.top)
        self.reader = graph.attach_user(
            self.user, self.cor, Perm.CONSISTENT_READ, Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED
        )
        tran.add(abort=lambda: graph.detach_user(self.user))

    async def work(self) -> None:
        if not self.frozen:  # nothing below the top: nothing to stream
            return
        async with self.user.busy():
            ranges = await self.cor.copy_up_ranges(0, self.top.size)
        self.total_progress = sum(length for _, length in ranges)
        engine = CopyEngine(self, self._copy_up, self.on_error, self.on_error, chunk=STREAM_CHUNK)
        try:
            await engine.run(ranges)
        except CopyError as exc:
            raise self._failure(exc) from exc
        if engine.ignored:  # qemu: "Do not remove the backing file if an error was there but ignored."
            raise self._failure(engine.ignored[0])
        async with self.user.busy():
            await self.reader.flush()

    def _failure(self, exc: CopyError) -> BlockError:
        """The job's error, in qemu's words (strerror); the cause goes to the log."""
        log.warning("stream job %s: %s", self.id, exc)
        return BlockError(exc.errno, os.strerror(exc.errno))

    async def _copy_up(self, offset: int, length: int) -> None:
        """Read the range through the copy-on-read filter, which writes it into the top. Any
        failure is a read error to the policy, as in qemu (is_read is always true in stream_run)."""
        try:
            await self.reader.read_into(offset, memoryview(bytearray(length)))
        except (BlockError, OSError) as exc:
            raise CopyError("read", exc, offset) from exc

    async def prepare(self) -> None:
        backing = self.top.children.get("backing")
        async with drained([self.cor], owner=self.user):
            self.graph.unfreeze_links(self.frozen, self.holder)
            self.frozen = []
            if backing is None or backing.node is self.base:
                return
            if self.base is None:
                self.graph.detach(backing)
            else:
                self.graph.replace_child(backing, self.base)
        await record_backing(self.top, self.base, self.backing_file)

    async def clean(self) -> None:
        await self.leave_graph(self.graph, [self.cor], self.cor, self.top)
        if self.reopened:
            await restore(self.graph, self.reopened, True)
