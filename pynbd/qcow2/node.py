"""The qcow2 block node: reads, allocating writes, zeroing, discard, block status, persistent bitmaps.

Every byte goes through the ``file`` child node (so the graph can put filters between the format
and the file), and unallocated clusters read through the ``backing`` child. Standalone (``pynbd
serve``, ``pynbd img``) the children are given to the constructor; once the node's ``file`` is
linked in a block graph, the graph's links are authoritative (so a job can re-point ``backing``).

Persistent bitmaps live in ``dirty_bitmaps`` like any node's bitmaps (the base class marks them on
every write, zero and discard), flagged ``persistent``. They are IN_USE on disk from the moment the
image is opened read-write until they are stored on a clean close.

Concurrency: one asyncio lock serialises everything that looks at or changes metadata: the L1
table, the L2 and refcount caches, and every walk over them (mapping, block status, the
metadata-preallocation scan, the free-cluster search). Reads map their range under the lock and
then read data outside it; clusters freed by a write or discard are only handed back to the
allocator once no such read is in flight, so a read can never see another guest offset's data in
a cluster that was freed and reused under it. Writes that need no new metadata, or only carry the
caller's bytes into new clusters, also run outside the lock.

Metadata is cached and written back in the crash-safe order (see ``refcount.py``): data, refcount
blocks, barrier, L2 tables, barrier, L1 entries, barrier, then the deferred refcount decrements.
Write-back happens on flush, FUA, close and when the L2 cache must evict a dirty table; refcount
blocks may also be written early when their cache evicts one, which is why the barrier before the
L2 tables depends on whether any refcount was written since the last flush, not on this write-back.
The cache sizes are options in bytes, as qemu's ``l2-cache-size`` and ``refcount-cache-size``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from array import array
from typing import TYPE_CHECKING

from pynbd.bitmap import DEFAULT_GRANULARITY, DirtyBitmap, NodeBitmap, check_granularity
from pynbd.nodes.base import DATA, HOLE_ZERO, BlockError, BlockNode, Extent, NotFast, merge_extents
from pynbd.protocol.constants import State
from pynbd.qcow2 import bitmaps as bm
from pynbd.qcow2.l2cache import L2Cache, cached_tables
from pynbd.qcow2.layout import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_KNOWN,
    COMPRESSION_NAMES,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_RESERVED,
    MAX_L1_BYTES,
    MAX_SNAPSHOT_EXTRA_DATA,
    MAX_SNAPSHOTS_BYTES,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SNAPSHOT_HEADER,
    SNAPSHOT_HEADER_SIZE,
    FormatError,
    Header,
    Snapshot,
    check_openable,
    check_table_entries,
    compressed_location,
    decode_header,
    decompress,
    table_from_bytes,
    table_to_bytes,
    validate_table,
)
from pynbd.qcow2.refcount import Refcounts, _runs

if TYPE_CHECKING:
    from pynbd.graph.core import ChildLink

log = logging.getLogger("pynbd.qcow2")

# cluster kinds, as qemu's QCOW2_CLUSTER_*
UNALLOCATED = 0
ZERO_PLAIN = 1
ZERO_ALLOC = 2
NORMAL = 3
COMPRESSED = 4

ZERO_DATA = int(State.ZERO)  # allocated, but reads as zeroes
MAX_ALLOC_RUN = 32 << 20  # bytes allocated and written in one go by a large write
_ZEROS = bytes(1 << 20)


def entry_kind(entry: int) -> int:
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO:
        return ZERO_ALLOC if entry & OFFSET_MASK else ZERO_PLAIN
    return NORMAL if entry & OFFSET_MASK else UNALLOCATED


def _writable_in_place(entry: int) -> bool:
    """A normal cluster this image alone owns (COPIED): overwrite it where it is."""
    return entry & (OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO) == OFLAG_COPIED and bool(entry & OFFSET_MASK)


def fill_zero(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZEROS)):
        piece = view[start : start + len(_ZEROS)]
        piece[:] = _ZEROS[: len(piece)]


def default_bitmap_granularity(cluster_size: int) -> int:
    """qemu's default: the cluster size clamped to [4 KiB, 64 KiB]."""
    return min(max(cluster_size, 4096), DEFAULT_GRANULARITY)


async def read_header(file: BlockNode) -> Header:
    """Decode the header and extensions from the first cluster of ``file``."""
    size = file.size
    probe = bytearray(min(size, 4096))
    await file.read_into(0, memoryview(probe))
    header = decode_header(probe)  # validates magic and cluster_bits
    if header.cluster_size > len(probe) and size > len(probe):
        first = bytearray(min(size, header.cluster_size))
        await file.read_into(0, memoryview(first))
        header = decode_header(first)
    return header


async def read_snapshot_table(file: BlockNode, header: Header) -> list[Snapshot]:
    """The internal snapshot table, with qemu's qcow2_read_snapshots limits (at most 1 KiB of
    extra data an entry, 64 MiB in all) and pynbd's own: the table and each snapshot's L1 table
    lie in the file, and the L1 tables are no larger than the active one may be. The table is
    read in chunks as it is parsed, so memory stays bounded by what it really holds."""
    snapshots: list[Snapshot] = []
    if not header.nb_snapshots:
        return snapshots
    cs, file_size = header.cluster_size, file.size
    window, window_start = b"", header.snapshots_offset

    async def take(offset: int, length: int) -> bytes:
        nonlocal window, window_start
        if offset + length > file_size:
            raise FormatError(f"Snapshot table lies past the end of the file (entry at {offset:#x})")
        if not window_start <= offset or offset + length > window_start + len(window):
            chunk = bytearray(min(max(length, 1 << 16), file_size - offset))
            await file.read_into(offset, memoryview(chunk))
            window, window_start = bytes(chunk), offset
        return window[offset - window_start : offset - window_start + length]

    pos = header.snapshots_offset
    table_length = 0
    for i in range(header.nb_snapshots):
        pos += -pos % 8
        table_length += -table_length % 8
        fixed = await take(pos, SNAPSHOT_HEADER_SIZE)
        l1_offset, l1_size, id_size, name_size, *_times, extra_size = SNAPSHOT_HEADER.unpack(fixed)
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError(f"Too much extra metadata in snapshot table entry {i}", errno.EFBIG)
        length = SNAPSHOT_HEADER_SIZE + extra_size + id_size + name_size
        table_length += length
        if table_length > MAX_SNAPSHOTS_BYTES:
            raise FormatError("Snapshot table is too big", errno.EFBIG)
        names = await take(pos + SNAPSHOT_HEADER_SIZE + extra_size, id_size + name_size)
        validate_table(l1_offset, l1_size, 8, MAX_L1_BYTES, "Snapshot L1 table", cs, file_size)
        snapshots.append(
            Snapshot(
                pos,
                length,
                l1_offset,
                l1_size,
                names[:id_size].decode(errors="replace"),
                names[id_size:].decode(errors="replace"),
            )
        )
        pos += length
    return snapshots


class Qcow2Node(BlockNode):
    driver = "qcow2"
    supports_backing = True

    def __init__(
        self,
        file: BlockNode,
        header: Header,
        l1: array,
        refcounts: Refcounts,
        *,
        backing: BlockNode | None = None,
        read_only: bool = False,
        filename: str = "",
        node_name: str = "",
        l2_cache_size: int | None = None,
    ) -> None:
        super().__init__(node_name)
        self._file = file
        self._backing = backing
        self.header = header
        self.read_only = read_only
        self.filename = filename
        self.l1 = l1
        self.refcounts = refcounts
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = header.l2_entries
        self.l2_span = self.l2_entries << self.cluster_bits
        self.l1_dirty: set[int] = set()
        self.refcounts._file = lambda: self.file  # noqa: SLF001 - follow the graph's file link
        self.l2cache = L2Cache(
            lambda: self.file, self.cluster_size, self._writeback, cached_tables(l2_cache_size, self.cluster_size)
        )
        #: the bitmap directory as it is on disk: (entry, its bitmap table) per bitmap
        self.disk_bitmaps: list[tuple[bm.DirEntry, array]] = []
        #: names of the bitmaps that were IN_USE when opened (not saved after their last change)
        self.bitmaps_found_in_use: set[str] = set()
        self._bitmap_tasks: set[asyncio.Task] = set()
        self._bitmap_directory: tuple[int, int] | None = None  # (offset, size) on disk
        self._lock = asyncio.Lock()
        self._inflight_io = 0  # data reads and in-place writes running outside the lock
        self._io_idle = asyncio.Event()
        self._io_idle.set()
        #: data of the write holding the lock, to be written once it has released the lock; new L2
        #: entries may point at it, so a write-back before then writes it first (see _writeback)
        self._unwritten_data: list[tuple[int, memoryview]] = []
        self._compressed_cache: tuple[int, bytes] | None = None
        self.closed = False
        self._metadata_preallocated: bool | None = None  # decided on first use, as qemu does

    @property
    def file(self) -> ChildLink | BlockNode:
        """The link requests to the image file go through (the bare node only while opening)."""
        if "file" in self.children:
            return self.children["file"]
        return self._file

    @property
    def file_node(self) -> BlockNode:
        link = self.children.get("file")
        return link.node if link is not None else self._file

    @property
    def backing(self) -> ChildLink | BlockNode | None:
        if "file" in self.children:
            return self.children.get("backing")
        return self._backing

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        file: BlockNode,
        *,
        header: Header | None = None,
        backing: BlockNode | None = None,
        read_only: bool = False,
        filename: str = "",
        node_name: str = "",
        defer_activation: bool = False,
        l2_cache_size: int | None = None,
        refcount_cache_size: int | None = None,
    ) -> Qcow2Node:
        """Open an image on ``file``; ``backing`` is the already opened backing node, if any.

        The cache sizes are in bytes, as qemu's options (at least 2 L2 tables and 4 refcount
        blocks are cached whatever they say); None keeps pynbd's defaults.

        Read-write, opening writes (bitmaps IN_USE, autoclear bits). In a graph that must wait
        until the node holds its permissions and locks on the file: ``defer_activation`` leaves it
        to :meth:`start_writing`, which the caller runs after attaching the file."""
        header = header or await read_header(file)
        check_openable(header, file.size)
        await read_snapshot_table(file, header)  # refuses what qemu refuses, and tables outside the file
        if header.extended_l2 and not read_only:
            raise FormatError(
                "writing qcow2 images with extended L2 entries (subclusters) is not supported; open it read-only"
            )
        if not read_only:
            if header.nb_snapshots:
                raise FormatError("writing qcow2 images with internal snapshots is not supported; open it read-only")
            if header.incompatible_features & INCOMPAT_CORRUPT:
                raise FormatError("image is marked corrupt; repair it with 'pynbd img check -r all' first")
            if header.incompatible_features & INCOMPAT_DIRTY:
                raise FormatError(
                    "image has the dirty bit set (lazy refcounts); repair it with 'pynbd img check -r all'"
                )
        l1_bytes = bytearray(header.l1_size * 8)
        if l1_bytes:
            await file.read_into(header.l1_table_offset, memoryview(l1_bytes))
        l1 = table_from_bytes(l1_bytes)
        refcounts = await Refcounts.load(file, header, refcount_cache_size)  # re-pointed at node.file below
        refcounts.fresh_from = (file.size + header.cluster_size - 1) // header.cluster_size
        check_table_entries(header, l1, refcounts.table, file.size, writable=not read_only)
        node = cls(
            file,
            header,
            l1,
            refcounts,
            backing=backing,
            read_only=read_only,
            filename=filename,
            node_name=node_name,
            l2_cache_size=l2_cache_size,
        )
        await node._load_bitmaps()
        if not read_only and not defer_activation:
            await node._open_read_write()
        return node

    async def _load_bitmaps(self) -> None:
        ext = self.header.extension(EXT_BITMAPS)
        if ext is None:
            return
        if self.header.version < 3:
            log.warning("%s: ignoring a bitmaps extension in a qcow2 v2 image", self.filename)
            return
        directory = bm.Extension.decode(ext.data, self.cluster_size)
        file_size = self.file_node.size
        directory.check_in_file(file_size)
        raw = bytearray(directory.directory_size)
        await self.file.read_into(directory.directory_offset, memoryview(raw))
        entries = bm.decode_directory(raw, directory.nb_bitmaps)
        bm.check_directory(entries, self.size, self.cluster_size, file_size)
        consistent = bool(self.header.autoclear_features & AUTOCLEAR_BITMAPS)
        if not consistent:
            log.warning(
                "%s: the bitmaps extension was changed by a program that does not know bitmaps: "
                "every bitmap is loaded fully dirty",
                self.filename,
            )
        self._bitmap_directory = (directory.directory_offset, directory.directory_size)
        for entry in entries:
            table = await bm.read_table(self.file, entry)
            self.disk_bitmaps.append((entry, table))
            if entry.in_use or not consistent:
                # never trust it, never drop it: everything may have changed since it was saved
                bitmap = DirtyBitmap(self.size, entry.granularity)
                bitmap.fill()
                self.bitmaps_found_in_use.add(entry.name)
                if entry.in_use:
                    log.warning(
                        "%s: bitmap '%s' was in use (not saved after its last change): loaded as fully dirty",
                        self.filename,
                        entry.name,
                    )
            else:
                bitmap = await bm.load_data(self.file, entry, table, self.size, self.cluster_size)
            self.dirty_bitmaps[entry.name] = NodeBitmap(
                entry.name, self.size, entry.granularity, enabled=entry.auto, persistent=True, bitmap=bitmap
            )

    async def _open_read_write(self) -> None:
        """Clear autoclear bits we do not know, then mark every stored bitmap IN_USE before any write."""
        autoclear = self.header.autoclear_features & AUTOCLEAR_KNOWN
        if self.header.extension(EXT_BITMAPS) is None:
            autoclear &= ~AUTOCLEAR_BITMAPS
        if autoclear != self.header.autoclear_features:
            self.header.autoclear_features = autoclear
            await self._write_header()
        if self.disk_bitmaps and self._bitmap_directory:
            for entry, _ in self.disk_bitmaps:
                entry.flags |= bm.FLAG_IN_USE
            directory = bm.encode_directory([entry for entry, _ in self.disk_bitmaps])
            await self.file.write(self._bitmap_directory[0], directory)
        await self.file.flush()

    # -- basic properties ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.header.size

    def describe(self) -> str:
        return f"qcow2 {self.filename!r}"

    @property
    def compression(self) -> str:
        return COMPRESSION_NAMES[self.header.compression_type]

    def _require_writable(self) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"{self.describe()} is read-only")
        if self.closed:
            raise BlockError(errno.EIO, f"{self.describe()} is closed")

    # -- metadata lookup -------------------------------------------------------------------------

    async def _l2(self, offset: int) -> array:
        if offset % self.cluster_size:
            raise BlockError(errno.EIO, f"qcow2: L2 table offset {offset:#x} is not cluster aligned")
        return await self.l2cache.get(offset)

    def _l2_offset(self, l1_index: int) -> int:
        entry = self.l1[l1_index]
        if entry & L1E_RESERVED:
            raise BlockError(errno.EIO, f"qcow2: L1 entry {l1_index} is corrupt ({entry:#x})")
        return entry & OFFSET_MASK

    async def _map(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(guest offset, length, kind, host) runs of this layer only, merged where contiguous.

        ``host`` is the byte offset in the file for NORMAL and ZERO_ALLOC, the L2 entry for
        COMPRESSED, 0 otherwise."""
        out: list[list[int]] = []
        bits, cs = self.cluster_bits, self.cluster_size
        pos, end = offset, offset + length
        while pos < end:
            l1_index = (pos >> bits) // self.l2_entries
            table_end = min(end, (l1_index + 1) * self.l2_span)
            l2_offset = self._l2_offset(l1_index)
            if not l2_offset:
                self._append_run(out, pos, table_end - pos, UNALLOCATED, 0)
                pos = table_end
                continue
            table = await self._l2(l2_offset)
            base = l1_index * self.l2_entries
            if self.header.extended_l2:
                self._map_subclusters(out, table, base, pos, table_end)
                pos = table_end
                continue
            while pos < table_end:
                cluster = pos >> bits
                entry = table[cluster - base]
                next_pos = min(table_end, (cluster + 1) << bits)
                kind = entry_kind(entry)
                if kind == NORMAL or kind == ZERO_ALLOC:
                    host = (entry & OFFSET_MASK) + (pos & (cs - 1))
                elif kind == COMPRESSED:
                    host = entry
                else:
                    host = 0
                self._append_run(out, pos, next_pos - pos, kind, host)
                pos = next_pos
        return [(g, n, k, h) for g, n, k, h in out]

    def _map_subclusters(self, out: list[list[int]], table: array, base: int, pos: int, end: int) -> None:
        """Extended L2 entries: each cluster has 32 subclusters, allocated, zero or unallocated on
        their own (an entry is followed by its bitmap: allocation bits low, zero bits high)."""
        bits, cs = self.cluster_bits, self.cluster_size
        sc_bits = bits - 5
        while pos < end:
            cluster = pos >> bits
            entry, bitmap = table[2 * (cluster - base)], table[2 * (cluster - base) + 1]
            cluster_end = min(end, (cluster + 1) << bits)
            if entry & OFLAG_COMPRESSED:
                self._append_run(out, pos, cluster_end - pos, COMPRESSED, entry)
                pos = cluster_end
                continue
            host = entry & OFFSET_MASK
            if not host and bitmap & 0xFFFFFFFF:
                raise BlockError(errno.EIO, f"qcow2: subclusters allocated without a host cluster ({entry:#x})")
            while pos < cluster_end:
                sub = (pos >> sc_bits) & 31
                sub_end = min(cluster_end, ((pos >> sc_bits) + 1) << sc_bits)
                if bitmap >> (32 + sub) & 1:
                    kind = ZERO_ALLOC if host else ZERO_PLAIN
                elif bitmap >> sub & 1:
                    kind = NORMAL
                else:
                    kind = UNALLOCATED
                where = host + (pos & (cs - 1)) if kind in (NORMAL, ZERO_ALLOC) else 0
                self._append_run(out, pos, sub_end - pos, kind, where)
                pos = sub_end

    @staticmethod
    def _append_run(out: list[list[int]], pos: int, length: int, kind: int, host: int) -> None:
        if out:
            last = out[-1]
            if last[2] == kind and kind != COMPRESSED and last[0] + last[1] == pos:
                if kind not in (NORMAL, ZERO_ALLOC) or last[3] + last[1] == host:
                    last[1] += length
                    return
        out.append([pos, length, kind, host])

    async def layer_map(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """This layer's allocation of a range (for ``img map``, ``commit`` and ``convert``)."""
        async with self._lock:
            return await self._map(offset, length)

    # -- reads -----------------------------------------------------------------------------------

    async def read_into(self, offset: int, buf: memoryview) -> None:
        async with self._lock:
            plan = await self._map(offset, len(buf))
            self._io_begin()
        try:
            for guest, length, kind, host in plan:
                dst = buf[guest - offset : guest - offset + length]
                if kind == NORMAL:
                    self._check_in_file(host, length)
                    await self.file.read_into(host, dst)
                elif kind == COMPRESSED:
                    data = await self._decompressed(host)
                    within = guest & (self.cluster_size - 1)
                    dst[:] = data[within : within + length]
                elif kind == UNALLOCATED:
                    await self._read_backing(guest, dst)
                else:
                    fill_zero(dst)
        finally:
            self._io_end()

    def _io_begin(self) -> None:
        self._inflight_io += 1
        self._io_idle.clear()

    def _io_end(self) -> None:
        self._inflight_io -= 1
        if not self._inflight_io:
            self._io_idle.set()

    async def _read_backing(self, guest: int, dst: memoryview) -> None:
        if self.backing is None:
            fill_zero(dst)
            return
        inside = max(0, min(len(dst), self.backing.size - guest))
        if inside:
            await self.backing.read_into(guest, dst[:inside])
        if inside < len(dst):
            fill_zero(dst[inside:])

    def _check_in_file(self, host: int, length: int) -> None:
        """EIO for data an L2 entry places past the end of the file (a cluster neither in the file
        when it was opened nor allocated since). qemu reads such a cluster as zeroes and its check
        calls it a corruption; pynbd fails the request rather than return zeroes for the data."""
        if (host + max(length, 1) - 1) >> self.cluster_bits >= self.refcounts.fresh_from:
            raise BlockError(
                errno.EIO, f"qcow2: {self.describe()}: data at {host:#x} lies past the end of the file (corrupt L2)"
            )

    async def _decompressed(self, entry: int) -> bytes:
        cached = self._compressed_cache
        if cached is not None and cached[0] == entry:
            return cached[1]
        offset, length = compressed_location(entry, self.cluster_bits)
        self._check_in_file(offset, 1)
        raw = bytearray(length)
        await self.file.read_into(offset, memoryview(raw))
        try:
            data = decompress(bytes(raw), self.cluster_size, self.header.compression_type)
        except Exception as exc:  # zlib.error, zstd errors, short output
            raise BlockError(errno.EIO, f"qcow2: compressed cluster at {offset:#x} is corrupt: {exc}") from exc
        self._compressed_cache = (entry, data)
        return data

    async def _cluster_content(self, cluster: int, entry: int) -> bytes:
        """What a guest cluster reads as now (the old data a partial write keeps)."""
        kind = entry_kind(entry)
        if kind == COMPRESSED:
            return await self._decompressed(entry)
        buf = bytearray(self.cluster_size)
        if kind == NORMAL:
            self._check_in_file(entry & OFFSET_MASK, self.cluster_size)
            await self.file.read_into(entry & OFFSET_MASK, memoryview(buf))
        elif kind == UNALLOCATED:
            await self._read_backing(cluster << self.cluster_bits, memoryview(buf))
        return bytes(buf)

    # -- writes ----------------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._require_writable()
        view = memoryview(data).cast("B")
        async with self._lock:
            in_place = self._unwritten_data = []
            try:
                await self._write_locked(offset, view, in_place)
            finally:
                self._unwritten_data = []
            if in_place:
                self._io_begin()
        if in_place:
            # overwrites of clusters this image owns need no metadata: let them run concurrently
            # (a cluster freed meanwhile is not reused before they finish: see _writeback)
            try:
                await asyncio.gather(*(self.file.write(host, piece) for host, piece in in_place))
            finally:
                self._io_end()
        if fua:
            await self.flush()

    async def _l2_for_write(self, l1_index: int) -> tuple[int, array]:
        """The L2 table of ``l1_index``, allocating an empty one if there is none."""
        l2_offset = self._l2_offset(l1_index)
        if not l2_offset:
            l2_offset = await self.refcounts.alloc(1)
            table = array("Q", bytes(self.cluster_size))
            await self.l2cache.insert(l2_offset, table, dirty=True)
            self.l1[l1_index] = l2_offset | OFLAG_COPIED
            self.l1_dirty.add(l1_index)
            return l2_offset, table
        if not self.l1[l1_index] & OFLAG_COPIED:
            if await self.refcounts.get(l2_offset // self.cluster_size) != 1:
                raise BlockError(errno.EIO, f"qcow2: L2 table {l1_index} is shared (internal snapshot?)")
            self.l1[l1_index] |= OFLAG_COPIED
            self.l1_dirty.add(l1_index)
        return l2_offset, await self._l2(l2_offset)

    async def _write_locked(
        self, offset: int, view: memoryview, in_place: list[tuple[int, memoryview]] | None = None
    ) -> None:
        """Write under the lock; with ``in_place``, overwrites of owned clusters are only collected."""
        bits = self.cluster_bits
        pos, end = offset, offset + len(view)
        max_run = max(1, MAX_ALLOC_RUN >> bits)
        while pos < end:
            l1_index = (pos >> bits) // self.l2_entries
            table_end = min(end, (l1_index + 1) * self.l2_span)
            l2_offset, table = await self._l2_for_write(l1_index)
            base = l1_index * self.l2_entries
            with self.l2cache.pinned(l2_offset):  # changed after the awaits of the data writes below
                while pos < table_end:
                    i = (pos >> bits) - base
                    entry = table[i]
                    if _writable_in_place(entry):
                        host = entry & OFFSET_MASK
                        j = i + 1
                        while (
                            (base + j) << bits < table_end
                            and _writable_in_place(table[j])
                            and table[j] & OFFSET_MASK == host + ((j - i) << bits)
                        ):
                            j += 1
                        run_end = min(table_end, (base + j) << bits)
                        start_host = host + (pos - ((base + i) << bits))
                        self._check_in_file(start_host, run_end - pos)
                        if in_place is None:
                            await self.file.write(start_host, view[pos - offset : run_end - offset])
                        else:
                            in_place.append((start_host, view[pos - offset : run_end - offset]))
                    else:
                        j = i + 1
                        while (base + j) << bits < table_end and not _writable_in_place(table[j]) and j - i < max_run:
                            j += 1
                        run_end = min(table_end, (base + j) << bits)
                        await self._write_new_clusters(
                            table, base + i, j - i, pos, run_end, view[pos - offset :]
                        )
                        self.l2cache.mark_dirty(l2_offset)
                    pos = run_end

    async def _write_new_clusters(
        self,
        table: array,
        first: int,
        count: int,
        pos: int,
        end: int,
        data: memoryview,
    ) -> None:
        """Copy-on-write ``count`` clusters from guest cluster ``first``: new clusters get the old
        content around the written part, then the L2 entries switch and the old clusters are freed."""
        bits, cs = self.cluster_bits, self.cluster_size
        base = first - first % self.l2_entries
        start, stop = first << bits, (first + count) << bits
        host, fresh = await self.refcounts.alloc_fresh(count)
        write_at = host
        if pos == start and end == stop:
            payload: bytes | bytearray | memoryview = data[: end - pos]
        elif fresh and await self._old_content_is_zero(table, first, base, count, pos > start, end < stop):
            # never-used clusters already read as zeroes: write only the new bytes, as qemu does
            payload = data[: end - pos]
            write_at = host + pos - start
        else:
            buf = bytearray(count * cs)
            if pos > start:
                buf[:cs] = await self._cluster_content(first, table[first - base])
            if end < stop and (count > 1 or pos == start):
                last = first + count - 1
                buf[(count - 1) * cs :] = await self._cluster_content(last, table[last - base])
            buf[pos - start : end - start] = data[: end - pos]
            payload = buf
        # The data goes into the new clusters before any L2 entry points at them, as in qemu: a
        # write that fails then leaves the range reading as before, and no reader can see a new
        # cluster before its data is in it. (Only overwrites of owned clusters run outside the lock.)
        try:
            await self.file.write(write_at, payload)
        except BaseException:
            self.refcounts.free_later(host >> bits, count)  # nothing points at them: give them back
            raise
        for k in range(count):
            index = first - base + k
            old = table[index]
            table[index] = (host + (k << bits)) | OFLAG_COPIED
            self._release(old)

    async def _old_content_is_zero(
        self, table: array, first: int, base: int, count: int, head: bool, tail: bool
    ) -> bool:
        """Whether the parts of the first/last cluster a write keeps read as zeroes now."""
        for cluster, partial in ((first, head), (first + count - 1, tail)):
            if not partial:
                continue
            kind = entry_kind(table[cluster - base])
            if kind in (ZERO_PLAIN, ZERO_ALLOC):
                continue
            if kind == UNALLOCATED and (self.backing is None or (cluster << self.cluster_bits) >= self.backing.size):
                continue
            return False
        return True

    def _release(self, entry: int) -> None:
        """Queue the clusters an entry pointed at for freeing once the new entry is on disk."""
        kind = entry_kind(entry)
        if kind == NORMAL or kind == ZERO_ALLOC:
            self.refcounts.free_later((entry & OFFSET_MASK) >> self.cluster_bits, 1)
        elif kind == COMPRESSED:
            offset, length = compressed_location(entry, self.cluster_bits)
            self.refcounts.free_bytes_later(offset, length)

    def _full_clusters(self, offset: int, end: int) -> tuple[int, int]:
        """The cluster-aligned part of a range; the partial last cluster of the disk counts as full."""
        cs = self.cluster_size
        first = (offset + cs - 1) // cs * cs
        last = (end + cs - 1) // cs * cs if end == self.size else end // cs * cs
        return first, max(first, last)

    async def _reads_as_zero(self, offset: int, length: int) -> bool:
        for guest, run, kind, _ in await self._map(offset, length):
            if kind in (NORMAL, COMPRESSED):
                return False
            if kind == UNALLOCATED and self.backing is not None and guest < self.backing.size:
                inside = min(run, self.backing.size - guest)
                if any(flags != HOLE_ZERO for _, flags in await self.backing.block_status(guest, inside)):
                    return False
        return True

    async def write_zeroes(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, fast: bool = False
    ) -> None:
        self._require_writable()
        end = offset + length
        async with self._lock:
            if self.header.version < 3:  # no zero flag: only real zeroes will do
                if fast:
                    raise NotFast()
                await self._write_zero_bytes(offset, end)
            else:
                first, last = self._full_clusters(offset, end)
                pieces = [(offset, end)] if first >= last else [(offset, first), (last, end)]
                partial = []
                for start, stop in pieces:
                    if start < stop and not await self._reads_as_zero(start, stop - start):
                        partial.append((start, stop))
                if partial and fast:
                    raise NotFast()
                for start, stop in partial:
                    await self._write_zero_bytes(start, stop)
                if first < last:
                    await self._zero_clusters(first, last, may_trim)
            if fua:
                await self._flush_locked()

    async def _write_zero_bytes(self, offset: int, end: int) -> None:
        step = len(_ZEROS)
        for pos in range(offset, end, step):
            await self._write_locked(pos, memoryview(_ZEROS)[: min(step, end - pos)])

    async def _zero_clusters(self, offset: int, end: int, may_trim: bool) -> None:
        """Set the zero flag on whole clusters (qemu's zero_in_l2_slice)."""
        bits = self.cluster_bits
        pos = offset
        while pos < end:
            l1_index = (pos >> bits) // self.l2_entries
            table_end = min(end, (l1_index + 1) * self.l2_span)
            l2_offset, table = await self._l2_for_write(l1_index)
            base = l1_index * self.l2_entries
            changed = False
            for cluster in range(pos >> bits, (table_end + self.cluster_size - 1) >> bits):
                old = table[cluster - base]
                unmap = may_trim or entry_kind(old) == COMPRESSED
                new = (0 if unmap else old) | OFLAG_ZERO
                if new != old:
                    table[cluster - base] = new
                    if unmap:
                        self._release(old)
                    changed = True
            if changed:
                self.l2cache.mark_dirty(l2_offset)
            pos = table_end

    async def discard(self, offset: int, length: int) -> None:
        """As qemu: discarded clusters read as zeroes (v3), never as the backing file's data."""
        await self._discard(offset, length, full=False)

    @property
    def can_unallocate(self) -> bool:
        """Plain L2 entries only: a subcluster image or one with internal snapshots (shared
        clusters) is never written here (see :meth:`open`)."""
        return not self.header.extended_l2 and not self.header.nb_snapshots

    async def unallocate(self, offset: int, length: int) -> None:
        """Drop whole clusters so that reads fall through to the backing file again (what a
        copy-on-read filter releases: data it only ever copied up, which the backing still holds;
        what a hole-punching commit has copied into the base). The gate marks bitmaps, as for
        a write: cheaper than proving the backing holds the same bytes."""
        if not self.can_unallocate:
            what = "subclusters" if self.header.extended_l2 else "internal snapshots"
            raise BlockError(errno.ENOTSUP, f"{self.describe()}: cannot unallocate clusters in an image with {what}")
        await self._discard(offset, length, full=True)

    async def _discard(self, offset: int, length: int, full: bool) -> None:
        self._require_writable()
        bits = self.cluster_bits
        async with self._lock:
            pos, end = self._full_clusters(offset, offset + length)
            while pos < end:
                l1_index = (pos >> bits) // self.l2_entries
                table_end = min(end, (l1_index + 1) * self.l2_span)
                if not self._l2_offset(l1_index) and (full or self.backing is None):
                    pos = table_end  # nothing there (to unallocate, or to hide a backing file with)
                    continue
                l2_offset, table = await self._l2_for_write(l1_index)
                base = l1_index * self.l2_entries
                changed = False
                for cluster in range(pos >> bits, (table_end + self.cluster_size - 1) >> bits):
                    old = table[cluster - base]
                    kind = entry_kind(old)
                    if self.header.version >= 3 and not full:
                        if self.backing is None and kind in (UNALLOCATED, ZERO_PLAIN):
                            continue
                        new = OFLAG_ZERO
                    else:
                        new = 0
                    if new != old:
                        table[cluster - base] = new
                        self._release(old)
                        changed = True
                if changed:
                    self.l2cache.mark_dirty(l2_offset)
                pos = table_end

    async def make_empty(self) -> None:
        """Drop every cluster of this layer so that all of it reads from the backing file again."""
        self._require_writable()
        async with self._lock:
            for l1_index in range(len(self.l1)):
                l2_offset = self._l2_offset(l1_index)
                if not l2_offset:
                    continue
                table = await self._l2(l2_offset)
                changed = False
                for i, old in enumerate(table):
                    if old:
                        self._release(old)
                        table[i] = 0
                        changed = True
                if changed:
                    self.l2cache.mark_dirty(l2_offset)
            await self._flush_locked()

    # -- write-back and flush --------------------------------------------------------------------

    async def _writeback(self) -> None:
        """Write cached metadata in the order that leaves only leaks after a crash."""
        while self._inflight_io:  # data the new entries point at is written before the entries
            await self._io_idle.wait()
        if self._unwritten_data:  # ... and so is the data of the write that holds the lock now
            pieces = list(self._unwritten_data)
            self._unwritten_data.clear()  # written here: the write will not write it again
            await asyncio.gather(*(self.file.write(host, piece) for host, piece in pieces))
        await self.refcounts.write_dirty()
        tables_written = False
        if self.l2cache.dirty or self.l1_dirty:
            if self.refcounts.unflushed:  # written now, or earlier by the refcount cache's eviction
                await self._barrier()
            wrote_l2 = await self.l2cache.write_dirty()
            if self.l1_dirty:
                if wrote_l2:
                    await self._barrier()
                await self._write_l1()
            tables_written = True
        if self.refcounts.pending_free:
            if tables_written:
                await self._barrier()
            freed = await self.refcounts.apply_frees()
            self._compressed_cache = None
            for start, count in freed:
                await self.file.discard(start << self.cluster_bits, count << self.cluster_bits)
            await self.refcounts.write_dirty()

    async def _barrier(self) -> None:
        """Flush the file: what was written before is on disk before anything written after."""
        self.refcounts.unflushed = False  # cleared first: a refcount written during the flush counts again
        try:
            await self.file.flush()
        except BaseException:
            self.refcounts.unflushed = True
            raise

    async def _write_l1(self) -> None:
        indices = sorted(self.l1_dirty)
        self.l1_dirty.clear()  # an entry changed while the writes are in flight is dirty again
        try:
            for first, last in _runs(indices):
                data = table_to_bytes(self.l1[first : last + 1])
                await self.file.write(self.header.l1_table_offset + first * 8, data)
        except BaseException:
            self.l1_dirty.update(indices)
            raise

    async def _flush_locked(self) -> None:
        await self._writeback()
        await self._barrier()

    async def flush(self) -> None:
        if self.read_only or self.closed:
            return
        await self._settle_bitmap_tasks()
        async with self._lock:
            await self._flush_locked()

    async def _write_header(self) -> None:
        await self.file.write(0, self.header.encode())

    async def set_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Record a new backing file in the header (after a commit or stream changed the chain),
        so that opening the image later finds the chain the graph has now."""
        self._require_writable()
        async with self._lock:
            self.header.backing_file = name
            self.header.set_extension(EXT_BACKING_FORMAT, fmt.encode() if name and fmt else None)
            await self._write_header()
            await self.file.flush()

    async def start_writing(self) -> None:
        """Finish a read-write open deferred by ``open(defer_activation=True)``, or a reopen
        read-write: the node now holds its write permission and locks, so it may write."""
        if not self.read_only:
            await self._open_read_write()

    async def reopen(self, read_only: bool) -> None:
        """Switch access mode at run time (a commit's base, blockdev-reopen); the file node below
        is reopened first when becoming writable, after when becoming read-only."""
        if read_only == self.read_only:
            return
        if read_only:  # as a clean close: bitmaps stored without IN_USE, metadata flushed
            await self._settle_bitmap_tasks()
            async with self._lock:
                await self._store_bitmaps()
                await self._flush_locked()
            self.read_only = True
        else:  # the caller runs start_writing() once the node holds its write permission
            self.read_only = False

    async def close(self) -> None:
        if self.closed:
            return
        if not self.read_only:
            await self._settle_bitmap_tasks()
            async with self._lock:
                await self._store_bitmaps()
                await self._flush_locked()
        self.closed = True
        if "file" not in self.children:  # standalone: the children are ours; in a graph, the graph's
            await self._file.close()
            if self._backing is not None:
                await self._backing.close()

    # -- block status ----------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """base:allocation over the whole chain: data anywhere is data, zero clusters read as holes."""
        extents: list[Extent] = []
        for guest, run, kind, host in await self.layer_map(offset, length):
            if kind == NORMAL:
                extents.extend(await self.host_status(host, run))
            elif kind == COMPRESSED:
                extents.append((run, DATA))
            elif kind == UNALLOCATED and self.backing is not None and guest < self.backing.size:
                inside = min(run, self.backing.size - guest)
                extents.extend(await self.backing.block_status(guest, inside))
                extents.append((run - inside, HOLE_ZERO))
            else:
                extents.append((run, HOLE_ZERO))
        return merge_extents(extents)

    async def host_status(self, host: int, length: int) -> list[Extent]:
        """Data clusters whose host range is a hole in the file read as zeroes (ZERO, still
        allocated), but qemu asks the file only for images with preallocated metadata (qcow2's
        BDRV_BLOCK_RECURSE); in any other image an allocated cluster is data, holes or not."""
        if not await self._is_metadata_preallocated():
            return [(length, DATA)]
        extents = await self.file.block_status(host, length)
        return [(n, ZERO_DATA if flags & int(State.ZERO) else DATA) for n, flags in extents]

    async def _is_metadata_preallocated(self) -> bool:
        """qemu's qcow2_detect_metadata_preallocation: the refcounts claim clearly more clusters
        (10/9, at least 2 more) than the file really has allocated."""
        if self._metadata_preallocated is not None:
            return self._metadata_preallocated
        async with self._lock:  # the walk loads (and evicts) refcount blocks that writers are changing
            if self._metadata_preallocated is None:  # or another walk decided while this one waited
                self._metadata_preallocated = await self._scan_for_metadata_preallocation()
        return self._metadata_preallocated

    async def _scan_for_metadata_preallocation(self) -> bool:
        fd = getattr(self.file_node, "fd", None)
        if fd is None:
            return False
        st = os.fstat(fd)
        real_clusters = st.st_blocks * 512 // self.cluster_size
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        counted = 0
        for cluster in range(-(-st.st_size // self.cluster_size)):
            counted += bool(await self.refcounts.get(cluster))
            if counted >= threshold:
                return True
        return False

    async def allocation_depth(self, offset: int, length: int) -> list[Extent]:
        extents: list[Extent] = []
        for guest, run, kind, _ in await self.layer_map(offset, length):
            if kind != UNALLOCATED:
                extents.append((run, 1))
            elif self.backing is not None:
                # past the end of a shorter backing file qemu counts the zeroes it reads there as
                # allocated in that backing layer (depth 2), not as unallocated
                inside = max(0, min(run, self.backing.size - guest))
                if inside:
                    below = await self.backing.allocation_depth(guest, inside)
                    extents.extend((n, depth + 1 if depth else 0) for n, depth in below)
                extents.append((run - inside, 2))
            else:
                extents.append((run, 0))
        return merge_extents(extents)

    # -- persistent bitmaps ----------------------------------------------------------------------

    @property
    def can_store_bitmaps(self) -> bool:
        return not self.read_only and self.header.version >= 3

    def persistent_bitmaps(self) -> list[NodeBitmap]:
        return [bitmap for bitmap in self.dirty_bitmaps.values() if bitmap.persistent]

    def add_bitmap(self, name: str, granularity: int | None = None, enabled: bool = True) -> NodeBitmap:
        """A new persistent bitmap, recording if ``enabled``; on disk (IN_USE) at the next flush."""
        self._require_writable()
        if not self.can_store_bitmaps:
            raise BlockError(errno.ENOTSUP, "Cannot store dirty bitmaps in qcow2 v2 files")
        if name in self.dirty_bitmaps:
            raise BlockError(errno.EEXIST, f"Bitmap already exists: {name}")
        if not name or len(name.encode()) > bm.MAX_NAME:
            raise BlockError(errno.EINVAL, "bitmap names must be 1 to 1023 bytes long")
        if len(self.persistent_bitmaps()) >= bm.MAX_BITMAPS:
            raise BlockError(errno.ENOSPC, "too many bitmaps")
        granularity = granularity or default_bitmap_granularity(self.cluster_size)
        try:
            check_granularity(granularity)
        except ValueError as exc:
            raise BlockError(errno.EINVAL, str(exc)) from None
        bitmap = NodeBitmap(name, self.size, granularity, enabled=enabled, persistent=True)
        self.dirty_bitmaps[name] = bitmap
        self.bitmap_added(bitmap)
        return bitmap

    def remove_bitmap(self, name: str) -> None:
        self._require_writable()
        bitmap = self.dirty_bitmaps.pop(name, None)
        if bitmap is None:
            raise BlockError(errno.ENOENT, f"Dirty bitmap '{name}' not found")
        if bitmap.persistent:
            self.bitmap_removed(bitmap)

    def bitmap_added(self, bitmap: NodeBitmap) -> None:
        """A persistent bitmap joined ``dirty_bitmaps``: put it in the directory, IN_USE, soon."""
        self._bitmaps_changed()

    def bitmap_removed(self, bitmap: NodeBitmap) -> None:
        self._bitmaps_changed()
        self.bitmaps_found_in_use.discard(bitmap.name)

    def _bitmaps_changed(self) -> None:
        """Rewrite the directory in the background (callers are synchronous transaction commits)."""
        if self.read_only or self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: stored on close
        task = loop.create_task(self._store_bitmaps_now(in_use=True))
        self._bitmap_tasks.add(task)
        task.add_done_callback(self._bitmap_tasks.discard)

    async def _store_bitmaps_now(self, in_use: bool) -> None:
        async with self._lock:
            if not self.closed:
                await self._store_bitmaps(in_use)

    async def _settle_bitmap_tasks(self) -> None:
        while self._bitmap_tasks:
            await asyncio.gather(*list(self._bitmap_tasks), return_exceptions=True)

    def find_bitmap(self, name: str) -> NodeBitmap | None:
        """The named bitmap of this node or, as qemu-nbd -B looks, of a node down the backing chain."""
        node: BlockNode | None = self
        while node is not None:
            found = node.dirty_bitmaps.get(name)
            if found is not None:
                return found
            node = getattr(node, "backing", None)
        return None

    async def _store_bitmaps(self, in_use: bool = False) -> None:
        """Write every persistent bitmap to new clusters, switch the header to the new directory,
        then free the old one. With ``in_use`` the entries stay IN_USE (the image remains open)."""
        persistent = self.persistent_bitmaps()
        if not persistent and not self.disk_bitmaps:
            return
        cs = self.cluster_size
        zero_cluster = bytes(cs)
        entries: list[tuple[bm.DirEntry, array]] = []
        for bitmap in persistent:
            dirty_bitmap = bitmap.bitmap
            table_size = bm.table_entries_needed(self.size, dirty_bitmap.granularity, cs)
            data = dirty_bitmap.to_bytes()
            chunks = [data[j * cs : (j + 1) * cs] for j in range(table_size)]
            dirty = [j for j, chunk in enumerate(chunks) if chunk and chunk != zero_cluster[: len(chunk)]]
            table = array("Q", bytes(8 * table_size))
            if dirty:
                host = await self.refcounts.alloc(len(dirty))
                payload = b"".join(chunks[j].ljust(cs, b"\0") for j in dirty)
                await self.file.write(host, payload)
                for k, j in enumerate(dirty):
                    table[j] = host + k * cs
            table_offset = await self.refcounts.alloc((table_size * 8 + cs - 1) // cs)
            await self.file.write(table_offset, table_to_bytes(table))
            gbits = dirty_bitmap.granularity.bit_length() - 1
            flags = (bm.FLAG_AUTO if bitmap.enabled else 0) | (bm.FLAG_IN_USE if in_use else 0)
            entries.append((bm.DirEntry(bitmap.name, table_offset, table_size, flags, gbits), table))
        ext_data = None
        directory_location = None
        if entries:
            directory = bm.encode_directory([entry for entry, _ in entries])
            directory_offset = await self.refcounts.alloc((len(directory) + cs - 1) // cs)
            await self.file.write(directory_offset, directory)
            ext_data = bm.Extension(len(entries), len(directory), directory_offset).encode()
            directory_location = (directory_offset, len(directory))
        # everything the new directory names is on disk and counted before the header names it
        await self._writeback()
        await self.file.flush()
        self.header.set_extension(EXT_BITMAPS, ext_data)
        if ext_data:
            self.header.autoclear_features |= AUTOCLEAR_BITMAPS
        else:
            self.header.autoclear_features &= ~AUTOCLEAR_BITMAPS
        await self._write_header()
        await self.file.flush()
        for entry, table in self.disk_bitmaps:
            self.refcounts.free_later(entry.table_offset // cs, (entry.table_size * 8 + cs - 1) // cs)
            for cluster in bm.table_clusters(table, cs):
                self.refcounts.free_later(cluster, 1)
        if self._bitmap_directory:
            offset, size = self._bitmap_directory
            self.refcounts.free_later(offset // cs, (size + cs - 1) // cs)
        self.disk_bitmaps = entries
        self._bitmap_directory = directory_location
        if not in_use:
            self.bitmaps_found_in_use.clear()
        await self._writeback()
