"""The ``raw`` format node: its ``file`` child's bytes as they are, optionally a window of them.

With ``offset``/``size`` it exposes part of the child (a partition, say); every request is
shifted by ``offset`` and never reaches past ``size``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pynbd.graph.perms import Perm, Role
from pynbd.nodes.base import BlockError, BlockNode, Extent

if TYPE_CHECKING:
    from pynbd.graph.core import ChildLink


class RawNode(BlockNode):
    driver = "raw"

    def __init__(self, node_name: str = "", offset: int = 0, size: int | None = None, read_only: bool = False) -> None:
        super().__init__(node_name)
        self.offset = offset
        self._size = size
        self.read_only = read_only

    def child_role(self, name: str) -> Role:
        # As qemu's raw driver: a pure filter of its file unless it shows only a window of it.
        if name == "file" and not self.offset and self._size is None:
            return Role.filtered()
        return Role.DATA | Role.PRIMARY

    def child_perm(self, link, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # As qemu's raw_child_perm: the storage rule may add WRITE/RESIZE for a data child, but a
        # raw window needs on its file only what its own parents take.
        child_perm, child_shared = super().child_perm(link, perm, shared)
        return child_perm & perm, child_shared

    @property
    def file(self) -> ChildLink:
        link = self.child("file")
        if link is None:
            raise BlockError(5, f"raw node {self.node_name!r} has no file child")
        return link

    @property
    def size(self) -> int:
        if self._size is not None:
            return self._size
        return max(0, self.file.size - self.offset)

    def check_window(self) -> None:
        if self.offset + self.size > self.file.size:
            raise BlockError(22, f"offset {self.offset} + size {self.size} is past the end of the file")

    @property
    def can_sendfile(self) -> bool:
        return self.file.node.can_sendfile

    def sendfile_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.file.node.sendfile_source(self.offset + offset, length)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        await self.file.read_into(self.offset + offset, buf)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self.file.write(self.offset + offset, data, fua)

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        await self.file.write_zeroes(self.offset + offset, length, may_trim, fua, fast)

    async def discard(self, offset: int, length: int) -> None:
        await self.file.discard(self.offset + offset, length)

    async def flush(self) -> None:
        await self.file.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self.file.cache(self.offset + offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.file.block_status(self.offset + offset, length)

    async def close(self) -> None:
        pass  # the file child is a node of its own, closed by whoever removes it
