"""An NBD export: a block node seen through the protocol, with its meta contexts.

The export decides what the client may do (flags, block sizes, contexts) and checks every
request against that before it reaches the node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pynbd.bitmap import NodeBitmap
from pynbd.nodes.base import BlockNode, Extent, merge_extents
from pynbd.protocol.constants import ALLOCATION_DEPTH, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, MAX_PAYLOAD, STATE_DIRTY
from pynbd.protocol.negotiation import default_transmission_flags

# Advertised block sizes: any alignment is accepted; 4 KiB preferred; 4 MiB maximum payload,
# though up to MAX_PAYLOAD (32 MiB) is accepted from clients that ignore the advertisement.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_BLOCK = 4 * 1024 * 1024

if TYPE_CHECKING:
    from pynbd.graph.core import ChildLink

ContextSource = Callable[[int, int], Awaitable[list[Extent]]]


class Export:
    """A named view of a node for NBD clients.

    In the daemon an export is a user of the block graph: it reads and writes through its link,
    so a filter inserted above the node (fleecing) is seen at once. ``pynbd serve`` has no graph
    and gives the node directly.
    """

    def __init__(
        self,
        name: str,
        node: BlockNode,
        description: str = "",
        read_only: bool = False,
        multi_conn: bool = True,
        contexts: dict[str, ContextSource] | None = None,
    ) -> None:
        self.name = name
        self._node = node
        self.link: ChildLink | None = None
        self.description = description
        self.read_only = read_only or node.read_only
        self.multi_conn = multi_conn
        self.contexts: dict[str, ContextSource] = {BASE_ALLOCATION: self._base_allocation}
        self.contexts.update(contexts or {})

    @property
    def node(self) -> BlockNode:
        return self.link.node if self.link is not None else self._node

    @property
    def io(self) -> ChildLink | BlockNode:
        """Where the export's requests go: its graph link, through the request gate."""
        return self.link if self.link is not None else self._node

    def reading(self, offset: int, length: int):
        """Track a read the server does itself (sendfile) as a request in flight on the node;
        the context yields the node to read from."""
        if self.link is not None:
            return self.link.reading(offset, length)
        return contextlib.nullcontext(self._node)

    async def _base_allocation(self, offset: int, length: int) -> list[Extent]:
        return await self.io.block_status(offset, length)

    async def _allocation_depth(self, offset: int, length: int) -> list[Extent]:
        return await self.io.allocation_depth(offset, length)

    @property
    def size(self) -> int:
        return self.node.size

    def add_allocation_depth(self) -> None:
        """Offer ``qemu:allocation-depth`` (qemu-nbd -A)."""
        self.contexts[ALLOCATION_DEPTH] = self._allocation_depth

    def add_bitmap(self, name: str, bitmap: NodeBitmap) -> None:
        """Offer ``qemu:dirty-bitmap:NAME`` (qemu-nbd -B NAME): 1 for dirty clusters, 0 for clean.

        The bitmap may cover less than the export (one found on a smaller backing node): past its
        end the export is clean, as qemu reports it, never a reply without extents."""

        async def extents(offset: int, length: int) -> list[Extent]:
            runs: list[Extent] = [(run, STATE_DIRTY if dirty else 0) for run, dirty in bitmap.extents(offset, length)]
            covered = max(0, min(offset + length, bitmap.size) - offset)
            if covered < length:
                runs.append((length - covered, 0))
            return merge_extents(runs)

        self.contexts[DIRTY_BITMAP_PREFIX + name] = extents

    @property
    def block_size(self) -> tuple[int, int, int]:
        return MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK

    @property
    def max_payload(self) -> int:
        return MAX_PAYLOAD

    def transmission_flags(self, structured: bool) -> int:
        return default_transmission_flags(self.read_only, structured, self.multi_conn)

    def context_names(self) -> list[str]:
        # base:allocation first, then the others in the order they were added (as qemu lists them)
        return [BASE_ALLOCATION, *(name for name in self.contexts if name != BASE_ALLOCATION)]


class ExportRegistry:
    """The exports one server offers, looked up by name during negotiation."""

    def __init__(self, exports: list[Export] | None = None) -> None:
        self._exports: dict[str, Export] = {}
        for export in exports or []:
            self.add(export)

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"export {export.name!r} already exists")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export:
        return self._exports.pop(name)

    def lookup(self, name: str) -> Export | None:
        return self._exports.get(name)

    def exports(self) -> list[Export]:
        return list(self._exports.values())

    def __iter__(self):
        return iter(self._exports.values())
