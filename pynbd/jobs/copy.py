"""The one copy engine of backup, mirror, commit and stream.

:func:`copy_chunk` moves one range from a source node to a target node: ranges that read as
zeroes become write-zeroes (the target stays sparse), data is read into a buffer and written.
:class:`CopyEngine` runs many chunks at once, applies the job's speed limit and pause/cancel
points, and the ``on-source-error``/``on-target-error`` policies (report, ignore, stop, enospc).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from pynbd.nodes.base import BACKGROUND_IO, BlockError
from pynbd.priority import foreground
from pynbd.protocol.constants import State

DEFAULT_CHUNK = 1024 * 1024
DEFAULT_WORKERS = 8
ERROR_POLICIES = ("report", "ignore", "enospc", "stop", "auto")


class CopyError(BlockError):
    """A copy failed; ``operation`` says whether reading the source or writing the target, and
    ``offset`` where the failing request started (qemu-img names it: "error while reading at
    byte N"); ``reason`` is the cause's own words."""

    def __init__(self, operation: str, cause: BaseException, offset: int) -> None:
        err = getattr(cause, "errno", None) or errno.EIO
        super().__init__(err, f"{operation} error during copy: {cause}")
        self.operation = operation
        self.offset = offset
        plain_os_error = isinstance(cause, OSError) and cause.strerror
        self.reason = cause.strerror if plain_os_error else str(cause)


if TYPE_CHECKING:
    from pynbd.graph.core import ChildLink

Staged = list[tuple[int, int, bytearray | memoryview | None]]  # (offset, length, data or None for zeroes)


def split_zeroes(pos: int, buf: bytearray, block: int) -> Staged:
    """Data read at ``pos`` as data pieces and zero pieces (``None``): every ``block``-aligned
    block (aligned in the image, not in the buffer) that is all zeroes is a zero piece, as
    qemu-img convert's ``-S`` treats it."""
    staged: Staged = []
    view, size = memoryview(buf), len(buf)
    start = 0
    while start < size:
        end = min(size, (pos + start) // block * block + block - pos)
        zero = buf.count(0, start, end) == end - start
        if staged and (staged[-1][2] is None) == zero:  # the same kind as the piece before: one piece
            start = staged.pop()[0] - pos
        staged.append((pos + start, end - start, None if zero else view[start:end]))
        start = end
    return staged


async def read_chunk(source: ChildLink, offset: int, length: int, zero_detect: int = 0) -> Staged:
    """Read a range as the pieces to write: data buffers, and zero ranges as ``None``. With
    ``zero_detect`` (a block size), blocks of data that are all zeroes become zero ranges too."""
    staged: Staged = []
    pos, end = offset, offset + length
    try:
        for ext_len, state in await source.block_status(offset, length):
            piece = min(ext_len, end - pos)
            if state & State.ZERO:
                staged.append((pos, piece, None))
            else:
                buf = bytearray(piece)
                await source.read_into(pos, memoryview(buf))
                staged.extend(split_zeroes(pos, buf, zero_detect) if zero_detect else [(pos, piece, buf)])
            pos += piece
    except (BlockError, OSError) as exc:
        raise CopyError("read", exc, pos) from exc
    return staged


async def write_chunk(
    target: ChildLink, staged: Staged, *, serialising: bool = False, target_is_zero: bool = False
) -> None:
    pos = staged[0][0] if staged else 0
    try:
        for pos, piece, buf in staged:
            if buf is None:
                if not target_is_zero:
                    await target.write_zeroes(pos, piece, may_trim=True)
            elif serialising:
                await target.serialising_write(pos, buf)
            else:
                await target.write(pos, buf)
    except (BlockError, OSError) as exc:
        raise CopyError("write", exc, pos) from exc


async def copy_chunk(
    source: ChildLink,
    target: ChildLink,
    offset: int,
    length: int,
    *,
    serialising: bool = False,
    target_is_zero: bool = False,
) -> int:
    """Copy ``[offset, offset+length)``: zeroes as write-zeroes, data as writes. Returns ``length``.

    Raises :class:`CopyError` saying whether the source read or the target write failed."""
    staged = await read_chunk(source, offset, length)
    await write_chunk(target, staged, serialising=serialising, target_is_zero=target_is_zero)
    return length


class CopyEngine:
    """Runs a job's copies: ``copy`` is the per-chunk operation (default :func:`copy_chunk`).

    Each attempt at a chunk runs in the job's ``busy()`` section (pynbd/graph/io.py): a drain
    waits for chunks under way and holds off new ones, and never catches a chunk half-way. Pause
    points, the speed limit, the wait for clients and error stops all lie outside the section,
    so a paused or stopped job never holds up a drain. With ``yield_to_clients`` each chunk first
    waits its turn behind client requests (pynbd.priority)."""

    def __init__(
        self,
        job,
        copy: Callable[[int, int], Awaitable[object]],
        on_source_error: str = "report",
        on_target_error: str = "report",
        chunk: int = DEFAULT_CHUNK,
        workers: int = DEFAULT_WORKERS,
        yield_to_clients: bool = True,
    ) -> None:
        self.job = job
        self.copy = copy
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.chunk = chunk
        self.workers = workers
        self.yield_to_clients = yield_to_clients
        #: errors the ``ignore`` policy let pass, in the order they came (a job may still fail
        #: at its end because of them, as qemu's stream does)
        self.ignored: list[CopyError] = []

    @staticmethod
    def chunks(ranges: Iterable[tuple[int, int]], chunk: int):
        for start, length in ranges:
            for offset in range(start, start + length, chunk):
                yield offset, min(chunk, start + length - offset)

    async def run(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Copy every range, ``workers`` chunks at a time; progress goes to the job."""
        pending = iter(self.chunks(ranges, self.chunk))
        failure: list[BaseException] = []

        async def worker() -> None:
            BACKGROUND_IO.set(True)  # this task's file I/O queues behind the clients'
            for offset, length in pending:
                if failure:
                    return
                try:
                    await self.job.checkpoint()
                    await self.job.throttle(length)
                    if self.yield_to_clients:
                        await foreground.wait_turn()
                    await self.copy_with_policy(offset, length)
                    self.job.current_progress += length
                except BaseException as exc:
                    failure.append(exc)
                    return

        await asyncio.gather(*(worker() for _ in range(self.workers)))
        if failure:
            raise failure[0]

    async def copy_with_policy(self, offset: int, length: int) -> None:
        job = self.job
        while True:
            try:
                async with job.user.busy():
                    await self.copy(offset, length)
                return
            except CopyError as exc:
                action = self.on_source_error if exc.operation == "read" else self.on_target_error
                if action in ("enospc", "auto"):  # as qemu's block_job_error_action: auto is enospc for jobs
                    action = "stop" if exc.errno == errno.ENOSPC else "report"
                job._emit("BLOCK_JOB_ERROR", {"device": job.id, "operation": exc.operation, "action": action})
                if action == "ignore":
                    self.ignored.append(exc)
                    return
                if action == "report":
                    raise
                await job.stop_on_error("nospace" if exc.errno == errno.ENOSPC else "failed")
