"""A raw file or block device.

Reads and writes go through ``os.preadv``/``os.pwritev`` in a worker thread so a slow disk never
stalls the event loop; the server may instead ``sendfile`` straight from the descriptor.
Allocation comes from SEEK_DATA/SEEK_HOLE, and zeroing and trimming punch holes with
``fallocate`` so that block status afterwards tells the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor

from pynbd.graph import locks
from pynbd.graph.perms import Perm
from pynbd.nodes.base import (
    BACKGROUND_IO,
    DATA,
    HOLE_ZERO,
    BlockError,
    BlockNode,
    Extent,
    NotFast,
    merge_extents,
)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ZERO_BUFFER = bytes(1024 * 1024)
NOWAIT_LIMIT = 256 * 1024  # larger reads go to a thread anyway: copying them would stall the loop
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


# Blocking file I/O runs in worker threads: clients' requests in one pool, jobs' background
# copies in a small pool of their own, so a backup or mirror can never fill the queue that the
# guest's next write waits in.
_CLIENT_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pynbd-io")
_BACKGROUND_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pynbd-bg-io")


async def _blocking(fn, *args):
    """Run ``fn`` in a worker thread. A caller cancelled meanwhile still waits for the thread to
    finish before its CancelledError goes on: the thread may be filling the caller's buffer, and
    the request gate must not count the request as ended (drain) while the file is still used."""
    pool = _BACKGROUND_POOL if BACKGROUND_IO.get() else _CLIENT_POOL
    future = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with mode flags, which the os module does not offer."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def seek_extents(fd: int, pos: int, end: int):
    """(length, base:allocation state) of ``[pos, end)`` from lseek SEEK_DATA/SEEK_HOLE; a
    filesystem without them reports everything as data."""
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to EOF
                yield end - pos, HOLE_ZERO
                return
            yield end - pos, DATA
            return
        if data > pos:
            yield min(data, end) - pos, HOLE_ZERO
            pos = data
            if pos >= end:
                return
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        yield min(hole, end) - pos, DATA
        pos = hole


class ImageLocked(BlockError):
    """Another process holds a lock that forbids what the graph asked of the file (qemu's message;
    ``hint`` is the line qemu's tools print under it)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(errno.EAGAIN, message)
        self.hint = hint


class FileNode(BlockNode):
    driver = "file"

    @property
    def can_sendfile(self) -> bool:
        return True

    def __init__(self, filename: str, read_only: bool = False, node_name: str = "", locking: bool = True) -> None:
        super().__init__(node_name)
        self.filename = filename
        self.read_only = read_only
        self.fd = os.open(filename, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.is_regular_file = stat.S_ISREG(st.st_mode)
        self._size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else st.st_size
        self._can_punch = not self.is_block_device
        self._can_zero_range = not self.is_block_device
        self.locking = locking
        self._locked = (Perm(0), Perm.all())

    @property
    def size(self) -> int:
        return self._size

    def refresh_size(self) -> None:
        """Re-read the size after the file was changed by other means (image creation)."""
        self._size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else os.fstat(self.fd).st_size

    async def read_into(self, offset: int, buf: memoryview) -> None:
        # Page-cache hits are served at once (RWF_NOWAIT fails with EAGAIN rather than block);
        # only what must come from the disk goes to a worker thread.
        if len(buf) <= NOWAIT_LIMIT and _RWF_NOWAIT:
            try:
                n = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
                if n == len(buf):
                    return
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        await _blocking(self._read_into, offset, buf)

    def _read_into(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:  # the file shrank under us: what is missing reads as zeroes
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        await _blocking(self._write, offset, memoryview(data), fua)
        self._grown_to(offset + len(data))

    def _grown_to(self, end: int) -> None:
        """A write past the end (a format node growing its image, through a link holding
        RESIZE) makes the node that much larger, as qemu's generic write path does."""
        if end > self._size and not self.is_block_device:
            self._size = end

    def _write(self, offset: int, view: memoryview, fua: bool) -> None:
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)
        if fua:
            os.fdatasync(self.fd)

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, fast: bool = False
    ) -> None:
        await _blocking(self._write_zeroes, offset, length, may_trim, fua, fast)
        self._grown_to(offset + length)

    def _write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool, fast: bool) -> None:
        modes = []
        if may_trim and self._can_punch:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        if self._can_zero_range:
            modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                break
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                if mode & FALLOC_FL_PUNCH_HOLE:
                    self._can_punch = False
                else:
                    self._can_zero_range = False
        else:
            if fast:
                raise NotFast()
            self._write_zero_buffers(offset, length)
        if fua:
            os.fdatasync(self.fd)

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            step = min(len(ZERO_BUFFER), end - offset)
            self._write(offset, memoryview(ZERO_BUFFER)[:step], False)
            offset += step

    async def discard(self, offset: int, length: int) -> None:
        if not self._can_punch:
            return  # a hint only: nothing to do where holes cannot be punched
        try:
            await _blocking(fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._can_punch = False

    async def flush(self) -> None:
        if not self.read_only:
            await _blocking(os.fdatasync, self.fd)

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if self.is_block_device:
            return [(length, DATA)]
        return merge_extents(seek_extents(self.fd, offset, offset + length))

    def sendfile_source(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.fd, offset

    def set_perm(self, tran, perm, shared) -> None:
        """Take qemu-compatible OFD locks for what the graph now holds and unshares."""
        if not self.locking:
            return
        old = self._locked
        try:
            locks.transition(self.fd, old, (perm, shared))
        except locks.LockConflict as exc:
            hint = f"Is another process using the image [{self.filename}]?"
            raise ImageLocked(exc.strerror or "Failed to lock byte", hint) from None
        except OSError as exc:
            raise BlockError(exc.errno or errno.EAGAIN, f"{self.filename}: {exc.strerror or exc}") from None
        self._locked = (perm, shared)

        def undo() -> None:
            locks.apply(self.fd, *old, strict=False)
            self._locked = old

        tran.add(abort=undo, commit=lambda: locks.apply(self.fd, perm, shared, strict=False))

    async def reopen(self, read_only: bool) -> None:
        """Open the file again with the new access mode, holding the same locks throughout."""
        if read_only == self.read_only:
            return
        if not self.read_only:
            await self.flush()
        fd = os.open(self.filename, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        if self.locking:  # carry the locks over before the old descriptor (and its locks) goes
            locks.apply(fd, *self._locked, strict=False)
        old, self.fd = self.fd, fd
        os.close(old)
        self.read_only = read_only

    async def close(self) -> None:
        if self.fd >= 0:
            await self.flush()
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> str:
        return f"file {self.filename!r}"

