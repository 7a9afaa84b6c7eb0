"""``copy-on-read``: data read through this filter from the backing chain is written into the top.

With ``bottom``, only data allocated above ``bottom`` is copied up (what a stream down to that
base needs); without it, anything not allocated in the top. A range lock makes each copy-up (read
then write back) atomic against guest writes to the same bytes, so a copy-up never overwrites
newer data.

Beyond qemu, ``x-track-copied`` remembers what was copied up so that :meth:`release_copied`
(``x-copy-on-read-release``) can give the space back: the backing chain still holds the same
bytes, so the top need not. A cluster of the top is released only if

- the filter copied all of it up (tracking is at the top's cluster size; a cluster a copy-up only
  partly covered also holds bytes of the top's own, so it stays);
- nobody wrote it since, through the filter or past it (a second export of the top, a job): an
  internal bitmap on the top, marked by the request gate (pynbd/graph/io.py) like any dirty
  bitmap, sees every write, zero and discard, whoever makes it;
- the top still has the same backing chain beneath it (the same nodes, in the same order), and
  none of them was written there since (an internal bitmap on each of them): only then does
  the cluster read the same once the top lets go of it.

Everything else stays where it is.
"""

from __future__ import annotations

from bitarray import bitarray

from pynbd.bitmap import DirtyBitmap
from pynbd.graph.core import ChildLink, chain_links
from pynbd.graph.io import drained
from pynbd.graph.perms import PASSTHROUGH, Perm
from pynbd.nodes.base import BlockNode, FilterNode
from pynbd.nodes.tracking import RangeLock


def backing_chain(top: BlockNode) -> list[BlockNode]:
    """The nodes beneath ``top`` that its unallocated clusters read from, top-most first."""
    return [link.node for link in chain_links(top, None)]


class CopiedClusters:
    """What one copy-on-read filter copied up into one top over one backing chain.

    Three kinds of bitmap, all at the top's cluster size and over the top's size (so that their
    bits line up): ``copied``, the clusters wholly copied up; ``written``, internal on the top,
    every cluster written there since; ``below``, internal on each node of the chain, every
    cluster written there since. A cluster is *releasable* while it is copied, not written and
    unchanged below. Bits of clusters that are not releasable mean nothing and are reset when a
    read through the filter may copy such a cluster up afresh.
    """

    def __init__(self, top: BlockNode, chain: list[BlockNode]) -> None:
        self.top = top
        self.chain = chain
        self.granularity = top.cluster_size
        self.copied = self._bitmap()
        self.written = self._bitmap()
        self.below = [self._bitmap() for _ in chain]
        self.watching = [(top, self.written), *((node, bitmap) for node, bitmap in zip(chain, self.below, strict=True))]
        for node, bitmap in self.watching:
            node.add_internal_bitmap(bitmap)

    def _bitmap(self) -> DirtyBitmap:
        return DirtyBitmap(self.top.size, self.granularity)

    def stop(self) -> None:
        """Stop watching the nodes (their writes no longer concern anyone)."""
        for node, bitmap in self.watching:
            node.remove_internal_bitmap(bitmap)

    def matches(self, top: BlockNode, chain: list[BlockNode]) -> bool:
        """Whether this tracks ``top`` over exactly the nodes of ``chain`` (identity, not name:
        a node deleted and re-added under the same name is another node)."""
        if top is not self.top or len(chain) != len(self.chain):
            return False
        return all(now is then for now, then in zip(chain, self.chain, strict=True))

    def _releasable(self, clusters: slice) -> bitarray:
        keep = self.copied.bits[clusters] & ~self.written.bits[clusters]
        for bitmap in self.below:
            keep &= ~bitmap.bits[clusters]
        return keep

    def before_read(self, offset: int, length: int) -> None:
        """A read through the filter is about to copy up what the top lacks in the range: start
        watching afresh every cluster it touches that is not releasable now. (A releasable
        cluster is allocated in the top, so it is not copied up again; its bits keep counting.)"""
        g = self.granularity
        clusters = slice(offset // g, (offset + length + g - 1) // g)
        self.copied.bits[clusters] = self._releasable(clusters)
        self.written.bits[clusters] = 0  # a releasable cluster has no written bit to lose
        for bitmap in self.below:
            bitmap.bits[clusters] = 0

    def copied_up(self, offset: int, length: int) -> None:
        """The filter just wrote ``[offset, offset+length)``, read from the chain, into the top.

        Called right after the copy-up's serialising write returns, before anything else runs:
        that write waited for every overlapping request in flight on the top and held off new
        ones until it ended, so the only write to these clusters marked in ``written`` since is
        the copy-up's own, and a write that comes next is marked after this. Clusters the chain
        wrote since :meth:`before_read` may hold other bytes than those copied: not recorded."""
        g, size = self.granularity, self.top.size
        end = min(offset + length, size)
        first = (offset + g - 1) // g
        last = (end + g - 1) // g if end == size else end // g
        if first >= last:
            return  # no cluster wholly copied up
        clusters = slice(first, last)
        unchanged = bitarray(last - first, endian="little")
        unchanged.setall(1)
        for bitmap in self.below:
            unchanged &= ~bitmap.bits[clusters]
        self.copied.bits[clusters] = unchanged
        self.written.bits[clusters] = 0

    async def release(self, top: ChildLink) -> int:
        """Unallocate every releasable cluster in the top (through the filter's link ``top``);
        returns the bytes released. The caller holds the top drained, so no write can reach a
        cluster between check and drop."""
        releasable = self._bitmap()
        releasable.bits = self._releasable(slice(None))
        released = 0
        for offset, length in releasable.dirty_ranges():
            await top.unallocate(offset, length)
            self.copied.reset_range(offset, length)
            released += length
        return released


class CopyOnReadNode(FilterNode):
    driver = "copy-on-read"

    def __init__(self, node_name: str = "", bottom: BlockNode | None = None, track_copied: bool = False) -> None:
        super().__init__(node_name)
        self.bottom = bottom
        self.lock = RangeLock()
        self.track_copied = track_copied
        self.tracked: CopiedClusters | None = None

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

    def _tracking(self) -> CopiedClusters | None:
        """With ``x-track-copied``: the record for the top and backing chain there are now. What
        was recorded over another top or chain can never be released, and is dropped."""
        if not self.track_copied:
            return None
        top = self.filtered.node
        chain = backing_chain(top)
        if self.tracked is not None and self.tracked.matches(top, chain):
            return self.tracked
        self._stop_tracking()
        if top.can_unallocate:  # (the child may have been reopened onto one that cannot)
            self.tracked = CopiedClusters(top, chain)
        return self.tracked

    def _stop_tracking(self) -> None:
        if self.tracked is not None:
            self.tracked.stop()
            self.tracked = None

    async def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        async with self.lock.hold(offset, offset + length):
            tracked = self._tracking()
            if tracked is not None:
                tracked.before_read(offset, length)
            await self.filtered.read_into(offset, buf)
            for start, run in await self.copy_up_ranges(offset, length):
                piece = buf[start - offset : start - offset + run]
                if tracked is None:
                    await self.filtered.write(start, piece)
                    continue
                await self.filtered.serialising_write(start, piece)
                tracked.copied_up(start, run)  # at once: see CopiedClusters.copied_up

    async def release_copied(self) -> int:
        """Unallocate, in the top, the clusters that are releasable (see the module docstring);
        returns the bytes released. The top is drained meanwhile (and with it this filter and
        every other parent of the top): no request through the filter, no write by another
        parent, runs between finding a cluster unwritten and dropping it."""
        async with drained([self.filtered.node]):
            tracked = self.tracked
            if tracked is None:
                return 0
            if not tracked.matches(self.filtered.node, backing_chain(self.filtered.node)):
                self._stop_tracking()  # another top, or another chain beneath it: keep it all
                return 0
            return await tracked.release(self.filtered)

    async def _guest(self, offset: int, length: int, apply) -> None:
        # the gate marks the write in the tracking bitmap of the top; the lock keeps it from
        # landing between a copy-up's read and its write back
        async with self.lock.hold(offset, offset + length):
            await apply()

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self._guest(offset, len(data), lambda: self.filtered.write(offset, data, fua))

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        await self._guest(offset, length, lambda: self.filtered.write_zeroes(offset, length, may_trim, fua, fast))

    async def discard(self, offset: int, length: int) -> None:
        await self._guest(offset, length, lambda: self.filtered.discard(offset, length))

    async def close(self) -> None:
        self._stop_tracking()
