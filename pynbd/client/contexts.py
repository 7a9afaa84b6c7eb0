"""What the status values of the well-known meta contexts mean, in nbdinfo's words."""

from __future__ import annotations

from pynbd.protocol.constants import ALLOCATION_DEPTH, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, STATE_DIRTY, State

_BASE = {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}


def describe_extent(context: str, flags: int) -> str | None:
    """nbdinfo --map's type name for a status value (None where nbdinfo prints none)."""
    if context == BASE_ALLOCATION:
        return _BASE.get(flags)
    if context.startswith(DIRTY_BITMAP_PREFIX):
        return {0: "clean", 1: "dirty"}.get(flags)
    if context == ALLOCATION_DEPTH:
        return {0: "absent", 1: "local"}.get(flags, f"backing depth {flags}")
    return None


def is_zero(flags: int) -> bool:
    """base:allocation: the range reads as zeroes."""
    return bool(flags & State.ZERO)


def is_dirty(flags: int) -> bool:
    """qemu:dirty-bitmap:NAME: the range changed since the bitmap was cleared."""
    return bool(flags & STATE_DIRTY)


def human_size(size: int) -> str | None:
    """``1G``, ``1500M``: the exact size in the largest unit that divides it (None below 1 KiB)."""
    for shift, suffix in ((60, "E"), (50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return None
