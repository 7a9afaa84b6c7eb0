"""``pynbd backup verify``: does a backup chain read exactly like the export?

The chain is read through pynbd's own qcow2 driver (backing files resolved as qemu resolves
them), the export over NBD with many requests in flight. Ranges that both sides report as
zeroes (``base:allocation`` on the export, zero or unallocated clusters down the chain) are not
read at all; everything else is read on both sides and compared. The first difference is
reported as a range: from its first differing byte to the end of the run of differing 512-byte
sectors that follows, within the compared request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from pynbd.client.contexts import is_zero
from pynbd.client.copy import DEFAULT_REQUEST_SIZE, DEFAULT_REQUESTS, Progress, all_zero
from pynbd.client.pool import ClientPool, connect_pool
from pynbd.daemon.open import open_image
from pynbd.nodes.base import BlockNode
from pynbd.protocol.constants import BASE_ALLOCATION, State

SECTOR = 512


@dataclass
class VerifyOptions:
    connections: int = 4
    requests: int = DEFAULT_REQUESTS
    request_size: int = DEFAULT_REQUEST_SIZE
    progress_bar: bool = False
    progress_fd: int | None = None


@dataclass
class VerifyResult:
    export_size: int
    image_size: int
    compared_bytes: int  # read on both sides
    skipped_bytes: int  # zero on both sides by block status: nothing to read
    seconds: float
    mismatch: tuple[int, int] | None = None  # the first differing range [start, end); sizes differ: the excess

    @property
    def equal(self) -> bool:
        return self.mismatch is None and self.export_size == self.image_size

    def as_dict(self) -> dict:
        out = asdict(self)
        out["equal"] = self.equal
        out["mismatch"] = list(self.mismatch) if self.mismatch else None
        return out


def difference(a: bytes | bytearray, b: bytes | bytearray) -> tuple[int, int] | None:
    """The first differing range of two equal-length buffers, relative to their start."""
    if a == b:
        return None
    lo, step = 0, 4096
    while a[lo : lo + step] == b[lo : lo + step]:
        lo += step
    first = next(i for i in range(lo, min(lo + step, len(a))) if a[i] != b[i])
    end = (first // SECTOR + 1) * SECTOR
    while end < len(a) and a[end : end + SECTOR] != b[end : end + SECTOR]:
        end += SECTOR
    return first, min(end, len(a))


def segments(
    left: list[tuple[int, int, bool]], right: list[tuple[int, int, bool]]
) -> Iterator[tuple[int, int, bool, bool]]:
    """Overlay two maps of (offset, length, zero) covering the same range: (offset, length, zero_l, zero_r)."""
    i = j = 0
    while i < len(left) and j < len(right):
        lo = max(left[i][0], right[j][0])
        hi = min(left[i][0] + left[i][1], right[j][0] + right[j][1])
        if lo < hi:
            yield lo, hi - lo, left[i][2], right[j][2]
        if left[i][0] + left[i][1] <= hi:
            i += 1
        if right[j][0] + right[j][1] <= hi:
            j += 1


async def _export_map(pool: ClientPool) -> list[tuple[int, int, bool]]:
    if BASE_ALLOCATION not in pool.contexts:
        return [(0, pool.size, False)]
    extents = (await pool.map_extents([BASE_ALLOCATION]))[BASE_ALLOCATION]
    return [(e.offset, e.length, is_zero(e.flags)) for e in extents]


async def _image_map(node: BlockNode, size: int) -> list[tuple[int, int, bool]]:
    out, pos = [], 0
    for length, flags in await node.block_status(0, size):
        out.append((pos, length, bool(flags & State.ZERO)))
        pos += length
    return out


class _Verifier:
    def __init__(self, pool: ClientPool, node: BlockNode, options: VerifyOptions, size: int) -> None:
        self.pool, self.node, self.options = pool, node, options
        self.slots = asyncio.Semaphore(max(1, options.requests) * len(pool.clients))
        self.tasks: set[asyncio.Task] = set()
        self.mismatches: list[tuple[int, int]] = []
        self.failure: BaseException | None = None
        self.compared = self.skipped = 0
        self.progress = Progress(size, options.progress_bar, options.progress_fd)

    async def run(self, plan: Iterator[tuple[int, int, bool, bool]]) -> None:
        step = self.options.request_size
        try:
            for offset, length, export_zero, image_zero in plan:
                if export_zero and image_zero:
                    self.skipped += length
                    self.progress.advance(length)
                    continue
                for pos in range(offset, offset + length, step):
                    await self.slots.acquire()
                    if self.mismatches or self.failure:
                        self.slots.release()
                        break
                    count = min(step, offset + length - pos)
                    task = asyncio.create_task(self._compare(pos, count, export_zero, image_zero))
                    self.tasks.add(task)
                    task.add_done_callback(self._done)
                if self.mismatches or self.failure:
                    break
            while self.tasks:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
            if self.failure is not None:
                raise self.failure
        finally:
            for task in self.tasks:
                task.cancel()
            self.progress.close()

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def _compare(self, offset: int, count: int, export_zero: bool, image_zero: bool) -> None:
        exported = bytes(count) if export_zero else bytearray(count)
        imaged = bytes(count) if image_zero else bytearray(count)
        reads = []
        if not export_zero:
            reads.append(self.pool.pread_into(exported, offset))
        if not image_zero:
            reads.append(self.node.read_into(offset, memoryview(imaged)))
        await asyncio.gather(*reads)
        if export_zero:
            same = all_zero(memoryview(imaged))
        elif image_zero:
            same = all_zero(memoryview(exported))
        else:
            same = exported == imaged
        if not same:
            mismatch = difference(exported, imaged)
            assert mismatch is not None  # they differ
            start, end = mismatch
            self.mismatches.append((offset + start, offset + end))
        self.compared += count
        self.progress.advance(count)


async def verify_chain(uri: str, chain_top: str, options: VerifyOptions | None = None, **connect_args) -> VerifyResult:
    """Compare the image ``chain_top`` (with its backing chain) with the export at ``uri``."""
    options = options or VerifyOptions()
    started = time.monotonic()
    image = await open_image(chain_top, read_only=True)
    node = image.node
    try:
        pool = await connect_pool(
            uri, max(1, options.connections), meta_contexts=[BASE_ALLOCATION], max_requests=options.requests,
            **connect_args,
        )  # fmt: skip
        try:
            size = pool.size
            verifier = _Verifier(pool, node, options, size)
            if pool.size != node.size:  # nothing to compare: the chain is not a backup of this disk
                verifier.progress.close()
                mismatch: tuple[int, int] | None = (min(pool.size, node.size), max(pool.size, node.size))
            else:
                if size:
                    await verifier.run(segments(await _export_map(pool), await _image_map(node, size)))
                else:
                    verifier.progress.close()
                mismatch = min(verifier.mismatches) if verifier.mismatches else None
            return VerifyResult(
                export_size=pool.size,
                image_size=node.size,
                compared_bytes=verifier.compared,
                skipped_bytes=verifier.skipped,
                seconds=time.monotonic() - started,
                mismatch=mismatch,
            )
        finally:
            await pool.disconnect()
    finally:
        await image.close()
