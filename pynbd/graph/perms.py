"""Permissions on graph edges and the default rules for what a parent takes from its child.

These follow QEMU's block layer (block-common.h, bdrv_default_perms): a link holds ``perm`` on its
child and lets every other user of that child hold only what ``shared`` allows.
"""

from __future__ import annotations

import enum


class Perm(enum.IntFlag):
    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08

    @classmethod
    def all(cls) -> Perm:
        return cls.CONSISTENT_READ | cls.WRITE | cls.WRITE_UNCHANGED | cls.RESIZE

    @classmethod
    def none(cls) -> Perm:
        return cls(0)

    def names(self) -> list[str]:
        """QAPI names, as x-debug-query-block-graph lists them."""
        return [QAPI_NAMES[p] for p in Perm if p in self]


QAPI_NAMES = {
    Perm.CONSISTENT_READ: "consistent-read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write-unchanged",
    Perm.RESIZE: "resize",
}

ALL = Perm.all()
NONE = Perm.none()
PASSTHROUGH = ALL  # every live bit passes through a filter


class Role(enum.IntFlag):
    """What a child link is for (QEMU's BdrvChildRole)."""

    DATA = 0x01
    METADATA = 0x02
    FILTERED = 0x04
    COW = 0x08
    PRIMARY = 0x10

    @classmethod
    def image(cls) -> Role:
        """The format-to-protocol link ("file" of qcow2 or raw)."""
        return cls.DATA | cls.METADATA | cls.PRIMARY

    @classmethod
    def filtered(cls) -> Role:
        return cls.FILTERED | cls.PRIMARY


def default_child_perm(role: Role, perm: Perm, shared: Perm, writable: bool) -> tuple[Perm, Perm]:
    """What a node takes from (and shares on) a child with ``role``, given what its own parents
    take (``perm``) and share (``shared``) on it. ``writable`` is whether the node is opened
    read-write."""
    if role & Role.FILTERED:
        return perm & PASSTHROUGH, (shared & PASSTHROUGH) | Perm.WRITE_UNCHANGED
    if role & Role.COW:
        child_perm = perm & Perm.CONSISTENT_READ
        child_shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
        if shared & Perm.WRITE:
            child_shared |= Perm.WRITE | Perm.RESIZE
        return child_perm, child_shared
    # storage link (DATA and/or METADATA)
    child_perm, child_shared = perm & PASSTHROUGH, (shared & PASSTHROUGH) | Perm.WRITE_UNCHANGED
    if role & Role.METADATA:
        if writable:
            child_perm |= Perm.WRITE | Perm.RESIZE
        child_perm |= Perm.CONSISTENT_READ
        child_shared &= ~(Perm.WRITE | Perm.RESIZE)
    if role & Role.DATA:
        child_shared &= ~Perm.RESIZE
        if child_perm & Perm.WRITE_UNCHANGED:  # qemu: a format may have to really write (copy-on-read)
            child_perm |= Perm.WRITE
        if child_perm & Perm.WRITE:
            child_perm |= Perm.RESIZE
    return child_perm, child_shared
