"""``blkdebug``: a filter that fails chosen requests, for testing error handling (as qemu's).

``inject-error`` rules name an event (``read_aio`` for reads, ``write_aio`` for writes, zeroes and
discards, ``flush_to_disk``), an ``errno`` (default EIO), optionally a ``sector`` the request must
cover, and ``once`` to fire a single time. Everything else passes through to ``image``.
"""

from __future__ import annotations

import errno as errno_mod
from dataclasses import dataclass

from pynbd.nodes.base import BlockError, FilterNode


@dataclass
class Rule:
    event: str
    errno: int = errno_mod.EIO
    sector: int = -1
    once: bool = False
    fired: bool = False

    def matches(self, event: str, offset: int, length: int) -> bool:
        if self.event != event or (self.once and self.fired):
            return False
        if self.sector >= 0 and not offset <= self.sector * 512 < offset + max(length, 1):
            return False
        return True


class BlkdebugNode(FilterNode):
    driver = "blkdebug"
    child_name = "image"

    def __init__(self, rules: list[Rule], node_name: str = "") -> None:
        super().__init__(node_name)
        self.rules = rules

    def _check(self, event: str, offset: int, length: int) -> None:
        for rule in self.rules:
            if rule.matches(event, offset, length):
                rule.fired = True
                raise BlockError(rule.errno, f"blkdebug: injected error on {event} at {offset}")

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self._check("read_aio", offset, len(buf))
        await self.filtered.read_into(offset, buf)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        self._check("write_aio", offset, len(data))
        await self.filtered.write(offset, data, fua)

    async def write_zeroes(self, offset, length, may_trim=True, fua=False, fast=False) -> None:
        self._check("write_aio", offset, length)
        await self.filtered.write_zeroes(offset, length, may_trim, fua, fast)

    async def discard(self, offset: int, length: int) -> None:
        self._check("write_aio", offset, length)
        await self.filtered.discard(offset, length)

    async def flush(self) -> None:
        self._check("flush_to_disk", 0, 0)
        await self.filtered.flush()
