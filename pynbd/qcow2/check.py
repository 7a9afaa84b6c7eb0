"""``check``: rebuild the refcounts from every reference and compare, as qemu-img check does.

The walk visits the header, the L1 table and every L2 table and data cluster, the refcount table
and blocks, the snapshot table and snapshot L1/L2 tables, and the bitmap directory, tables and
data. Stored counts above the computed ones are leaks (harmless), below them corruptions. The
COPIED flag of every L1 and L2 entry must say "refcount is exactly 1". Messages, counts, repair
behaviour and exit codes follow qemu-img 7.2, so scripts that parse one parse the other.

Beyond qemu: bitmaps left IN_USE (not saved after their last change) are reported, without
counting as errors (qemu-img check is silent about them), and ``-r all`` stores them back fully
dirty and consistent, which is exactly how the driver loads them anyway.
"""

from __future__ import annotations

import errno
import struct
from array import array
from dataclasses import dataclass, field

from pynbd.nodes.base import BlockError
from pynbd.nodes.file import FileNode
from pynbd.qcow2 import bitmaps as bm
from pynbd.qcow2.layout import (
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1E_RESERVED,
    L2E_RESERVED,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFT_RESERVED,
    FormatError,
    Header,
    check_openable,
    compressed_location,
    table_from_bytes,
    table_to_bytes,
)
from pynbd.qcow2.node import Qcow2Node, read_header, read_snapshot_table
from pynbd.qcow2.refcount import Refcounts, encode_block, new_block

REPAIR_LEAKS = "leaks"
REPAIR_ALL = "all"


@dataclass
class CheckResult:
    """qemu's ImageCheck, plus the messages qemu prints on stderr while checking."""

    filename: str
    format: str = "qcow2"
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    in_use_bitmaps: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    #: why the check itself failed (qemu-img then prints "Check failed: ..." and no report)
    failure: str | None = None

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 1 check failed, 2 corruptions, 3 only leaks."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict:
        """ImageCheck as qemu-img prints it: optional counters only when non-zero, in qemu's order."""
        fields = [
            ("image-end-offset", self.image_end_offset, False),
            ("compressed-clusters", self.compressed_clusters, False),
            ("total-clusters", self.total_clusters, False),
            ("corruptions", self.corruptions, False),
            ("corruptions-fixed", self.corruptions_fixed, False),
            ("check-errors", self.check_errors, True),
            ("leaks", self.leaks, False),
            ("leaks-fixed", self.leaks_fixed, False),
            ("allocated-clusters", self.allocated_clusters, False),
            ("filename", self.filename, True),
            ("format", self.format, True),
            ("fragmented-clusters", self.fragmented_clusters, False),
        ]
        return {key: value for key, value, always in fields if always or value}

    def human(self) -> str:
        """qemu-img's dump_human_image_check."""
        lines: list[str] = []
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        else:
            if self.corruptions:
                lines += [
                    "",
                    f"{self.corruptions} errors were found on the image.",
                    "Data may be corrupted, or further writes to the image may corrupt it.",
                ]
            if self.leaks:
                lines += [
                    "",
                    f"{self.leaks} leaked clusters were found on the image.",
                    "This means waste of disk space, but no harm to data.",
                ]
            if self.check_errors:
                lines += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            lines.append(
                f"{self.allocated_clusters}/{self.total_clusters} = "
                f"{self.allocated_clusters * 100.0 / self.total_clusters:0.2f}% allocated, "
                f"{self.fragmented_clusters * 100.0 / self.allocated_clusters:0.2f}% fragmented, "
                f"{self.compressed_clusters * 100.0 / self.allocated_clusters:0.2f}% compressed clusters"
            )
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines) + "\n"


class _Counter:
    """Computed refcounts, growing as references beyond the end of the file turn up."""

    def __init__(self, clusters: int) -> None:
        self.counts = array("I", bytes(4 * clusters))

    def add(self, cluster: int, count: int = 1) -> None:
        if cluster + count > len(self.counts):
            self.counts.extend(array("I", bytes(4 * (cluster + count - len(self.counts)))))
        for c in range(cluster, cluster + count):
            self.counts[c] += 1

    def __len__(self) -> int:
        return len(self.counts)


class _Walk:
    """One pass over the image's metadata."""

    def __init__(self, file: FileNode, header: Header, result: CheckResult) -> None:
        self.file = file
        self.header = header
        self.result = result
        self.cs = header.cluster_size
        self.bits = header.cluster_bits
        self.file_clusters = (file.size + self.cs - 1) // self.cs
        self.counter = _Counter(self.file_clusters)
        self.refcount_structure: list[int] = []  # clusters of the refcount table and blocks

    def error(self, message: str) -> None:
        self.result.messages.append(message)
        self.result.corruptions += 1

    def ref_bytes(self, offset: int, length: int) -> None:
        """Count a reference to the clusters of a byte range. A range that ends a cluster or more
        past the end of the file is a corruption, not counted (qemu's rule and words: the last
        cluster may be only partly in the file); so the counts stay within the file's size."""
        if length <= 0:
            return
        if offset + length - self.file.size >= self.cs:
            self.error(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                f"offset {offset:#x} size {length:#x}"
            )
            return
        first = offset // self.cs
        last = (offset + length - 1) // self.cs
        self.counter.add(first, last - first + 1)

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.file.read_into(offset, memoryview(buf))
        return bytes(buf)

    async def run(self) -> None:
        h = self.header
        self.ref_bytes(0, self.cs)
        await self.l1_table(h.l1_table_offset, h.l1_size, active=True)
        self.ref_bytes(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        self.refcount_structure += range(
            h.refcount_table_offset // self.cs, h.refcount_table_offset // self.cs + h.refcount_table_clusters
        )
        await self.refcount_blocks()
        await self.snapshots()
        await self.bitmaps()

    async def l1_table(self, offset: int, size: int, active: bool) -> None:
        if not size:
            return
        if offset % self.cs:
            self.error(f"ERROR l1_table_offset={offset:#x}: Table is not cluster aligned")
            return
        self.ref_bytes(offset, size * 8)
        l1 = table_from_bytes(await self.read(offset, size * 8))
        for entry in l1:
            if entry & L1E_RESERVED and active:
                self.error(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            l2_offset = entry & OFFSET_MASK
            if not l2_offset:
                continue
            self.ref_bytes(l2_offset - l2_offset % self.cs, self.cs)
            if l2_offset % self.cs:
                self.error(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
                continue
            await self.l2_table(l2_offset, active)

    async def l2_table(self, offset: int, active: bool) -> None:
        table = table_from_bytes(await self.read(offset, self.cs))
        next_contiguous = [0]  # qemu counts fragmentation within each L2 table
        step = 2 if self.header.extended_l2 else 1
        result = self.result
        for i in range(0, len(table), step):
            entry = table[i]
            if entry & OFLAG_COMPRESSED:
                if entry & OFLAG_COPIED:
                    self.error(
                        f"ERROR: coffset={entry & ~OFLAG_COPIED:#x}: "
                        "copied flag must never be set for compressed clusters"
                    )
                coffset, csize = compressed_location(entry & ~(OFLAG_COPIED | OFLAG_COMPRESSED), self.bits)
                self.ref_bytes(coffset, csize)
                if active:
                    result.allocated_clusters += 1
                    result.compressed_clusters += 1
                    result.fragmented_clusters += 1
                continue
            host = entry & OFFSET_MASK
            if not host:
                continue
            if active and entry & L2E_RESERVED:
                self.error(f"ERROR found L2 entry with reserved bits set: {entry:x}")
            if active:
                result.allocated_clusters += 1
                if next_contiguous[0] and host != next_contiguous[0]:
                    result.fragmented_clusters += 1
                next_contiguous[0] = host + self.cs
            self.ref_bytes(host - host % self.cs, self.cs)
            if host % self.cs:
                self.error(f"ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted.")

    async def refcount_blocks(self) -> None:
        h = self.header
        table = table_from_bytes(await self.read(h.refcount_table_offset, h.refcount_table_clusters * self.cs))
        for index, entry in enumerate(table):
            offset = entry & ~REFT_RESERVED
            if not offset:
                continue
            if offset % self.cs:
                self.error(f"ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted")
                continue
            if offset // self.cs >= self.file_clusters:
                self.error(f"ERROR refcount block {index} is outside image")
                continue
            self.counter.add(offset // self.cs)
            self.refcount_structure.append(offset // self.cs)

    async def snapshots(self) -> None:
        h = self.header
        if not h.nb_snapshots:
            return
        end = h.snapshots_offset
        for snapshot in await read_snapshot_table(self.file, h):  # validated: sizes within limits
            await self.l1_table(snapshot.l1_table_offset, snapshot.l1_size, active=False)
            end = snapshot.offset + snapshot.length
        self.ref_bytes(h.snapshots_offset, end - h.snapshots_offset)

    async def bitmaps(self) -> None:
        ext = self.header.extension(EXT_BITMAPS)
        if ext is None:
            return
        try:  # everything the directory says is checked before its tables are read
            directory = bm.Extension.decode(ext.data, self.cs)
            directory.check_in_file(self.file.size)
            raw = await self.read(directory.directory_offset, directory.directory_size)
            entries = bm.decode_directory(raw, directory.nb_bitmaps)
            for entry in entries:
                if not entry.table_offset or entry.table_offset % self.cs:
                    raise FormatError(f"bitmap '{entry.name}' table is not cluster aligned")
            bm.check_directory(entries, self.header.size, self.cs, self.file.size)
        except FormatError as exc:
            self.error(f"ERROR bitmaps extension: {exc}")
            return
        self.ref_bytes(directory.directory_offset, directory.directory_size)
        for entry in entries:
            if entry.in_use:
                self.result.in_use_bitmaps.append(entry.name)
            self.ref_bytes(entry.table_offset, entry.table_size * 8)
            table = table_from_bytes(await self.read(entry.table_offset, entry.table_size * 8))
            for cluster in bm.table_clusters(table, self.cs):
                self.ref_bytes(cluster * self.cs, self.cs)


async def _stored_counts(file: FileNode, header: Header, clusters: int) -> tuple[Refcounts, list[int]]:
    refcounts = await Refcounts.load(file, header)
    stored = []
    for c in range(clusters):
        try:
            stored.append(await refcounts.get(c))
        except BlockError:
            stored.append(0)
    return refcounts, stored


async def _check_pass(
    filename: str, repair: str | None, result: CheckResult, header: Header | None = None
) -> tuple[bool, CheckResult]:
    """One check; with ``repair`` fix what that level allows. Returns (anything fixed, result)."""
    file = FileNode(filename, read_only=repair is None)
    fixed = False
    try:
        header = await read_header(file)
        check_openable(header, file.size)
        walk = _Walk(file, header, result)
        await walk.run()
        result.total_clusters = (header.size + walk.cs - 1) // walk.cs
        clusters = len(walk.counter)
        refcounts, stored = await _stored_counts(file, header, clusters)
        computed = walk.counter.counts
        mismatches = [(c, stored[c], computed[c]) for c in range(clusters) if stored[c] != computed[c]]
        rebuild = False
        for cluster, have, want in mismatches:
            if have == 0:
                rebuild = True
            kind = "ERROR" if have < want else "Leaked"
            result.messages.append(f"{kind} cluster {cluster} refcount={have} reference={want}")
            if have < want:
                result.corruptions += 1
            else:
                result.leaks += 1
        highest = max((c for c in range(clusters) if stored[c] or computed[c]), default=-1)
        if repair == REPAIR_ALL and rebuild:
            result.messages.append("Rebuilding refcount structure")
            await _rebuild(file, header, walk)
            result.corruptions_fixed += result.corruptions
            result.leaks_fixed += result.leaks
            result.corruptions = result.leaks = 0
            fixed = True
            refcounts, stored = await _stored_counts(file, header, len(walk.counter))
        elif repair and mismatches and rebuild:
            result.messages.append("ERROR need to rebuild refcount structures")
            result.check_errors += 1
            result.failure = "Check failed: Input/output error"
            return fixed, result
        elif repair and mismatches:
            for cluster, have, want in mismatches:
                if have > want or repair == REPAIR_ALL:
                    result.messages.append(f"Repairing cluster {cluster} refcount={have} reference={want}")
                    blk = await refcounts.block(cluster // refcounts.per_block)
                    assert blk is not None  # a missing block reads as refcount 0, which means rebuild
                    blk[cluster % refcounts.per_block] = want
                    refcounts.dirty_blocks.add(cluster // refcounts.per_block)
                    stored[cluster] = want
                    if have > want:
                        result.leaks -= 1
                        result.leaks_fixed += 1
                    else:
                        result.corruptions -= 1
                        result.corruptions_fixed += 1
                    fixed = True
            await refcounts.write_dirty()
        if await _check_copied(file, header, refcounts, result, repair == REPAIR_ALL):
            fixed = True
        result.image_end_offset = (highest + 1) * walk.cs if highest >= 0 else 0
        if repair is not None:
            await file.flush()
    except FormatError as exc:
        result.failure = f"Could not open '{filename}': {exc}"
        result.check_errors += 1
    finally:
        await file.close()
    return fixed, result


async def _check_copied(file: FileNode, header: Header, refcounts: Refcounts, result: CheckResult, fix: bool) -> bool:
    """COPIED must be set exactly where the refcount is 1 (qemu's check_oflag_copied)."""
    cs = header.cluster_size
    l1 = table_from_bytes(await _read(file, header.l1_table_offset, header.l1_size * 8))
    fixed = False
    l1_changed = False
    step = 2 if header.extended_l2 else 1
    for index, entry in enumerate(l1):
        l2_offset = entry & OFFSET_MASK
        if not l2_offset or l2_offset % cs:
            continue
        count = await refcounts.get(l2_offset // cs)
        if (count == 1) != bool(entry & OFLAG_COPIED):
            result.messages.append(
                f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} "
                f"refcount={count}"
            )
            if fix:
                l1[index] = entry | OFLAG_COPIED if count == 1 else entry & ~OFLAG_COPIED
                l1_changed = True
                result.corruptions_fixed += 1
                fixed = True
            else:
                result.corruptions += 1
        table = table_from_bytes(await _read(file, l2_offset, cs))
        changed = False
        for i in range(0, len(table), step):
            l2_entry = table[i]
            if l2_entry & OFLAG_COMPRESSED or not l2_entry & OFFSET_MASK:
                continue
            if (l2_entry & OFFSET_MASK) % cs:
                continue
            count = await refcounts.get((l2_entry & OFFSET_MASK) // cs)
            if (count == 1) != bool(l2_entry & OFLAG_COPIED):
                result.messages.append(
                    f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED data cluster: "
                    f"l2_entry={l2_entry:x} refcount={count}"
                )
                if fix:
                    table[i] = l2_entry | OFLAG_COPIED if count == 1 else l2_entry & ~OFLAG_COPIED
                    changed = True
                    result.corruptions_fixed += 1
                    fixed = True
                else:
                    result.corruptions += 1
        if changed:
            await file.write(l2_offset, table_to_bytes(table))
    if l1_changed:
        await file.flush()
        await file.write(header.l1_table_offset, table_to_bytes(l1))
    return fixed


async def _read(file: FileNode, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    if length:
        await file.read_into(offset, memoryview(buf))
    return bytes(buf)


async def _rebuild(file: FileNode, header: Header, walk: _Walk) -> None:
    """New refcount table and blocks from the computed counts, after everything else in the file."""
    cs = header.cluster_size
    bits = header.refcount_bits
    per_block = cs * 8 // bits
    counts = walk.counter
    for cluster in walk.refcount_structure:  # the old structure is dropped with the switch
        if cluster < len(counts):
            counts.counts[cluster] = max(0, counts.counts[cluster] - 1)
    start = max(len(counts), walk.file_clusters)
    blocks, table_clusters = 1, 1
    while True:
        end = start + blocks + table_clusters
        need_blocks = (end + per_block - 1) // per_block
        need_table = (need_blocks * 8 + cs - 1) // cs
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    counts.add(start, blocks + table_clusters)
    table = array("Q", bytes(table_clusters * cs))
    for b in range(blocks):
        blk = new_block(per_block, bits)
        for c in range(b * per_block, min(len(counts), (b + 1) * per_block)):
            blk[c - b * per_block] = counts.counts[c]
        offset = (start + b) * cs
        await file.write(offset, encode_block(blk, bits))
        table[b] = offset
    table_offset = (start + blocks) * cs
    await file.write(table_offset, table_to_bytes(table))
    await file.flush()
    await file.write(48, struct.pack(">QI", table_offset, table_clusters))
    await file.flush()
    header.refcount_table_offset = table_offset
    header.refcount_table_clusters = table_clusters


async def check_image(filename: str, repair: str | None = None) -> CheckResult:
    """Check (and with ``repair`` = "leaks" or "all", repair) a qcow2 image, as qemu-img check.

    The caller holds the image's locks (``pynbd img check`` opens the file through
    :mod:`pynbd.daemon.open` first, a read-write open its qcow2 node); the passes here read and
    write the file through descriptors of their own, which take no locks."""
    first = CheckResult(filename)
    fixed, first = await _check_pass(filename, repair, first)
    if first.failure:
        return first
    repaired_bitmaps: list[str] = []
    if repair == REPAIR_ALL and first.in_use_bitmaps and not first.corruptions and not first.check_errors:
        repaired_bitmaps = await _repair_bitmaps(filename)
        first.messages += [f"Repairing bitmap '{name}': stored fully dirty" for name in repaired_bitmaps]
    if not fixed and not repaired_bitmaps:
        for name in first.in_use_bitmaps:
            first.messages.append(
                f"Warning: bitmap '{name}' is in use (not saved after its last change); "
                "it loads fully dirty; 'check -r all' stores it back that way"
            )
        return first
    final = CheckResult(filename)
    _, final = await _check_pass(filename, None, final)
    final.messages = first.messages + final.messages
    final.corruptions_fixed = first.corruptions_fixed
    final.leaks_fixed = first.leaks_fixed
    if repair == REPAIR_ALL and not (final.corruptions or final.check_errors):
        await _mark_consistent(filename)
    return final


async def _mark_consistent(filename: str) -> None:
    """After a successful full repair, clear the dirty and corrupt bits (as qemu does)."""
    file = FileNode(filename)
    try:
        header = await read_header(file)
        bits = header.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        if header.version >= 3 and bits != header.incompatible_features:
            await file.write(72, struct.pack(">Q", bits))
            await file.flush()
    finally:
        await file.close()


async def _repair_bitmaps(filename: str) -> list[str]:
    """Open read-write (IN_USE bitmaps load fully dirty) and close (they are stored consistent)."""
    from pynbd.daemon.open import open_image

    image = await open_image(filename, "qcow2", read_only=False, backing=False, locking=False)
    try:
        assert isinstance(image.node, Qcow2Node)  # opened with format qcow2
        return sorted(image.node.bitmaps_found_in_use)
    finally:
        await image.close()


def unsupported(fmt: str) -> BlockError:
    return BlockError(errno.ENOTSUP, f"This image format ({fmt}) does not support checks")
