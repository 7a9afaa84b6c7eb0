"""The one interface every block node offers, in the manner of nbdkit's plugin callbacks.

Nobody calls these methods directly but the request gate (``pynbd/graph/io.py``): exports, jobs
and parent nodes make requests through their :class:`~pynbd.graph.core.ChildLink`, which checks
ranges and permissions, marks dirty bitmaps and tracks requests for drain, then calls the driver
here. A driver may therefore assume requests lie inside its size (or, for writes through a link
holding RESIZE, that growing is allowed), and reaches its own children through ``self.children``
links the same way.
"""


from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from contextvars import ContextVar
from typing import TYPE_CHECKING

from pynbd.bitmap import DirtyBitmap, NodeBitmap
from pynbd.errors import BlockError, NotFast
from pynbd.graph.io import HOLE_ZERO, NodeRequests, merge_extents
from pynbd.graph.perms import Perm, Role, default_child_perm
from pynbd.protocol.constants import State

if TYPE_CHECKING:
    from typing import TypeAlias

    from pynbd.graph.core import ChildLink

    #: where a format driver reads and writes its metadata: its ``file`` link (the bare node only
    #: while the image is being opened, before the link exists)
    Storage: TypeAlias = "BlockNode | ChildLink"
    from pynbd.graph.transaction import Transaction

Extent = tuple[int, int]  # (length, base:allocation state bits)
__all__ = ["BACKGROUND_IO", "HOLE_ZERO", "BlockError", "BlockNode", "Extent", "FilterNode", "NotFast", "merge_extents"]

#: True while the current task does a job's background copying: nodes that queue blocking I/O
#: (file.py) put such requests behind the clients' own, so a backup never starves the guest.
BACKGROUND_IO: ContextVar[bool] = ContextVar("BACKGROUND_IO", default=False)


class BlockNode(ABC):
    """A node of the block graph. Every method is a coroutine except :attr:`size`."""

    driver: str = "abstract"
    read_only: bool = False
    #: blockdev's force-share (qemu-img -U): every parent's link shares everything on this node,
    #: so its image is opened even while another process writes it. Only for read-only nodes.
    force_share: bool = False
    #: The unit in which the node allocates (a qcow2 cluster); 0 for nodes without one.
    cluster_size: int = 0
    #: The id of the job whose filter this node is (it inserts and removes it): nobody else may
    #: freeze its links, so the job can always take it out again.
    owner_job: str | None = None
    #: qemu's ``is_filter``: the node shows exactly the data of one child (:meth:`filter_child`).
    #: A mirror may replace a node it reaches from its source through filters only, and a node is
    #: never mirrored into itself through filters. (A raw node is not one, as in qemu.)
    is_filter: bool = False
    #: The node can have a ``backing`` child (a qcow2 overlay): blockdev-snapshot needs one.
    supports_backing: bool = False

    def __init__(self, node_name: str = "") -> None:
        self.node_name = node_name
        # Graph state, edited only by pynbd.graph.core.BlockGraph: links to children by name,
        # links from parents, and the cumulative permissions the parents hold and share.
        self.children: dict[str, ChildLink] = {}
        self.parents: list[ChildLink] = []
        self.perm = Perm(0)
        self.shared = Perm.all()
        self.dirty_bitmaps: dict[str, NodeBitmap] = {}
        #: Bitmaps of the graph's own (qemu's anonymous bitmaps): marked by the gate like
        #: :attr:`dirty_bitmaps`, but nameless, never listed, stored or exported
        self.internal_bitmaps: list[DirtyBitmap] = []
        self.io = NodeRequests()  # requests in flight and drains in force (pynbd/graph/io.py)
        self.unmap = True  # False: discards are dropped, zeroing never punches holes (discard=ignore)

    def mark_dirty(self, offset: int, length: int) -> None:
        for bitmap in self.dirty_bitmaps.values():
            bitmap.mark(offset, length)
        for internal in self.internal_bitmaps:
            internal.set_range(offset, length)

    def add_internal_bitmap(self, bitmap: DirtyBitmap) -> None:
        """Have the gate mark ``bitmap`` for every write, zero and discard that reaches this node
        from now on, whoever makes it: how a filter notices writes that bypass it."""
        self.internal_bitmaps.append(bitmap)

    def remove_internal_bitmap(self, bitmap: DirtyBitmap) -> None:
        self.internal_bitmaps = [b for b in self.internal_bitmaps if b is not bitmap]

    def child(self, name: str) -> ChildLink | None:
        """The link to child ``name`` (requests to the child go through it), if there is one."""
        return self.children.get(name)

    def child_node(self, name: str) -> BlockNode | None:
        link = self.children.get(name)
        return link.node if link is not None else None

    def filter_child(self) -> ChildLink | None:
        """The child whose data this node shows unchanged, if it is a filter (qemu's
        bdrv_filter_child)."""
        return None

    def child_role(self, name: str) -> Role:
        """The role of this node's child called ``name``: image storage for ``file``, COW for
        ``backing``, plain data otherwise. Drivers that filter say so by overriding this."""
        if name == "file":
            return Role.image()
        if name == "backing":
            return Role.COW
        return Role.DATA

    def child_perm(self, link: ChildLink, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """What this node takes from and shares on a child, given its parents' ``perm``/``shared``.

        The default is QEMU's rule for the link's role; filters with special needs override it.
        """
        return default_child_perm(link.role, perm, shared, writable=not self.read_only)

    def set_perm(self, tran: Transaction, perm: Perm, shared: Perm) -> None:
        """The graph settled new cumulative permissions on this node (file nodes lock here).

        Register an undo in ``tran`` for anything done; raise BlockError to refuse.
        """
        return None

    @property
    @abstractmethod
    def size(self) -> int:
        """Length in bytes."""

    @abstractmethod
    async def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    @abstractmethod
    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable before this returns."""

    @abstractmethod
    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, fast: bool = False
    ) -> None:
        """Make the range read as zeroes; ``may_trim`` allows a hole, ``fast`` raises NotFast
        rather than falling back to writing zero buffers."""

    @abstractmethod
    async def discard(self, offset: int, length: int) -> None:
        """Hint that the range is no longer needed; it may then read as anything (here: zeroes)."""

    @abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    @abstractmethod
    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """base:allocation extents covering exactly ``[offset, offset+length)``, merged."""

    @property
    def can_sendfile(self) -> bool:
        """Whether :meth:`sendfile_source` can ever return something (lets the server skip asking)."""
        return False

    @property
    def can_unallocate(self) -> bool:
        """Whether :meth:`unallocate` works: the node has layers of its own over a backing chain
        (qcow2) and can drop clusters so that reads fall through to the backing again."""
        return False

    async def unallocate(self, offset: int, length: int) -> None:
        """Drop the whole clusters inside the range from this layer, so that reads there fall
        through to the backing chain again (not zeroes, as a discard would make them). Only for
        data the backing chain holds too: a commit that copied it into the base, a copy-on-read
        copy-up. Nodes without layers of their own cannot (see :attr:`can_unallocate`)."""
        raise BlockError(errno.ENOTSUP, f"{self.describe()} cannot give clusters back to its backing chain")

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        """qemu:allocation-depth extents: 0 unallocated anywhere, 1 this node, 2 its backing, ...

        A node without a backing chain owns all its bytes (qemu reports raw files as depth 1 whole).
        """
        return [(length, 1)]

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch hint; nodes without a cache ignore it."""
        return None

    def sendfile_source(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, file offset) from which ``os.sendfile`` may send this range verbatim, if any."""
        return None

    async def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write at run time (blockdev-reopen, commit's base).

        Nodes that hold no resource of their own just flip the flag; drivers with files or
        metadata override this."""
        self.read_only = read_only

    async def start_writing(self) -> None:
        """The node, open or reopened read-write, now holds its write permission and file locks:
        a format writes here what a writable open needs (qcow2: bitmaps marked IN_USE), never
        before, so an image another process holds is never touched."""
        return None

    async def close(self) -> None:
        """Release the node's resources; the default flushes."""
        await self.flush()

    def describe(self) -> str:
        return f"{self.driver} node {self.node_name!r}"


DATA = int(State.DATA)


class FilterNode(BlockNode):
    """A node that shows its child ``child_name`` with something added, like an nbdkit filter:
    every operation it does not override goes straight to the child (nbdkit's ``next_*`` calls).
    The child is a node of its own, so closing a filter closes nothing below it."""

    child_name = "file"
    is_filter = True

    def child_role(self, name: str) -> Role:
        return Role.filtered() if name == self.child_name else Role.DATA

    def filter_child(self) -> ChildLink | None:
        return self.children.get(self.child_name) if self.is_filter else None

    @property
    def filtered(self) -> ChildLink:
        """The link to the filtered child: requests to it go through the gate."""
        return self.children[self.child_name]

    @property
    def size(self) -> int:
        return self.filtered.size

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.filtered.read_into(offset, buf)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self.filtered.write(offset, data, fua)

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        await self.filtered.write_zeroes(offset, length, may_trim, fua, fast)

    async def discard(self, offset: int, length: int) -> None:
        await self.filtered.discard(offset, length)

    async def flush(self) -> None:
        await self.filtered.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.filtered.block_status(offset, length)

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        return await self.filtered.allocation_depth(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.filtered.cache(offset, length)

    async def close(self) -> None:
        return None
