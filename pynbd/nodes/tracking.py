"""Serialising writes: a write that waits for, and holds off, overlapping reads of a node.

Fleecing the old way reads a temporary overlay whose unallocated clusters fall through to the
live disk. When copy-before-write copies a cluster into that overlay, a reader may be half-way
through reading the same cluster from the live disk, which is about to change. As in qemu
(block-copy's SERIALISING writes to a fleecing target), the copy into the overlay waits until
overlapping reads of the overlay have finished and new ones wait for it; the live disk is only
written after the copy, so every reader sees the old data, from one place or the other.
"""

from __future__ import annotations

import asyncio
import contextlib


class RequestTracker:
    def __init__(self) -> None:
        self._reads: dict[int, tuple[int, int]] = {}
        self._serial: dict[int, tuple[int, int]] = {}
        self._changed = asyncio.Condition()
        self._next = 0

    @staticmethod
    def _overlaps(ranges, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in ranges)

    @contextlib.asynccontextmanager
    async def reading(self, start: int, end: int):
        async with self._changed:
            await self._changed.wait_for(lambda: not self._overlaps(self._serial.values(), start, end))
            key = self._next = self._next + 1
            self._reads[key] = (start, end)
        try:
            yield
        finally:
            async with self._changed:
                del self._reads[key]
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def serialising(self, start: int, end: int):
        async with self._changed:
            await self._changed.wait_for(lambda: not self._overlaps(self._serial.values(), start, end))
            key = self._next = self._next + 1
            self._serial[key] = (start, end)  # from now on, new overlapping reads wait
            await self._changed.wait_for(lambda: not self._overlaps(self._reads.values(), start, end))
        try:
            yield
        finally:
            async with self._changed:
                del self._serial[key]
                self._changed.notify_all()


class RangeLock:
    """Exclusive locks on byte ranges: overlapping holders wait for each other, others don't.

    Filters that read, then write (mirror's copy against the guest's writes, copy-on-read's copy-up
    against the guest's writes) hold the range across both steps so no write slips in between.
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int]] = {}
        self._changed = asyncio.Condition()
        self._next = 0

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int):
        async with self._changed:
            await self._changed.wait_for(lambda: not RequestTracker._overlaps(self._held.values(), start, end))
            key = self._next = self._next + 1
            self._held[key] = (start, end)
        try:
            yield
        finally:
            async with self._changed:
                del self._held[key]
                self._changed.notify_all()
