"""The copy engine behind ``pynbd copy``: NBD exports, raw files, pipes and ``null:``, sparse-aware.

The source is walked extent by extent (``base:allocation`` for NBD, SEEK_DATA/SEEK_HOLE for
files). Holes become zero requests on the target, or nothing at all when the target is known to
read as zeroes (a file we just created or truncated, ``null:``, ``--target-is-zero``, or an NBD
target whose own block status says so). Data is read in requests of ``request_size`` with many
in flight, and a buffer that turns out to be all zeroes is treated like a hole, so copies of
sparse images stay sparse. With a context such as ``qemu:dirty-bitmap:NAME`` only what that
context marks is copied: the basis of an incremental backup.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import stat
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pynbd.client.client import Extent
from pynbd.client.contexts import is_dirty, is_zero
from pynbd.client.errors import NBDError
from pynbd.client.pool import ClientPool, connect_pool
from pynbd.client.uri import is_nbd_uri
from pynbd.nodes.base import merge_extents
from pynbd.nodes.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate, seek_extents
from pynbd.protocol.constants import BASE_ALLOCATION, State

DEFAULT_REQUEST_SIZE = 1 << 20
DEFAULT_REQUESTS = 16
ZERO_STEP = 256 << 20  # largest zero request issued at once (the client splits further if needed)
QCOW2_MAGIC = b"QFI\xfb"
_ZEROS = bytes(32 << 20)

class CopyError(Exception):
    pass


def all_zero(view: memoryview) -> bool:
    if len(view) <= len(_ZEROS):
        return _ZEROS.startswith(view)  # memcmp, about 30 us per MiB
    return all(_ZEROS.startswith(view[i : i + len(_ZEROS)]) for i in range(0, len(view), len(_ZEROS)))


# --- the ends of a copy -------------------------------------------------------------------------


class Disk:
    """One end of a copy. ``size`` None means unknown (a pipe being read)."""

    size: int | None = None
    sequential = False  # a pipe: data must be read or written strictly in order
    known_zero = False  # reads as zeroes everywhere before the copy writes anything

    async def read_into(self, view: memoryview, offset: int) -> int:
        raise NotImplementedError

    async def write(self, view: memoryview, offset: int) -> None:
        raise NotImplementedError

    async def zero(self, count: int, offset: int) -> None:
        """Make the range read as zeroes (sparse where the target can)."""
        pos = offset
        while pos < offset + count:
            n = min(len(_ZEROS), offset + count - pos)
            await self.write(memoryview(_ZEROS)[:n], pos)
            pos += n

    async def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        """(offset, length, reads_as_zero) runs covering the range; all data if unknown."""
        return [(offset, count, False)]

    def is_zero_at_start(self, offset: int, count: int) -> bool:
        return self.known_zero

    async def set_length(self, length: int) -> None:
        """After a copy of unknown size: make sure the target is at least ``length`` long."""

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass


class NBDDisk(Disk):
    def __init__(self, pool: ClientPool, map_context: str | None = None, allocated: bool = False) -> None:
        self.pool = pool
        self.size = pool.size
        self.map_context = map_context
        self.allocated = allocated
        self._zero_ranges: list[tuple[int, int]] = []  # target: ranges that read as zero at the start

    async def read_into(self, view: memoryview, offset: int) -> int:
        await self.pool.pread_into(view, offset)
        return len(view)

    async def write(self, view: memoryview, offset: int) -> None:
        await self.pool.pwrite(view, offset)

    async def zero(self, count: int, offset: int) -> None:
        if self.pool.can_zero:
            await self.pool.zero(count, offset, no_hole=self.allocated)
        else:
            await super().zero(count, offset)

    async def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        if BASE_ALLOCATION not in self.pool.contexts:
            return [(offset, count, False)]
        answer = await self.pool.block_status(count, offset, [BASE_ALLOCATION])
        return [(e.offset, e.length, is_zero(e.flags)) for e in answer[BASE_ALLOCATION]]

    async def learn_zero_ranges(self) -> None:
        """As a target: remember which ranges already read as zeroes, so holes there can be skipped."""
        if BASE_ALLOCATION in self.pool.contexts and self.size:
            extents = (await self.pool.map_extents([BASE_ALLOCATION]))[BASE_ALLOCATION]
            self._zero_ranges = [(e.offset, e.end) for e in extents if is_zero(e.flags)]
        self._starts = [start for start, _ in self._zero_ranges]

    def is_zero_at_start(self, offset: int, count: int) -> bool:
        if self.known_zero:
            return True
        if not self._zero_ranges:
            return False
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and self._zero_ranges[i][1] >= offset + count

    async def flush(self) -> None:
        if self.pool.can_flush:
            await self.pool.flush()

    async def close(self) -> None:
        await self.pool.disconnect()


class FileDisk(Disk):
    """A raw file or block device, with blocking I/O in worker threads."""

    def __init__(self, path: str, fd: int, size: int, executor: ThreadPoolExecutor, known_zero: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.size: int = size
        self.executor = executor
        self.known_zero = known_zero
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)

    async def _run(self, func: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    async def read_into(self, view: memoryview, offset: int) -> int:
        def read() -> int:
            done = 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], offset + done)
                if n == 0:
                    raise CopyError(f"{self.path}: unexpected end of file at {offset + done}")
                done += n
            return done

        return await self._run(read)

    async def write(self, view: memoryview, offset: int) -> None:
        def write() -> None:
            done = 0
            while done < len(view):
                done += os.pwritev(self.fd, [view[done:]], offset + done)

        await self._run(write)

    async def zero(self, count: int, offset: int) -> None:
        if self.regular:
            try:
                await self._run(fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)
                return
            except OSError:
                pass  # no hole punching here: write zeroes
        await super().zero(count, offset)

    async def extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        if not self.regular:
            return [(offset, count, False)]
        out, pos = [], offset
        for length, state in merge_extents(seek_extents(self.fd, offset, offset + count)):
            out.append((pos, length, bool(state & State.ZERO)))
            pos += length
        return out

    async def flush(self) -> None:
        await self._run(os.fsync, self.fd)

    async def set_length(self, length: int) -> None:
        if self.regular and os.fstat(self.fd).st_size < length:  # trailing zeroes were skipped
            os.ftruncate(self.fd, length)
        self.size = max(self.size, length)

    async def close(self) -> None:
        os.close(self.fd)


class PipeDisk(Disk):
    """stdin as a source (size unknown, read in order) or stdout as a target (written in order)."""

    sequential = True

    def __init__(self, fd: int, executor: ThreadPoolExecutor) -> None:
        self.fd = fd
        self.executor = executor
        self.position = 0

    async def read_into(self, view: memoryview, offset: int) -> int:
        def read() -> int:
            done = 0
            while done < len(view):
                n = os.readv(self.fd, [view[done:]])
                if n == 0:
                    break
                done += n
            return done

        return await asyncio.get_running_loop().run_in_executor(self.executor, read)

    async def write(self, view: memoryview, offset: int) -> None:
        if offset != self.position:
            raise CopyError(f"pipe written out of order ({offset} != {self.position})")

        def write() -> None:
            done = 0
            while done < len(view):
                done += os.write(self.fd, view[done:])

        await asyncio.get_running_loop().run_in_executor(self.executor, write)
        self.position += len(view)


class NullDisk(Disk):
    """``null:``: accepts everything and keeps nothing (for measuring the source side)."""

    known_zero = True

    async def write(self, view: memoryview, offset: int) -> None:
        pass

    async def zero(self, count: int, offset: int) -> None:
        pass


# --- progress ----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal and/or "done/total" lines on a file descriptor (nbdcopy --progress=FD)."""

    def __init__(self, total: int | None, bar: bool = False, fd: int | None = None) -> None:
        self.total = total
        self.done = 0
        self.fd = fd
        self._last_written = -1
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=True)
        self._write_line(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        self._write_line()

    def _write_line(self, force: bool = False) -> None:
        if self.fd is None:
            return
        total = self.total or 0
        step = max(total // 1000, 1)  # at most ~1000 lines per copy
        if force or self.done // step != self._last_written // step or self.done == total:
            if self.done == self._last_written and not force:
                return
            self._last_written = self.done
            os.write(self.fd, f"{self.done}/{total if self.total is not None else '?'}\n".encode())

    def close(self) -> None:
        self._write_line()
        if self._bar is not None:
            self._bar.close()


# --- the copy --------------------------------------------------------------------------------


@dataclass
class CopyOptions:
    connections: int = 4
    requests: int = DEFAULT_REQUESTS
    request_size: int = DEFAULT_REQUEST_SIZE
    flush: bool = False
    target_is_zero: bool = False
    allocated: bool = False  # write zeroes as allocated blocks instead of holes
    map_context: str | None = None  # copy only what this context marks (bit 0: dirty)
    progress_bar: bool = False
    progress_fd: int | None = None


@dataclass
class CopyStats:
    size: int = 0
    data_bytes: int = 0  # written as data
    zero_bytes: int = 0  # written as zero requests
    skipped_bytes: int = 0  # left alone: already zero on the target, or not marked by the map context
    seconds: float = 0.0


class Copier:
    def __init__(self, src: Disk, dst: Disk, options: CopyOptions) -> None:
        self.src, self.dst, self.options = src, dst, options
        self.stats = CopyStats()
        width = options.requests * max(1, options.connections)
        self.slots = asyncio.Semaphore(width)
        self.buffers = [bytearray(options.request_size) for _ in range(width)]
        self.tasks: set[asyncio.Task] = set()
        self.failure: BaseException | None = None
        self.progress: Progress | None = None

    def _advance(self, count: int) -> None:
        """Count copied bytes on the progress display (set up by :meth:`run`)."""
        if self.progress is not None:
            self.progress.advance(count)

    async def run(self) -> CopyStats:
        started = time.monotonic()
        size = self.src.size
        self.progress = Progress(size, self.options.progress_bar, self.options.progress_fd)
        try:
            if size is None:
                await self._copy_stream()
            else:
                self.stats.size = size
                await self._copy_extents(size)
            await self._drain()
            if self.options.flush:
                await self.dst.flush()
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.progress.close()
        self.stats.seconds = time.monotonic() - started
        return self.stats

    # -- scheduling -------------------------------------------------------------------------------

    async def _spawn(self, coro) -> None:
        await self.slots.acquire()
        if self.failure is not None:
            self.slots.release()
            coro.close()
            raise self.failure
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def _drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        if self.failure is not None:
            raise self.failure

    # -- work items -------------------------------------------------------------------------------

    async def _zero(self, offset: int, count: int) -> None:
        if self.options.target_is_zero or self.dst.is_zero_at_start(offset, count):
            self.stats.skipped_bytes += count
        else:
            await self.dst.zero(count, offset)
            self.stats.zero_bytes += count
        self._advance(count)

    async def _copy_piece(self, offset: int, count: int) -> None:
        buf = self.buffers.pop()
        try:
            view = memoryview(buf)[:count]
            await self.src.read_into(view, offset)
            if all_zero(view):
                await self._zero(offset, count)
                return
            await self.dst.write(view, offset)
            self.stats.data_bytes += count
            self._advance(count)
        finally:
            self.buffers.append(buf)

    async def _copy_extents(self, size: int) -> None:
        step = self.options.request_size
        async for offset, length, zero in self._source_runs(size):
            if zero:
                for pos in range(offset, offset + length, ZERO_STEP):
                    await self._spawn(self._zero(pos, min(ZERO_STEP, offset + length - pos)))
                continue
            for pos in range(offset, offset + length, step):
                await self._spawn(self._copy_piece(pos, min(step, offset + length - pos)))

    async def _source_runs(self, size: int):
        """(offset, length, zero) runs of what must be copied; the rest is counted as skipped."""
        src, context = self.src, self.options.map_context
        if context is not None:
            assert isinstance(src, NBDDisk)
            async for step in src.pool.iter_extents([context, BASE_ALLOCATION], 0, size):
                allocation = step[BASE_ALLOCATION]
                for marked in step[context]:
                    if not is_dirty(marked.flags):
                        self.stats.skipped_bytes += marked.length
                        self._advance(marked.length)
                        continue
                    for ext in _overlap(allocation, marked):
                        yield ext.offset, ext.length, is_zero(ext.flags)
            return
        pos = 0
        while pos < size:
            runs = await src.extents(pos, min(size - pos, 1 << 30))
            for offset, length, zero in runs:
                length = min(length, size - offset)
                if length > 0:
                    yield offset, length, zero
            pos = max(pos + 1, runs[-1][0] + runs[-1][1]) if runs else size

    async def _copy_stream(self) -> None:
        """Unknown size (a pipe source): read in order, write concurrently."""
        step = self.options.request_size
        offset = 0
        while True:
            buf = bytearray(step)
            n = await self.src.read_into(memoryview(buf), offset)
            if n == 0:
                break
            view = memoryview(buf)[:n]
            if all_zero(view) and (self.dst.known_zero or self.options.target_is_zero):
                self.stats.skipped_bytes += n
                self._advance(n)
            elif self.dst.sequential:
                await self._write_buffer(view, offset)
            else:
                await self._spawn(self._write_buffer(view, offset))
            offset += n
            if n < step:
                break
        self.stats.size = offset
        await self._drain()
        await self.dst.set_length(offset)

    async def _write_buffer(self, view: memoryview, offset: int) -> None:
        await self.dst.write(view, offset)
        self.stats.data_bytes += len(view)
        self._advance(len(view))


class OrderedCopier(Copier):
    """A target that is a pipe: reads run ahead concurrently, writes happen strictly in order."""

    async def _copy_extents(self, size: int) -> None:
        step = self.options.request_size
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.options.requests)

        async def reader() -> None:
            async for offset, length, zero in self._source_runs(size):
                for pos in range(offset, offset + length, step):
                    count = min(step, offset + length - pos)
                    if zero:
                        await queue.put((pos, None, count))
                    else:
                        buf = bytearray(count)
                        await queue.put((pos, asyncio.ensure_future(self.src.read_into(memoryview(buf), pos)), buf))
            await queue.put(None)

        producer = asyncio.create_task(reader())
        try:
            while (item := await queue.get()) is not None:
                pos, pending, payload = item
                if pending is None:
                    await self.dst.write(memoryview(_ZEROS)[:payload], pos)
                    self.stats.zero_bytes += payload
                    self._advance(payload)
                    continue
                await pending
                await self.dst.write(memoryview(payload), pos)
                self.stats.data_bytes += len(payload)
                self._advance(len(payload))
            await producer
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)


def _overlap(extents: list[Extent], window: Extent) -> list[Extent]:
    out = []
    for ext in extents:
        lo, hi = max(ext.offset, window.offset), min(ext.end, window.end)
        if lo < hi:
            out.append(Extent(lo, hi - lo, ext.flags))
    return out


# --- opening the ends -------------------------------------------------------------------------


def _check_not_qcow2(path: str, fd: int) -> None:
    if os.pread(fd, 4, 0) == QCOW2_MAGIC:
        raise CopyError(
            f"{path} is a qcow2 image: pynbd copy reads and writes raw files only for now; "
            f"serve it with 'pynbd serve' or 'qemu-nbd' and copy from its NBD URI"
        )


async def open_nbd_source(spec: str | Sequence[str], options: CopyOptions, **connect_args) -> NBDDisk:
    """An NBD export (or several URIs of one, for multi-conn) as a copy source, with the
    ``base:allocation`` context and ``options.map_context`` if one is asked for."""
    contexts = [BASE_ALLOCATION] + ([options.map_context] if options.map_context else [])
    pool = await connect_pool(
        spec, options.connections, meta_contexts=contexts, max_requests=options.requests, **connect_args
    )
    if options.map_context and options.map_context not in pool.contexts:
        await pool.disconnect()
        raise CopyError(f"the source does not offer meta context {options.map_context!r}")
    return NBDDisk(pool)


async def open_source(
    spec: str | Sequence[str], options: CopyOptions, executor: ThreadPoolExecutor, **connect_args
) -> Disk:
    if not isinstance(spec, str) or is_nbd_uri(spec):
        return await open_nbd_source(spec, options, **connect_args)
    if options.map_context:
        raise CopyError("--bitmap/--map-context need an NBD source")
    if spec == "-":
        return PipeDisk(sys.stdin.fileno(), executor)
    fd = os.open(spec, os.O_RDONLY)
    try:
        _check_not_qcow2(spec, fd)
        size = os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    return FileDisk(spec, fd, size, executor)


async def open_target(
    spec: str | Sequence[str], size: int | None, options: CopyOptions, executor: ThreadPoolExecutor, **connect_args
) -> Disk:
    if not isinstance(spec, str) or is_nbd_uri(spec):
        pool = await connect_pool(
            spec, options.connections, meta_contexts=[BASE_ALLOCATION], max_requests=options.requests, **connect_args
        )
        disk = NBDDisk(pool, allocated=options.allocated)
        if pool.read_only:
            await pool.disconnect()
            raise CopyError("the target export is read-only")
        if size is not None and pool.size < size:
            await pool.disconnect()
            raise CopyError(f"the target ({pool.size} bytes) is smaller than the source ({size} bytes)")
        if not options.map_context:  # an incremental copy overwrites: the target's zeroes change nothing
            await disk.learn_zero_ranges()
        return disk
    if spec == "null:":
        return NullDisk()
    if spec == "-":
        return PipeDisk(sys.stdout.fileno(), executor)
    exists = os.path.exists(spec)
    if exists and not stat.S_ISREG(os.stat(spec).st_mode):  # a block device: written in place
        fd = os.open(spec, os.O_WRONLY)
        disk_size = os.lseek(fd, 0, os.SEEK_END)
        if size is not None and disk_size < size:
            os.close(fd)
            raise CopyError(f"{spec} ({disk_size} bytes) is smaller than the source ({size} bytes)")
        return FileDisk(spec, fd, disk_size, executor)
    if options.map_context and exists:
        # incremental: write the marked ranges into the existing copy; keep everything else
        fd = os.open(spec, os.O_RDWR)
        _check_not_qcow2(spec, fd)
        if size is not None and os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return FileDisk(spec, fd, size or 0, executor)
    if exists:
        fd = os.open(spec, os.O_RDWR)
        try:
            _check_not_qcow2(spec, fd)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)  # a fresh, all-zero file: holes need no writing and stay holes
    else:
        fd = os.open(spec, os.O_RDWR | os.O_CREAT, 0o644)
    if size is not None:
        os.ftruncate(fd, size)
    return FileDisk(spec, fd, size or 0, executor, known_zero=True)


async def copy(
    src: str | Sequence[str], dst: str | Sequence[str], options: CopyOptions | None = None, **connect_args
) -> CopyStats:
    """Copy ``src`` to ``dst`` (NBD URIs or server commands, raw file paths, ``-``, ``null:``)."""
    options = options or CopyOptions()
    if options.request_size <= 0 or options.request_size > 32 << 20:
        raise CopyError("request size must be between 1 byte and 32 MiB")
    executor = ThreadPoolExecutor(max_workers=max(4, options.requests), thread_name_prefix="pynbd-copy")
    source = target = None
    try:
        source = await open_source(src, options, executor, **connect_args)
        target = await open_target(dst, source.size, options, executor, **connect_args)
        copier_class = OrderedCopier if target.sequential and source.size is not None else Copier
        return await copier_class(source, target, options).run()
    except NBDError as exc:
        raise CopyError(str(exc)) from exc
    finally:
        for disk in (target, source):
            if disk is not None:
                try:
                    await disk.close()
                except Exception:  # closing after a failure must not hide the failure
                    pass
        executor.shutdown(wait=False)
