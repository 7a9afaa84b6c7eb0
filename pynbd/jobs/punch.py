"""Hole punching for ``block-commit`` (``x-discard-committed``, a pynbd extension).

A commit copies into the base what the layers above it hold, and the layers keep their copy.
With hole punching the job gives each range back as soon as the base holds it: it drops the
range's clusters from every layer between the base and the top (:meth:`BlockNode.unallocate`),
so the data shows through from the base, ``qemu-img map`` finds it only there and the layers'
files shrink. It costs a flush of the base and of each layer below the top per chunk: space
against speed, chosen per job.

Order, so that a crash at any moment leaves every image reading the right data through the chain:

1. the chunk is written into the base and the base is flushed: the data is on disk there before
   any layer lets go of it;
2. the layers are unallocated bottom-up, the one just above the base first, each flushed before
   the next one is touched. A layer still holding a cluster holds the same bytes as what lies
   below it, so whichever step was the last, in memory or on disk, reads through the top see the
   same bytes;
3. the top layer last. The top of an active commit is written by guests, so its clusters are
   dropped under the mirror filter's range lock and only if no guest wrote the range since the
   copy read it (the filter's dirty bitmap: pynbd/jobs/copyjob.py). The layers below the top are backing
   files, which only the job writes (as with qemu's commit, the permissions cannot keep a user
   who opened one of them read-write on purpose from writing it meanwhile: a commit does not
   expect that, with or without hole punching).

Reopening: backing files are opened read-only; the job reopens the layers read-write for its
lifetime (as it does the base) and read-only again at its end.
"""

from __future__ import annotations

import errno

from pynbd.graph.core import BlockGraph, ChildLink, GraphUser, chain_links
from pynbd.graph.perms import Perm, Role
from pynbd.graph.reopen import restore, set_read_only
from pynbd.nodes.base import BlockError, BlockNode

#: What the job lets others do on a layer it punches. WRITE too, as qemu's commit shares it on
#: the intermediate nodes: a backing link passes on what its parent shares, so unsharing WRITE
#: on a layer would forbid the job's own writes into the base below it.
LAYER_SHARED = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED


def layers_above(top: BlockNode, base: BlockNode) -> list[BlockNode]:
    """The format layers from ``top`` down to just above ``base``, top first: nodes whose link
    down the chain is a backing (COW) link. Filters hold no data of their own and are skipped."""
    return [link.parent for link in chain_links(top, base) if link.role & Role.COW]  # type: ignore[misc]


def check_layers(layers: list[BlockNode]) -> None:
    """Refuse hole punching on a chain with a layer that cannot give clusters back."""
    for layer in layers:
        if not layer.can_unallocate:
            raise BlockError(
                errno.ENOTSUP,
                f"x-discard-committed: {layer.describe()} (node '{layer.node_name}') cannot unallocate clusters",
            )


def punch_granularity(layers: list[BlockNode], minimum: int) -> int:
    """A unit of work covering whole clusters of every layer (only whole clusters can go)."""
    return max([minimum, *(layer.cluster_size for layer in layers)])


class HolePunch:
    """The layers a commit job gives clusters back from, and the job's links to them."""

    def __init__(self, graph: BlockGraph, user: GraphUser, top: BlockNode, base: BlockNode) -> None:
        self.graph = graph
        self.user = user
        self.layers = layers_above(top, base)  # top first
        check_layers(self.layers)
        self.granularity = punch_granularity(self.layers, 1)
        self.links: list[ChildLink] = []  # the job's, to each layer, top first
        self.base_link: ChildLink | None = None
        self.reopened: list[list[BlockNode]] = []  # per layer, the nodes made read-write

    async def make_writable(self) -> None:
        """Reopen read-only layers read-write (drained, as the base), bottom first."""
        for layer in reversed(self.layers):
            self.reopened.append(await set_read_only(self.graph, layer, False))

    def attach(self, base_link: ChildLink) -> None:
        """Take WRITE_UNCHANGED on each layer: dropping clusters the base holds too does not
        change what the chain reads. Call with the layers drained."""
        self.base_link = base_link
        for layer in self.layers:
            self.links.append(self.graph.attach_user(self.user, layer, Perm.WRITE_UNCHANGED, LAYER_SHARED))

    async def release_below_top(self, offset: int, length: int) -> None:
        """Steps 1 and 2 for a range just written into the base: flush the base, then drop the
        range from each layer below the top, bottom-up, flushing each."""
        assert self.base_link is not None
        await self.base_link.flush()
        for link in reversed(self.links[1:]):
            if await self._drop(link, offset, length):
                await link.flush()

    async def release_top(self, offset: int, length: int) -> None:
        """Step 3: drop the range from the top layer (after :meth:`release_below_top`; in an
        active commit only the parts no guest wrote since the copy read them). Not flushed here:
        the top's next flush (a guest's, the job's end) makes it durable, and until then the top
        on disk still holds the same bytes as the base."""
        if self.links:  # none: only filters between top and base
            await self._drop(self.links[0], offset, length)

    @staticmethod
    async def _drop(link: ChildLink, offset: int, length: int) -> bool:
        """Unallocate what the layer itself holds of the range; whether it held anything."""
        length = min(length, link.size - offset)  # a shorter layer below a longer top
        if length <= 0:
            return False
        if not any(depth == 1 for _, depth in await link.allocation_depth(offset, length)):
            return False
        await link.unallocate(offset, length)
        return True

    async def flush_top(self) -> None:
        """Make the top's dropped clusters durable, and their space free in its file, now."""
        if self.links:
            await self.links[0].flush()

    async def restore(self) -> None:
        """Layers reopened read-write for the job go back to read-only (top first)."""
        reopened, self.reopened = self.reopened, []
        for nodes in reversed(reopened):
            if nodes:
                await restore(self.graph, nodes, True)
