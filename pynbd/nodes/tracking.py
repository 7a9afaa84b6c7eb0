"""Range locks for filters that read, then write.

(Serialising writes, which fleecing needs so that a reader of the overlay never straddles a
copy-before-write into it, are tracked by the request gate: pynbd/graph/io.py.)
"""

from __future__ import annotations

import contextlib

from pynbd.graph.io import ChangeSignal


class RangeLock:
    """Exclusive locks on byte ranges: overlapping holders wait for each other, others don't.

    Filters that read, then write (mirror's copy against the guest's writes, copy-on-read's copy-up
    against the guest's writes) hold the range across both steps so no write slips in between.
    """

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int]] = {}
        self._released = ChangeSignal()
        self._next = 0

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int):
        """Cancellation-safe: a waiter cancelled before it got the range leaves nothing held,
        and the release is synchronous, so a cancellation cannot skip it."""
        while _overlaps(self._held.values(), start, end):
            await self._released.wait()
        key = self._next = self._next + 1
        self._held[key] = (start, end)
        try:
            yield
        finally:
            del self._held[key]
            self._released.wake()


def _overlaps(ranges, start: int, end: int) -> bool:
    return any(s < end and start < e for s, e in ranges)
