"""Cross-process image locks, byte-compatible with QEMU's file-posix driver.

For each permission bit ``i`` a holder takes a shared OFD lock on byte ``100+i``; for each bit it
does not share, on byte ``200+i``. Before taking a permission one tests the other side's byte.
Because qemu-img, qemu-io and qemu-nbd use exactly these bytes, a pynbd writer keeps them away from
an image and they keep pynbd away, just as two qemu processes would.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import struct

from pynbd.graph.perms import Perm

log = logging.getLogger("pynbd.locks")

PERM_BASE = 100
SHARED_BASE = 200
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux (x86_64 and aarch64), l_pid 0 for OFD locks
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
BITS = list(Perm)


class LockConflict(OSError):
    pass


def _setlk(fd: int, kind: int, byte: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, FLOCK.pack(kind, 0, byte, 1, 0))


def _locked_by_other(fd: int, byte: int) -> bool:
    result = fcntl.fcntl(fd, F_OFD_GETLK, FLOCK.pack(F_WRLCK, 0, byte, 1, 0))
    kind: int = FLOCK.unpack(result)[0]
    return kind != F_UNLCK


def apply(fd: int, perm: Perm, shared: Perm, strict: bool = True) -> None:
    """Hold exactly the lock bytes for ``perm``/``shared``. Unlocking never fails the caller:
    a failed unlock leaves more locked than needed, which is only logged (``strict`` covers locking)."""
    for bit_index, bit in enumerate(BITS):
        for base, want in ((PERM_BASE, bit in perm), (SHARED_BASE, bit not in shared)):
            try:
                _setlk(fd, F_RDLCK if want else F_UNLCK, base + bit_index)
            except OSError as exc:
                if want and strict:
                    raise
                action = "take" if want else "drop"
                log.warning("ignoring failure to %s lock byte %d: %s", action, base + bit_index, exc)


def transition(fd: int, old: tuple[Perm, Perm], new: tuple[Perm, Perm]) -> None:
    """Move from ``old`` to ``new`` (perm, shared) without passing through a state that allows
    what neither allows: first hold the union of perms and the intersection of shared, check,
    and only later (at commit) narrow to ``new``. Raises LockConflict with the old locks restored."""
    union = (old[0] | new[0], old[1] & new[1])
    try:
        apply(fd, *union)
        check(fd, *new)
    except OSError:
        apply(fd, *old, strict=False)
        raise


def check(fd: int, perm: Perm, shared: Perm) -> None:
    """Raise LockConflict if another process (or open file) forbids ``perm`` or uses what we unshare.

    The message is qemu's (file-posix raw_check_lock_bytes), word for word."""
    for bit_index, bit in enumerate(BITS):
        name = bit.names()[0]
        if bit in perm and _locked_by_other(fd, SHARED_BASE + bit_index):
            raise LockConflict(errno.EAGAIN, f'Failed to get "{name}" lock')
        if bit not in shared and _locked_by_other(fd, PERM_BASE + bit_index):
            raise LockConflict(errno.EAGAIN, f'Failed to get shared "{name}" lock')
