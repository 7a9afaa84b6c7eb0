"""The one interface every block node offers, in the manner of nbdkit's plugin callbacks.

Exports, jobs and filters talk to nodes only through this. Offsets and lengths are checked by
the caller (the export or the parent node); a node may assume requests are inside its size.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Iterable

from pynbd.protocol.constants import State

Extent = tuple[int, int]  # (length, base:allocation state bits)


class BlockError(Exception):
    """A request failed; ``errno`` is a host errno the NBD layer maps onto the wire."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class NotFast(BlockError):
    """A FAST_ZERO request that would be no faster than writing zeroes (NBD: ENOTSUP)."""

    def __init__(self, message: str = "zeroing would not be fast") -> None:
        super().__init__(errno.ENOTSUP, message)


class BlockNode(ABC):
    """A node of the block graph. Every method is a coroutine except :attr:`size`."""

    driver: str = "abstract"
    read_only: bool = False
    #: Whether :meth:`sendfile_source` can ever return something (lets the server skip asking).
    can_sendfile: bool = False

    def __init__(self, node_name: str = "") -> None:
        self.node_name = node_name

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

    async def close(self) -> None:
        """Release the node's resources; the default flushes."""
        await self.flush()

    def describe(self) -> str:
        return f"{self.driver} node {self.node_name!r}"


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


HOLE_ZERO = int(State.HOLE | State.ZERO)
DATA = int(State.DATA)
