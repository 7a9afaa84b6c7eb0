"""Errors of block requests, shared by every layer (nodes, the request gate, jobs, servers).

A :class:`BlockError` carries a host errno, which the NBD server maps onto the wire and QMP turns
into its error text; everything that fails a request raises it or a subclass.
"""

from __future__ import annotations

import errno


class BlockError(Exception):
    """A request failed; ``errno`` is a host errno the NBD layer maps onto the wire."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class NotFast(BlockError):
    """A FAST_ZERO request that would be no faster than writing zeroes (NBD: ENOTSUP)."""

    def __init__(self, message: str = "zeroing would not be fast") -> None:
        super().__init__(errno.ENOTSUP, message)
