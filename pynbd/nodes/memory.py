"""A sparse in-memory disk: fixed-size chunks allocated on first write.

Unwritten and trimmed chunks read as zeroes and report HOLE|ZERO, so clients see a sparse disk
just as they would with nbdkit's memory plugin.
"""

from __future__ import annotations

from pynbd.nodes.base import DATA, HOLE_ZERO, BlockNode, Extent, merge_extents

CHUNK = 64 * 1024


class MemoryNode(BlockNode):
    driver = "memory"

    def __init__(self, size: int, node_name: str = "") -> None:
        super().__init__(node_name)
        self._size = size
        self._chunks: dict[int, bytearray] = {}

    @property
    def size(self) -> int:
        return self._size

    def _spans(self, offset: int, length: int):
        """Yield (chunk index, offset in chunk, span length, offset in request) over a range."""
        done = 0
        while done < length:
            pos = offset + done
            index, within = divmod(pos, CHUNK)
            span = min(CHUNK - within, length - done)
            yield index, within, span, done
            done += span

    async def read_into(self, offset: int, buf: memoryview) -> None:
        for index, within, span, done in self._spans(offset, len(buf)):
            chunk = self._chunks.get(index)
            if chunk is None:
                buf[done : done + span] = bytes(span)
            else:
                buf[done : done + span] = chunk[within : within + span]

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data)
        for index, within, span, done in self._spans(offset, len(view)):
            chunk = self._chunks.get(index)
            if chunk is None:
                chunk = self._chunks[index] = bytearray(CHUNK)
            chunk[within : within + span] = view[done : done + span]

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, fast: bool = False
    ) -> None:
        for index, within, span, _ in self._spans(offset, length):
            chunk = self._chunks.get(index)
            if may_trim and span == CHUNK:
                self._chunks.pop(index, None)
            elif chunk is not None:
                chunk[within : within + span] = bytes(span)
            elif not may_trim:
                self._chunks[index] = bytearray(CHUNK)

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, may_trim=True)

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return merge_extents(
            (span, DATA if index in self._chunks else HOLE_ZERO) for index, _, span, _ in self._spans(offset, length)
        )
