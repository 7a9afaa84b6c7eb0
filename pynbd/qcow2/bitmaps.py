"""The qcow2 bitmaps extension: directory entries, bitmap tables and loading bitmap data.

Storing lives in the node (it allocates clusters); this module is the format and its rules. The
validation mirrors qemu's ``check_dir_entry``: an image whose directory qemu would refuse is
refused here too, so that an image pynbd accepts is one qemu accepts.
"""

from __future__ import annotations

import errno
import struct
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynbd.bitmap import DirtyBitmap

if TYPE_CHECKING:
    from pynbd.nodes.base import Storage
from pynbd.qcow2.layout import FormatError, table_from_bytes

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_NAME = 1023
MAX_DIRECTORY = 1024 * MAX_BITMAPS  # QCOW2_MAX_BITMAP_DIRECTORY_SIZE
MAX_TABLE_ENTRIES = 0x8000000  # BME_MAX_TABLE_SIZE
MAX_PHYS_BYTES = 0x20000000  # BME_MAX_PHYS_SIZE: the data of one bitmap, 512 MiB
#: pynbd's own: what all the bitmaps of one image may take in memory (their bits and tables).
#: qemu has no such limit, but it allocates bitmaps it cannot trust without touching them;
#: pynbd loads those fully dirty, so a crafted directory could otherwise ask for any amount.
MAX_MEMORY = 1 << 30
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
BME_TABLE_ENTRY_RESERVED = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_ALL_ONES = 1

_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")


@dataclass
class Extension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    def encode(self) -> bytes:
        return _EXT.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)

    @classmethod
    def decode(cls, data: bytes, cluster_size: int) -> Extension:
        """The extension's fields, with qemu's checks and words (qcow2_read_extensions)."""
        if len(data) != _EXT.size:
            raise FormatError("bitmaps_ext: Invalid extension length")
        nb, reserved, size, offset = _EXT.unpack_from(data)
        if reserved:
            raise FormatError("bitmaps_ext: Reserved field is not zero")
        if nb > MAX_BITMAPS:
            raise FormatError(
                f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
            )
        if nb == 0:
            raise FormatError("found bitmaps extension with zero bitmaps")
        if offset % cluster_size:
            raise FormatError("bitmaps_ext: invalid bitmap directory offset")
        if size > MAX_DIRECTORY:
            raise FormatError(
                f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size ({MAX_DIRECTORY})"
            )
        return cls(nb, size, offset)

    def check_in_file(self, file_size: int) -> None:
        """pynbd's own check: qemu reads a directory past the end of the file as zeroes."""
        if self.directory_offset + self.directory_size > file_size:
            raise FormatError(
                f"bitmap directory lies past the end of the file "
                f"({self.directory_offset:#x}+{self.directory_size:#x} > {file_size:#x})"
            )


@dataclass
class DirEntry:
    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    def memory(self, disk_size: int) -> int:
        """Bytes it takes in memory once loaded: its bits over the disk, and its table."""
        return (DirtyBitmap.cluster_count(disk_size, self.granularity) + 7) // 8 + self.table_size * 8

    def flag_names(self) -> list[str]:
        """qemu's Qcow2BitmapInfoFlags, in its order."""
        return [name for bit, name in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if self.flags & bit]

    def encode(self) -> bytes:
        name = self.name.encode()
        body = (
            _ENTRY.pack(
                self.table_offset,
                self.table_size,
                self.flags,
                self.type,
                self.granularity_bits,
                len(name),
                len(self.extra_data),
            )
            + self.extra_data
            + name
        )
        return body + bytes(-len(body) % 8)


def table_entries_needed(disk_size: int, granularity: int, cluster_size: int) -> int:
    """Bitmap table length for a disk: one entry per cluster of serialised bitmap data."""
    bits = (disk_size + granularity - 1) // granularity
    data_bytes = (bits + 7) // 8
    return (data_bytes + cluster_size - 1) // cluster_size


def decode_directory(data: bytes | bytearray, nb_bitmaps: int) -> list[DirEntry]:
    entries: list[DirEntry] = []
    pos = 0
    for _ in range(nb_bitmaps):
        if pos + _ENTRY.size > len(data):
            raise FormatError("bitmap directory is truncated")
        table_offset, table_size, flags, typ, gbits, name_size, extra_size = _ENTRY.unpack_from(data, pos)
        start = pos + _ENTRY.size
        end = start + extra_size + name_size
        if end > len(data):
            raise FormatError("bitmap directory entry runs past the directory")
        extra = bytes(data[start : start + extra_size])
        name = bytes(data[start + extra_size : end]).decode(errors="surrogateescape")
        entries.append(DirEntry(name, table_offset, table_size, flags, gbits, typ, extra))
        pos = end + (-end % 8)
    if pos != len(data):
        raise FormatError("bitmap directory size does not match its entries")
    return entries


def encode_directory(entries: list[DirEntry]) -> bytes:
    return b"".join(entry.encode() for entry in entries)


def check_entry(entry: DirEntry, disk_size: int, cluster_size: int, file_size: int) -> None:
    """qemu's constraints (check_dir_entry); a violation makes qemu refuse the whole image, so it
    does here too. Then pynbd's own: the table lies in the file, and the bitmap's bits fit in as
    much memory as qemu allows a stored bitmap (an IN_USE one too: pynbd loads it fully dirty)."""
    problem = None
    if entry.flags & ~FLAGS_KNOWN:
        problem = "unknown flags"
    elif entry.extra_data:
        problem = "extra data"
    elif entry.type != TYPE_DIRTY_TRACKING:
        problem = "unknown type"
    elif not entry.table_offset or entry.table_offset % cluster_size:
        problem = "bad table offset"
    elif not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS:
        problem = "bad granularity"
    elif not entry.name or len(entry.name.encode(errors="surrogateescape")) > MAX_NAME:
        problem = "bad name"
    elif entry.table_size == 0:
        problem = "empty table"
    elif entry.table_size > MAX_TABLE_ENTRIES or entry.table_size * cluster_size > MAX_PHYS_BYTES:
        problem = "table too large"
    elif not entry.in_use and entry.table_size < table_entries_needed(disk_size, entry.granularity, cluster_size):
        problem = "table too small for the disk"
    elif entry.table_offset + entry.table_size * 8 > file_size:
        problem = "table outside the file"
    elif DirtyBitmap.cluster_count(disk_size, entry.granularity) > MAX_PHYS_BYTES * 8:
        problem = "too large for memory"
    if problem:
        raise FormatError(f"Bitmap '{entry.name}' doesn't satisfy the constraints ({problem})")


def check_directory(entries: list[DirEntry], disk_size: int, cluster_size: int, file_size: int) -> None:
    """Every entry's constraints, unique names, and all of them together within MAX_MEMORY: all
    before any table or bit is read or allocated."""
    names: set[str] = set()
    total = 0
    for entry in entries:
        check_entry(entry, disk_size, cluster_size, file_size)
        if entry.name in names:
            raise FormatError(f"Bitmap '{entry.name}' appears twice in the directory")
        names.add(entry.name)
        total += entry.memory(disk_size)
        if total > MAX_MEMORY:
            raise FormatError(
                f"the image's bitmaps would take more than {MAX_MEMORY >> 20} MiB of memory "
                f"({len(names)} of {len(entries)} bitmaps already do)",
                errno.EFBIG,
            )


async def read_table(file: Storage, entry: DirEntry) -> array:
    buf = bytearray(entry.table_size * 8)
    await file.read_into(entry.table_offset, memoryview(buf))
    table = table_from_bytes(buf)
    for value in table:
        if value & BME_TABLE_ENTRY_RESERVED:
            raise FormatError(f"bitmap '{entry.name}' has a corrupt table entry {value:#x}")
    return table


def table_clusters(table: array, cluster_size: int) -> list[int]:
    """Cluster indices of the data clusters a bitmap table names."""
    return [(value & BME_TABLE_ENTRY_OFFSET) // cluster_size for value in table if value & BME_TABLE_ENTRY_OFFSET]


async def load_data(file: Storage, entry: DirEntry, table: array, disk_size: int, cluster_size: int) -> DirtyBitmap:
    """The bitmap's bits from its data clusters (all-zero and all-ones entries need no cluster);
    only the clusters that hold bits of the disk are read, however long the table is."""
    nbytes = (DirtyBitmap.cluster_count(disk_size, entry.granularity) + 7) // 8
    needed = (nbytes + cluster_size - 1) // cluster_size
    data = bytearray(needed * cluster_size)
    ones = b"\xff" * cluster_size
    for i, value in enumerate(table[:needed]):
        offset = value & BME_TABLE_ENTRY_OFFSET
        where = memoryview(data)[i * cluster_size : (i + 1) * cluster_size]
        if offset:
            await file.read_into(offset, where)
        elif value & BME_TABLE_ENTRY_ALL_ONES:
            where[:] = ones
    return DirtyBitmap.from_bytes(disk_size, entry.granularity, bytes(data[:nbytes]))
