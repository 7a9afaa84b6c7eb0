"""``null-co``: a disk that reads as zeroes (with ``read-zeroes``) and forgets every write."""

from __future__ import annotations

from pynbd.nodes.base import HOLE_ZERO, BlockNode, Extent
from pynbd.protocol.constants import State


class NullNode(BlockNode):
    driver = "null-co"

    def __init__(self, size: int = 1 << 30, node_name: str = "", read_zeroes: bool = True) -> None:
        super().__init__(node_name)
        self._size = size
        self.read_zeroes = read_zeroes

    @property
    def size(self) -> int:
        return self._size

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if self.read_zeroes:
            buf[:] = bytes(len(buf))

    async def write(self, offset: int, data, fua: bool = False) -> None:
        pass

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        pass

    async def discard(self, offset: int, length: int) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        # as qemu: never data (HOLE), and ZERO only when reads really return zeroes
        return [(length, HOLE_ZERO if self.read_zeroes else int(State.HOLE))]

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        # as qemu: a range is allocated where block status says data or zero; without
        # read-zeroes null-co says neither, so nothing is allocated anywhere
        return [(length, 1 if self.read_zeroes else 0)]
