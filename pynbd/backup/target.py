"""A qcow2 image as the target end of the copy engine (:class:`pynbd.client.copy.Disk`)."""

from __future__ import annotations

from pynbd.client.copy import Disk
from pynbd.daemon.open import Image


class Qcow2Disk(Disk):
    """Writes go through the qcow2 driver; zeroes become zero clusters.

    Without a backing file a fresh image reads as zeroes, so the copy engine skips holes and
    all-zero blocks and they stay unallocated. With a backing file (an incremental backup) nothing
    is known to be zero: a range that is now zero must be recorded, or it would read through to
    the previous backup's data.
    """

    def __init__(self, image: Image) -> None:
        self.image = image
        self.node = image.node
        self.size = self.node.size
        self.known_zero = self.node.child_node("backing") is None

    async def write(self, view: memoryview, offset: int) -> None:
        await self.node.write(offset, view)

    async def zero(self, count: int, offset: int) -> None:
        await self.node.write_zeroes(offset, count, may_trim=True)

    async def flush(self) -> None:
        await self.node.flush()

    async def close(self) -> None:
        await self.image.close()  # the qcow2 node writes its metadata back, then its files close
