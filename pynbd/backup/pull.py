"""Full and incremental pulls from an NBD export into qcow2 files.

A full backup is a fresh qcow2 of the export's size: only what ``base:allocation`` reports as data
is read, and blocks that read as zeroes are left unallocated. An incremental backup reads only
what ``qemu:dirty-bitmap:NAME`` marks dirty and the previous backup is its backing file, so the
chain restores with ``qemu-img convert`` or ``pynbd copy``. Unlike virtnbdbackup, dirty ranges
that are now holes or zeroes (a guest TRIM) are written as zero clusters: without them they would
read through to the older data in the backing file and the restore would not be byte-exact.

The copying is the engine of ``pynbd copy`` (many requests in flight over the async client, one
connection per multi-conn slot), with the qcow2 driver as its target.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from pynbd.backup.target import Qcow2Disk
from pynbd.client.client import Extent
from pynbd.client.contexts import is_dirty, is_zero
from pynbd.client.copy import (
    DEFAULT_REQUEST_SIZE,
    DEFAULT_REQUESTS,
    Copier,
    CopyError,
    CopyOptions,
    NBDDisk,
    _overlap,
    open_nbd_source,
)
from pynbd.client.errors import NBDError
from pynbd.client.pool import connect_pool
from pynbd.client.uri import URIError
from pynbd.daemon.open import open_image, probe_format
from pynbd.nodes.base import BlockError
from pynbd.protocol.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX
from pynbd.qcow2.create import DEFAULT_CLUSTER_SIZE, CreateOptions, create_qcow2
from pynbd.qcow2.layout import FormatError


class BackupError(Exception):
    pass


#: failures a backup reports as a message rather than a traceback
EXPECTED_ERRORS = (BackupError, CopyError, NBDError, BlockError, FormatError, URIError, OSError, ValueError)


@dataclass
class BackupOptions:
    connections: int = 4
    requests: int = DEFAULT_REQUESTS
    request_size: int = DEFAULT_REQUEST_SIZE
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    force: bool = False  # replace an existing output file
    progress_bar: bool = False
    progress_fd: int | None = None


@dataclass
class BackupResult:
    kind: str  # "full" or "incremental"
    output: str
    backing: str | None  # the backing file name as recorded in the output (relative to it)
    size: int
    data_bytes: int  # written as data
    zero_bytes: int  # written as zero clusters (dirty ranges that now read as zeroes)
    skipped_bytes: int  # not written: holes of a full backup, clean ranges of an incremental
    seconds: float
    bitmap: str | None = None
    #: incremental: the ranges the bitmap marked dirty, (offset, length), merged
    dirty: list[tuple[int, int]] | None = field(default=None)

    @property
    def dirty_bytes(self) -> int:
        return sum(length for _, length in self.dirty or ())

    def as_dict(self) -> dict:
        out = asdict(self)
        out["dirty_bytes"] = self.dirty_bytes
        if self.dirty is not None:
            out["dirty"] = [list(r) for r in self.dirty]
        return out


class _BackupCopier(Copier):
    """The copy engine, recording the dirty set of an incremental run as it walks it.

    Servers without ``base:allocation`` still work: every dirty range is then read as data.
    """

    def __init__(self, src: NBDDisk, dst: Qcow2Disk, options: CopyOptions) -> None:
        super().__init__(src, dst, options)
        self.dirty: list[tuple[int, int]] = []

    async def _source_runs(self, size: int):
        context = self.options.map_context
        if context is None:
            async for run in super()._source_runs(size):
                yield run
            return
        assert isinstance(self.src, NBDDisk)  # a map context needs an NBD source (open_source)
        pool = self.src.pool
        contexts = [context] + ([BASE_ALLOCATION] if BASE_ALLOCATION in pool.contexts else [])
        async for step in pool.iter_extents(contexts, 0, size):
            allocation = step.get(BASE_ALLOCATION)
            for marked in step[context]:
                if not is_dirty(marked.flags):
                    self.stats.skipped_bytes += marked.length
                    self._advance(marked.length)
                    continue
                if self.dirty and self.dirty[-1][0] + self.dirty[-1][1] == marked.offset:
                    self.dirty[-1] = (self.dirty[-1][0], self.dirty[-1][1] + marked.length)
                else:
                    self.dirty.append((marked.offset, marked.length))
                if allocation is not None:
                    pieces = _overlap(allocation, marked)
                else:
                    pieces = [Extent(marked.offset, marked.length, 0)]
                for ext in pieces:
                    yield ext.offset, ext.length, is_zero(ext.flags)


async def full_backup(uri: str, output: str, options: BackupOptions | None = None, **connect_args) -> BackupResult:
    """Copy the export at ``uri`` into a new qcow2 file ``output``."""
    return await _pull(uri, output, None, None, options or BackupOptions(), connect_args)


async def incremental_backup(
    uri: str, bitmap: str, base: str, output: str, options: BackupOptions | None = None, **connect_args
) -> BackupResult:
    """Copy what ``qemu:dirty-bitmap:<bitmap>`` marks into a new qcow2 ``output`` backed by ``base``."""
    if not bitmap:
        raise BackupError("an incremental backup needs the name of a dirty bitmap")
    return await _pull(uri, output, bitmap, base, options or BackupOptions(), connect_args)


def _check_output(output: str, base: str | None, force: bool) -> None:
    if base is not None and os.path.exists(output) and os.path.samefile(output, base):
        raise BackupError(f"{output} is the base of the backup itself")
    if os.path.isdir(output):
        raise BackupError(f"{output} is a directory")
    if os.path.exists(output) and not force:
        raise BackupError(f"{output} already exists (use --force to replace it)")


async def _base_image(base: str) -> tuple[str, int]:
    """The format and virtual size of the previous backup (its own chain must open too)."""
    fmt = probe_format(base)
    image = await open_image(base, fmt, read_only=True)
    try:
        return fmt, image.node.size
    finally:
        await image.close()


async def _allocation_readable(source: NBDDisk) -> bool:
    """Whether the export answers block status over the whole disk with base:allocation included."""
    pool = source.pool
    if BASE_ALLOCATION not in pool.contexts or not pool.size:
        return True
    try:
        await pool.block_status(pool.size, 0)
    except NBDError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return False
        raise
    return True


async def _pull(
    uri: str, output: str, bitmap: str | None, base: str | None, options: BackupOptions, connect_args: dict
) -> BackupResult:
    _check_output(output, base, options.force)
    backing = backing_format = None
    base_size = None
    if base is not None:
        backing_format, base_size = await _base_image(base)
        backing = os.path.relpath(os.path.realpath(base), os.path.dirname(os.path.realpath(output)))
    copy_options = CopyOptions(
        connections=max(1, options.connections),
        requests=max(1, options.requests),
        request_size=options.request_size,
        map_context=DIRTY_BITMAP_PREFIX + bitmap if bitmap else None,
        progress_bar=options.progress_bar,
        progress_fd=options.progress_fd,
    )
    if not 0 < copy_options.request_size <= 32 << 20:
        raise BackupError("request size must be between 1 byte and 32 MiB")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pynbd-backup")
    source = target = None
    created = False
    try:
        source = await open_nbd_source(uri, copy_options, **connect_args)
        if bitmap and not await _allocation_readable(source):
            # a copy-before-write view limited to the bitmap refuses block status outside it (as
            # qemu's does, EACCES): ask for the bitmap alone and read every dirty range as data
            await source.close()
            source = None
            pool = await connect_pool(
                uri, copy_options.connections, meta_contexts=[copy_options.map_context],
                max_requests=copy_options.requests, **connect_args,
            )  # fmt: skip
            source = NBDDisk(pool)
        size = source.size
        assert size is not None
        if size % 512:
            raise BackupError(f"the export is {size} bytes, not a multiple of 512: qcow2 cannot hold it exactly")
        if base_size is not None and base_size != size:
            raise BackupError(f"the export is {size} bytes but the base {base} is {base_size} bytes")
        create_qcow2(
            output, size, CreateOptions(cluster_size=options.cluster_size), backing_file=backing,
            backing_format=backing_format,
        )  # fmt: skip
        created = True
        target = Qcow2Disk(await open_image(output, "qcow2", read_only=False))
        copier = _BackupCopier(source, target, copy_options)
        stats = await copier.run()
        closing, target = target, None
        await closing.close()  # writes the metadata back and flushes
        return BackupResult(
            kind="incremental" if bitmap else "full",
            output=output,
            backing=backing,
            size=size,
            data_bytes=stats.data_bytes,
            zero_bytes=stats.zero_bytes,
            skipped_bytes=stats.skipped_bytes,
            seconds=stats.seconds,
            bitmap=bitmap,
            dirty=copier.dirty if bitmap else None,
        )
    except BaseException:
        if target is not None:
            await _quietly(target.close())
        if created:  # a partial backup must not be mistaken for a good one
            try:
                os.unlink(output)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        raise
    finally:
        if source is not None:
            await _quietly(source.close())
        executor.shutdown(wait=False)


async def _quietly(coro) -> None:
    """Clean-up after a failure must not hide the failure."""
    try:
        await coro
    except Exception:
        pass
