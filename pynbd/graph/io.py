"""The block-request layer: the one gate every request to a node passes, and drain.

Every read, write, zero, discard, flush and status query on a node is made through a
:class:`~pynbd.graph.core.ChildLink` (an export's, a job's, or a parent node's link to its child),
never by calling the driver directly; the link's methods are defined here, as qemu's
``block/io.c`` (``bdrv_co_preadv(child, ...)``) and nbdkit's ``server/backend.c`` are the one
place between a caller and a driver. On every call the gate

- checks the range against the node's size (a write past the end only through a link that holds
  RESIZE: a format node growing its file) and, for requests that change data, that the link
  holds WRITE or WRITE_UNCHANGED;
- applies the node's ``discard`` policy (``unmap`` off: discards dropped, zeroing never punches);
- marks the node's dirty bitmaps (named ones and the graph's internal ones) for writes, zeroes
  and discards, *before* the driver runs, so a failed request or a crash never leaves a change
  unrecorded;
- records the request as in flight on the node (:class:`NodeRequests`), with its byte range, so
  that serialising writes (fleecing: a copy into an overlay that reads through to the disk being
  written) wait for overlapping requests and hold off new ones;
- and, for the graph's root users (exports, jobs), waits while the node is *drained*.

**Drain** (:func:`drained`) is what makes graph changes safe against requests in flight: it
quiesces a set of nodes (new requests from root users wait at the gate), then waits until no
request is in flight on any of them. Requests already in flight finish, including the nested
requests they make on children (those come through node-to-node links, which never wait, exactly
as qemu's BlockBackends queue and its BdrvChild requests do not). A job's own drain does not stop
the job's requests (the drain has an *owner*), and a job groups the several requests of one copy
step in a :func:`GraphUser.busy` section, admitted once and counted as in flight until it ends, so
a drain never catches a job between reading a chunk and writing it while holding range locks a
guest request waits on.

All waits here are cancellation-safe: a waiter that is cancelled leaves nothing registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, cast

from pynbd.errors import BlockError
from pynbd.graph.perms import Perm
from pynbd.protocol.constants import State

if TYPE_CHECKING:
    from pynbd.graph.core import GraphUser
    from pynbd.nodes.base import BlockNode, Extent

WRITING = Perm.WRITE | Perm.WRITE_UNCHANGED
HOLE_ZERO = int(State.HOLE | State.ZERO)


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Join neighbouring extents of equal status; drop empty ones."""
    merged: list[Extent] = []
    for length, state in extents:
        if not length:
            continue
        if merged and merged[-1][1] == state:
            merged[-1] = (merged[-1][0] + length, state)
        else:
            merged.append((length, state))
    return merged

#: The root user whose :meth:`GraphUser.busy` section the current task runs in: its requests
#: were admitted with the section and do not wait at the gate again.
_SECTION: ContextVar[object | None] = ContextVar("pynbd_io_section", default=None)


class ChangeSignal:
    """Wake every waiter when something changes; waiters re-check their condition and wait again.

    Cancellation-safe by construction: a waiter holds nothing but its own future, and a
    cancelled one is dropped. Cheaper than an asyncio.Condition (no lock to take, and
    :meth:`wake` is synchronous, so a release in a ``finally`` can never be skipped)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            if not future.done():
                future.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)

    def wake(self) -> None:
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)


class NodeRequests:
    """What is in flight on one node, who has it quiesced, and who waits for a change."""

    __slots__ = ("in_flight", "quiescers", "_ranges", "_serialising", "_next", "changed")

    def __init__(self) -> None:
        self.in_flight = 0
        #: owners of the drains in force (None: an anonymous drain, e.g. a QMP command's)
        self.quiescers: list[object] = []
        self._ranges: dict[int, tuple[int, int, bool]] = {}  # key -> (start, end, serialising)
        self._serialising = 0
        self._next = 0
        self.changed = ChangeSignal()  # a request ended or a drain was lifted

    # -- quiescing ------------------------------------------------------------------------------

    def blocks(self, owner: object) -> bool:
        """Whether a new request of root user ``owner`` must wait: a drain it does not own."""
        return any(q is None or q is not owner for q in self.quiescers)

    async def admit(self, owner: object) -> None:
        while self.blocks(owner):
            await self.changed.wait()

    # -- tracked requests -----------------------------------------------------------------------

    def _overlapping(self, start: int, end: int, key: int, serialising_only: bool) -> bool:
        for other, (s, e, serial) in self._ranges.items():
            if other != key and s < end and start < e and (serial or not serialising_only):
                return True
        return False

    async def begin(self, start: int, end: int, serialising: bool = False) -> int:
        """Register a request; waits for overlapping serialising ones (and, if ``serialising``,
        for every overlapping request). Returns the key for :meth:`end`."""
        while self._serialising and self._overlapping(start, end, -1, True):
            await self.changed.wait()
        key = self._next = self._next + 1
        self._ranges[key] = (start, end, serialising)
        self.in_flight += 1
        if serialising:
            self._serialising += 1
            try:  # from now on new overlapping requests wait; wait for those already running
                while self._overlapping(start, end, key, False):
                    await self.changed.wait()
            except BaseException:
                self.end(key)
                raise
        return key

    def begin_now(self, start: int, end: int) -> int | None:
        """:meth:`begin` without awaiting, for the common case (no serialising request at all).
        Returns None when the caller must use :meth:`begin`."""
        if self._serialising:
            return None
        key = self._next = self._next + 1
        self._ranges[key] = (start, end, False)
        self.in_flight += 1
        return key

    def end(self, key: int) -> None:
        if self._ranges.pop(key)[2]:
            self._serialising -= 1
        self.in_flight -= 1
        if self.changed._waiters:  # noqa: SLF001 - the hot path: no call when nobody waits
            self.changed.wake()

    # -- sections (a job's copy step) -----------------------------------------------------------

    def enter_section(self) -> None:
        self.in_flight += 1

    def leave_section(self) -> None:
        self.in_flight -= 1
        self.changed.wake()


class RequestGate:
    """The request methods of a :class:`~pynbd.graph.core.ChildLink` (mixed into it).

    Callers use a link exactly as they would use the node (``link.read_into(...)``,
    ``link.size``); the gate does the checks and bookkeeping and then calls the driver. The node
    is looked up only once the request is admitted: a request that waited for a drain goes to
    whatever the link points at after the graph change (the mirror's target after a pivot).
    """

    node: BlockNode
    perm: Perm
    parent: BlockNode | GraphUser
    #: True for links of root users (exports, jobs): their requests wait while the node is drained
    queues: bool

    @property
    def size(self) -> int:
        return self.node.size

    def describe(self) -> str:
        """The link in words, for errors (ChildLink says which parent and child)."""
        raise NotImplementedError

    # -- checks ---------------------------------------------------------------------------------

    def _check_range(self, node: BlockNode, offset: int, length: int, grows: bool = False) -> None:
        size = node.size
        if offset < 0 or length < 0 or offset + length > size:
            if grows and offset >= 0 and length >= 0 and self.perm & Perm.RESIZE:
                return
            raise BlockError(
                errno.EINVAL, f"request [{offset}, {offset + length}) is outside {node.describe()} (size {size})"
            )

    def _check_writable(self) -> None:
        if not self.perm & WRITING:
            raise BlockError(errno.EPERM, f"{self.describe()} holds no write permission")

    def _enter_now(self, node: BlockNode, start: int, end: int) -> int | None:
        """The common case without awaiting: nothing drained, no serialising request on the
        node. Returns the key, or None when :meth:`_enter` must decide."""
        io = node.io
        if io.quiescers and self.queues:
            return None
        return io.begin_now(start, end)

    async def _enter(self, start: int, end: int, serialising: bool = False) -> tuple[BlockNode, int]:
        """Admit the request (waiting out drains for root users) and register it in flight on
        the node the link points at then; returns that node and the key for ``node.io.end``."""
        while True:
            node = self.node
            io = node.io
            if self.queues and io.quiescers and _SECTION.get() is not self.parent and io.blocks(self.parent):
                await io.admit(self.parent)
                continue  # the graph may have changed meanwhile: look again
            if not serialising:
                key = io.begin_now(start, end)
                if key is not None:
                    return node, key
            key = await io.begin(start, end, serialising)
            if self.node is node:
                return node, key
            io.end(key)  # re-pointed while it waited for overlapping requests: go where it points now

    # -- requests -------------------------------------------------------------------------------

    async def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        node = self.node
        key = self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length)
        try:
            if offset < 0 or offset + length > node.size:
                # past the end reads as zeroes, as in qemu's generic read path (a format reading
                # the whole last cluster of an image file whose tail was never written)
                if offset < 0:
                    self._check_range(node, offset, length)  # raises
                inside = max(0, node.size - offset)
                buf[inside:] = bytes(length - inside)
                if not inside:
                    return
                buf = buf[:inside]
            await node.read_into(offset, buf)
        finally:
            node.io.end(key)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        await self._write(offset, data, fua, False)

    async def serialising_write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """A write that waits for overlapping requests and holds off new ones until it is done."""
        await self._write(offset, data, fua, True)

    async def _write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool, serialising: bool) -> None:
        length = len(data)
        self._check_writable()
        node = self.node
        key = None if serialising else self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length, serialising)
        try:
            self._check_range(node, offset, length, grows=True)
            if node.dirty_bitmaps or node.internal_bitmaps:
                node.mark_dirty(offset, length)
            await node.write(offset, data, fua)
        finally:
            node.io.end(key)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, fast: bool = False
    ) -> None:
        self._check_writable()
        node = self.node
        key = self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length)
        try:
            self._check_range(node, offset, length, grows=True)
            if node.dirty_bitmaps or node.internal_bitmaps:
                node.mark_dirty(offset, length)
            await node.write_zeroes(offset, length, may_trim and node.unmap, fua, fast)
        finally:
            node.io.end(key)

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        node = self.node
        key = self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length)
        try:
            if offset >= 0 and offset + length > node.size:  # nothing past the end to discard
                length = max(0, node.size - offset)
            self._check_range(node, offset, length)
            if not node.unmap or not length:  # qemu's discard=ignore: dropped here, unmarked
                return
            if node.dirty_bitmaps or node.internal_bitmaps:
                node.mark_dirty(offset, length)
            await node.discard(offset, length)
        finally:
            node.io.end(key)

    async def unallocate(self, offset: int, length: int) -> None:
        """Drop the range's whole clusters from the node's own layer (reads fall through to its
        backing chain again). A change to the node like a write, so it needs WRITE or
        WRITE_UNCHANGED and marks dirty bitmaps; not a discard, so the discard policy does not
        apply (the data stays readable through the chain)."""
        self._check_writable()
        node = self.node
        key = self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length)
        try:
            self._check_range(node, offset, length)
            if node.dirty_bitmaps or node.internal_bitmaps:
                node.mark_dirty(offset, length)
            await node.unallocate(offset, length)
        finally:
            node.io.end(key)

    async def flush(self) -> None:
        node = self.node
        key = self._enter_now(node, 0, 0)
        if key is None:
            node, key = await self._enter(0, 0)
        try:
            await node.flush()
        finally:
            node.io.end(key)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        node = self.node
        key = self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length)
        try:
            size = node.size
            if offset >= 0 and offset + length > size:
                # past the end is a hole reading as zeroes, as read_into makes it (a format asking
                # its file about its whole last cluster)
                inside = max(0, size - offset)
                extents = await node.block_status(offset, inside) if inside else []
                return merge_extents([*extents, (length - inside, HOLE_ZERO)])
            self._check_range(node, offset, length)
            return await node.block_status(offset, length)
        finally:
            node.io.end(key)

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        node = self.node
        key = self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length)
        try:
            self._check_range(node, offset, length)
            return await node.allocation_depth(offset, length)
        finally:
            node.io.end(key)

    async def cache(self, offset: int, length: int) -> None:
        node = self.node
        key = self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length)
        try:
            self._check_range(node, offset, length)
            await node.cache(offset, length)
        finally:
            node.io.end(key)

    @contextlib.asynccontextmanager
    async def reading(self, offset: int, length: int) -> AsyncIterator[BlockNode]:
        """A read the caller does itself (``sendfile`` from :meth:`BlockNode.sendfile_source`),
        tracked like :meth:`read_into` for as long as the block lasts; yields the node to read."""
        node = self.node
        key = self._enter_now(node, offset, offset + length)
        if key is None:
            node, key = await self._enter(offset, offset + length)
        try:
            self._check_range(node, offset, length)
            yield node
        finally:
            node.io.end(key)


# -- sections ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def busy_section(user: GraphUser) -> AsyncIterator[None]:
    """One step of a root user's work (a job's chunk copy): admitted once on every node the
    user holds a link to, and in flight on each until it ends (see the module docstring)."""
    if _SECTION.get() is user:
        yield
        return
    nodes = [link.node for link in user.links]
    while True:
        blocked = next((n for n in nodes if n.io.blocks(user)), None)
        if blocked is None:
            break
        await blocked.io.changed.wait()
    for node in nodes:
        node.io.enter_section()
    token = _SECTION.set(user)
    try:
        yield
    finally:
        _SECTION.reset(token)
        for node in nodes:
            node.io.leave_section()


# -- drain ---------------------------------------------------------------------------------------


def drain_set(nodes: Iterable[BlockNode]) -> list[BlockNode]:
    """What draining ``nodes`` must quiesce: every node above them (whose requests may descend
    into them) and everything below those (whose links a change may touch), each once."""
    seen: dict[int, BlockNode] = {}
    upward = list(nodes)
    tops: list[BlockNode] = []
    while upward:
        node = upward.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        tops.append(node)
        # a link that is not a root user's has a node as its parent
        upward.extend(cast("BlockNode", link.parent) for link in node.parents if not link.is_root)
    stack = list(tops)
    while stack:
        node = stack.pop()
        for link in node.children.values():
            if id(link.node) not in seen:
                seen[id(link.node)] = link.node
                stack.append(link.node)
    return list(seen.values())


@contextlib.asynccontextmanager
async def drained(nodes: Iterable[BlockNode], owner: object = None) -> AsyncIterator[list[BlockNode]]:
    """Quiesce ``nodes`` (see :func:`drain_set`) and wait until nothing is in flight on them;
    new requests of root users other than ``owner`` wait until the block ends. Must not be
    entered from inside a request or a :func:`busy_section` (it would wait for itself)."""
    members = drain_set(nodes)
    for node in members:
        node.io.quiescers.append(owner)
    try:
        # until one look finds all idle: a request still in flight may yet start nested ones
        while busy := next((n for n in members if n.io.in_flight), None):
            await busy.io.changed.wait()
        yield members
    finally:
        for node in members:
            node.io.quiescers.remove(owner)
            node.io.changed.wake()


__all__ = ["ChangeSignal", "NodeRequests", "RequestGate", "busy_section", "drain_set", "drained"]
