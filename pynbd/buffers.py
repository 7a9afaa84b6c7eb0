"""Reusable payload buffers.

Clients send requests of a few uniform sizes; handing the same bytearrays back out avoids a fresh
allocation, and the page faults of first touch, for every multi-MiB payload.
"""

from __future__ import annotations


class BufferPool:
    def __init__(self, max_cached: int = 64 * 1024 * 1024) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._cached = 0
        self.max_cached = max_cached

    def get(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes; its contents are whatever was there before."""
        free = self._free.get(size)
        if free:
            self._cached -= size
            return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        size = len(buf)
        if size and self._cached + size <= self.max_cached:
            self._free.setdefault(size, []).append(buf)
            self._cached += size
