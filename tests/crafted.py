"""A corpus of hostile qcow2 images, each made from a valid image ``qemu-img`` wrote, by patching
a header field, an extension, a table entry or the compressed data.

Every case says what is wrong with its image, what pynbd must do with it (refuse it when it is
opened, or fail the read of one cluster with EIO), and whether
``qemu-img info`` refuses it too, as recorded from qemu 7.2 (tests/test_hostile_images.py checks
that record against the installed qemu-img, so it cannot go stale). Where qemu accepts an image
pynbd refuses, ``why_stricter`` says why pynbd is right to.

The base images are tiny (1 MiB disks, 64 KiB clusters) and qemu-img's layout of them is fixed:
header in cluster 0, refcount table at 0x10000, its one refcount block at 0x20000, the L1 table at
0x30000, then what was written. The builders nevertheless read the offsets they patch from the
image itself rather than assume them.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.peers import run

MiB = 1 << 20
TiB = 1 << 40
CLUSTER = 65536
DISK = MiB
PATTERN = 0x5A  # what the base image's first cluster holds

# header field offsets (docs/interop/qcow2.txt)
BACKING_FILE_OFFSET = 8
BACKING_FILE_SIZE = 16
CLUSTER_BITS = 20
L1_SIZE = 36
L1_TABLE_OFFSET = 40
REFCOUNT_TABLE_OFFSET = 48
REFCOUNT_TABLE_CLUSTERS = 56
NB_SNAPSHOTS = 60
SNAPSHOTS_OFFSET = 64
HEADER_LENGTH = 100

EXT_BITMAPS = 0x23852875
EXT_END = 0

# what pynbd must do with an image
REFUSED = "refused"  # opening it fails with a clear error (EINVAL-like), every tool alike
READ_EIO = "read-eio"  # it opens; reading the damaged cluster fails with EIO, nothing else does


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # what is wrong with the image
    base: str  # which base image it is made from (see BASES)
    patch: Callable[[Path], None]
    expect: str  # REFUSED or READ_EIO
    message: str  # a piece of pynbd's error message
    qemu_info_refuses: bool  # qemu-img info (no --backing-chain) refuses it too
    why_stricter: str = ""  # where qemu accepts what pynbd refuses: why pynbd is right to refuse
    #: where both refuse: pynbd's message starts with qemu's (it may add the detail qemu leaves out)
    qemu_words: bool = True

    def build(self, bases: dict[str, Path], directory: Path) -> Path:
        path = directory / f"{self.name}.qcow2"
        shutil.copy(bases[self.base], path)
        self.patch(path)
        return path


# -- base images, written by qemu-img -------------------------------------------------------------


def make_bases(directory: Path) -> dict[str, Path]:
    """The valid images every case starts from, each made by qemu-img (and qemu-io)."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / "source.raw"
    raw.write_bytes(bytes([PATTERN]) * CLUSTER + bytes(DISK - CLUSTER))
    bases: dict[str, Path] = {}

    plain = bases["plain"] = directory / "plain.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), str(DISK)])
    run(["qemu-io", "-c", f"write -P {PATTERN} 0 {CLUSTER}", str(plain)])

    bitmap = bases["bitmap"] = directory / "bitmap.qcow2"
    shutil.copy(plain, bitmap)
    run(["qemu-img", "bitmap", "--add", str(bitmap), "b0"])

    snapshot = bases["snapshot"] = directory / "snapshot.qcow2"
    shutil.copy(plain, snapshot)
    run(["qemu-img", "snapshot", "-c", "s1", str(snapshot)])

    for compression in ("zlib", "zstd"):
        packed = bases[compression] = directory / f"{compression}.qcow2"
        run(
            [
                "qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
                "-o", f"compression_type={compression}", str(raw), str(packed),
            ]
        )  # fmt: skip
    return bases


# -- reading and patching -------------------------------------------------------------------------


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def field(path: Path, offset: int, fmt: str) -> int:
    return struct.unpack(fmt, read_at(path, offset, struct.calcsize(fmt)))[0]


def set_field(path: Path, offset: int, fmt: str, value: int) -> None:
    write_at(path, offset, struct.pack(fmt, value))


def setter(offset: int, fmt: str, value: int) -> Callable[[Path], None]:
    return lambda path: set_field(path, offset, fmt, value)


def extensions(path: Path) -> list[tuple[int, int, int]]:
    """(type, data offset, length) of each header extension, in order."""
    pos = field(path, HEADER_LENGTH, ">I")
    found = []
    while True:
        ext_type, length = struct.unpack(">II", read_at(path, pos, 8))
        if ext_type == EXT_END:
            return found
        found.append((ext_type, pos + 8, length))
        pos += 8 + (length + 7) // 8 * 8


def bitmaps_extension(path: Path) -> int:
    """File offset of the bitmaps extension's data (nb_bitmaps, reserved, size, offset)."""
    for ext_type, offset, _ in extensions(path):
        if ext_type == EXT_BITMAPS:
            return offset
    raise AssertionError(f"{path} has no bitmaps extension")


def bitmap_directory(path: Path) -> int:
    return field(path, bitmaps_extension(path) + 16, ">Q")


def l2_table(path: Path) -> int:
    """Offset of the L2 table that maps the first cluster of the disk."""
    return field(path, field(path, L1_TABLE_OFFSET, ">Q"), ">Q") & 0x00FFFFFFFFFFFE00


def refcount_table(path: Path) -> int:
    return field(path, REFCOUNT_TABLE_OFFSET, ">Q")


def snapshot_table(path: Path) -> int:
    return field(path, SNAPSHOTS_OFFSET, ">Q")


# -- compressed clusters --------------------------------------------------------------------------

COMPRESSED = 1 << 62
BOMB = 16 * MiB  # what a crafted compressed cluster inflates to: 256 clusters' worth


def compressed_descriptor(path: Path) -> tuple[int, int]:
    """(file offset of the first cluster's L2 entry, its host offset) in a compressed image."""
    where = l2_table(path)
    entry = field(path, where, ">Q")
    assert entry & COMPRESSED, f"{path}: the first cluster is not compressed"
    shift = 62 - (16 - 8)  # 64 KiB clusters: 8 bits of sector count above the offset
    return where, entry & ((1 << shift) - 1)


def replace_compressed(path: Path, stream: bytes) -> None:
    """Put ``stream`` where the first cluster's compressed data is, and make its descriptor span it."""
    where, host = compressed_descriptor(path)
    shift = 62 - (16 - 8)
    sectors = (host + len(stream) - 1) // 512 - host // 512  # as qemu encodes it: extra sectors
    assert sectors < 256, "the descriptor of a 64 KiB cluster spans at most 128 KiB"
    write_at(path, host, stream)
    set_field(path, where, ">Q", COMPRESSED | (sectors << shift) | host)


def zlib_bomb(path: Path) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -12)  # raw deflate, as qemu writes it
    replace_compressed(path, packer.compress(bytes(BOMB)) + packer.flush())


def zstd_bomb(path: Path, content_size: bool) -> None:
    import zstandard

    packer = zstandard.ZstdCompressor(write_content_size=content_size)
    if content_size:
        stream = packer.compress(bytes(BOMB))
    else:  # a streamed frame says nothing of its size: only decoding it finds out
        writer = packer.compressobj()
        stream = writer.compress(bytes(BOMB)) + writer.flush()
    replace_compressed(path, stream)


# -- the cases ------------------------------------------------------------------------------------


def _bitmap_field(offset_in_extension: int, fmt: str, value: int) -> Callable[[Path], None]:
    return lambda path: set_field(path, bitmaps_extension(path) + offset_in_extension, fmt, value)


def _bitmap_entry_field(offset_in_entry: int, fmt: str, value: int) -> Callable[[Path], None]:
    return lambda path: set_field(path, bitmap_directory(path) + offset_in_entry, fmt, value)


def _bitmap_in_use_huge(path: Path) -> None:
    """Granularity 512 B over a 4 TiB disk: fully dirty, that is 1 GiB of bits in memory."""
    entry = bitmap_directory(path)
    set_field(path, entry + 12, ">I", 1)  # flags: IN_USE
    write_at(path, entry + 17, bytes([9]))  # granularity bits
    set_field(path, 24, ">Q", 4 * TiB)  # the disk size ...
    set_field(path, L1_SIZE, ">I", 1 << 13)  # ... and an L1 table that covers it (its one cluster)


def _extension_length(path: Path) -> None:
    ext_type, data, _ = extensions(path)[0]
    set_field(path, data - 4, ">I", 0xFFFFFFF0)


def _first_extension_type(path: Path) -> int:
    return extensions(path)[0][0]


def _l2_entry(path: Path) -> None:
    set_field(path, l2_table(path), ">Q", (1 << 63) | TiB)  # COPIED, 1 TiB into a 384 KiB file


def _refblock_over_l1(path: Path) -> None:
    set_field(path, refcount_table(path), ">Q", field(path, L1_TABLE_OFFSET, ">Q"))


def _l2_over_refcount_table(path: Path) -> None:
    l1 = field(path, L1_TABLE_OFFSET, ">Q")
    set_field(path, l1, ">Q", (1 << 63) | refcount_table(path))


def _snapshot_extra_data(path: Path) -> None:
    set_field(path, snapshot_table(path) + 36, ">I", 0xFFFFFFFF)


def _snapshot_l1_size(path: Path) -> None:
    set_field(path, snapshot_table(path) + 8, ">I", 0xFFFFFFFF)


def _backing_name_length(path: Path) -> None:
    set_field(path, BACKING_FILE_OFFSET, ">Q", 0x200)
    set_field(path, BACKING_FILE_SIZE, ">I", 2000)


def _backing_offset(path: Path) -> None:
    set_field(path, BACKING_FILE_OFFSET, ">Q", 2 * CLUSTER)
    set_field(path, BACKING_FILE_SIZE, ">I", 8)


L1_OVER_FILE = "the file holds a few clusters; a table past its end would read as zeroes"

CASES = [
    # -- the L1 table
    Case("l1-size-huge", "l1_size 2^28 (a 2 GiB L1 table) in a 384 KiB file", "plain",
         setter(L1_SIZE, ">I", 1 << 28), REFUSED, "Active L1 table too large", True),
    Case("l1-size-past-eof", "l1_size 2^22 (a 32 MiB L1 table: qemu's cap) in a 384 KiB file", "plain",
         setter(L1_SIZE, ">I", 1 << 22), REFUSED, "Active L1 table", False,
         "qemu reads the 32 MiB table, zeroes past the end of the file: an L1 table no writer made, "
         "and 32 MiB of memory per crafted header"),
    Case("l1-offset-past-eof", "l1_table_offset 1 TiB", "plain",
         setter(L1_TABLE_OFFSET, ">Q", TiB), REFUSED, "Active L1 table", False, L1_OVER_FILE),
    Case("l1-offset-unaligned", "l1_table_offset not on a cluster boundary", "plain",
         setter(L1_TABLE_OFFSET, ">Q", 0x30200), REFUSED, "Active L1 table offset invalid", True),
    # -- the refcount table
    Case("refcount-table-huge", "refcount_table_clusters 2^32-1", "plain",
         setter(REFCOUNT_TABLE_CLUSTERS, ">I", 0xFFFFFFFF), REFUSED, "Reference count table too large", True),
    Case("refcount-table-past-eof", "refcount_table_clusters 128 (8 MiB: qemu's cap) in a 384 KiB file", "plain",
         setter(REFCOUNT_TABLE_CLUSTERS, ">I", 128), REFUSED, "Reference count table", False,
         "qemu reads 8 MiB, zeroes past the end of the file (it needs the table only to write)"),
    Case("refcount-offset-unaligned", "refcount_table_offset not on a cluster boundary", "plain",
         setter(REFCOUNT_TABLE_OFFSET, ">Q", 0x10200), REFUSED, "Reference count table offset invalid", True),
    Case("refcount-offset-past-eof", "refcount_table_offset 1 TiB", "plain",
         setter(REFCOUNT_TABLE_OFFSET, ">Q", TiB), REFUSED, "Reference count table", False,
         "qemu needs the refcounts only to write: a table outside the file would count every cluster 0"),
    Case("refcount-table-at-header", "refcount_table_offset 0: the table is the header", "plain",
         setter(REFCOUNT_TABLE_OFFSET, ">Q", 0), REFUSED, "Reference count table", False,
         "the header read as refcount entries: the first write would allocate over metadata"),
    Case("refcount-block-over-l1", "the refcount block is the L1 table's cluster", "plain",
         _refblock_over_l1, REFUSED, "overlaps", False,
         "qemu checks overlaps when it writes; pynbd has no such check, so it refuses the image at open"),
    Case("l2-table-over-refcount-table", "the L2 table is the refcount table's cluster", "plain",
         _l2_over_refcount_table, REFUSED, "overlaps", False,
         "qemu checks overlaps when it writes; pynbd has no such check, so it refuses the image at open"),
    # -- cluster size, header length, extensions, backing file name
    Case("cluster-bits-8", "cluster_bits 8 (256-byte clusters)", "plain",
         setter(CLUSTER_BITS, ">I", 8), REFUSED, "Unsupported cluster size: 2^8", True),
    Case("cluster-bits-22", "cluster_bits 22 (4 MiB clusters)", "plain",
         setter(CLUSTER_BITS, ">I", 22), REFUSED, "Unsupported cluster size: 2^22", True),
    Case("cluster-bits-63", "cluster_bits 63", "plain",
         setter(CLUSTER_BITS, ">I", 63), REFUSED, "Unsupported cluster size: 2^63", True),
    Case("header-length-huge", "header_length 2^32-8", "plain",
         setter(HEADER_LENGTH, ">I", 0xFFFFFFF8), REFUSED, "qcow2 header exceeds cluster size", True),
    Case("header-length-short", "header_length 96 (a v3 header is at least 104 bytes)", "plain",
         setter(HEADER_LENGTH, ">I", 96), REFUSED, "qcow2 header too short", True),
    Case("extension-length-huge", "the first header extension claims 4 GiB", "plain",
         _extension_length, REFUSED, "Header extension too large", True),
    Case("backing-name-too-long", "backing_file_size 2000 (qemu's limit is 1023)", "plain",
         _backing_name_length, REFUSED, "Backing file name too long", True),
    Case("backing-offset-past-cluster", "backing_file_offset past the first cluster", "plain",
         _backing_offset, REFUSED, "Invalid backing file offset", True),
    # -- internal snapshots
    Case("snapshots-huge", "nb_snapshots 2^32-1", "snapshot",
         setter(NB_SNAPSHOTS, ">I", 0xFFFFFFFF), REFUSED, "Snapshot table too large", True),
    Case("snapshots-offset-unaligned", "snapshots_offset not on a cluster boundary", "snapshot",
         setter(SNAPSHOTS_OFFSET, ">Q", 0x10008), REFUSED, "Snapshot table offset invalid", True),
    Case("snapshots-offset-past-eof", "snapshots_offset 1 TiB", "snapshot",
         setter(SNAPSHOTS_OFFSET, ">Q", TiB), REFUSED, "Snapshot table", False,
         "qemu reads the table as zeroes past the end of the file: a snapshot with no name"),
    Case("snapshot-extra-data-huge", "a snapshot claims 4 GiB of extra data", "snapshot",
         _snapshot_extra_data, REFUSED, "Too much extra metadata in snapshot table entry 0", True),
    Case("snapshot-l1-huge", "a snapshot's L1 table of 2^32-1 entries", "snapshot",
         _snapshot_l1_size, REFUSED, "Snapshot L1 table too large", False,
         "qemu checks a snapshot's L1 table when it uses the snapshot; pynbd refuses it up front "
         "(check walks it)"),
    # -- persistent bitmaps
    Case("bitmaps-count-huge", "the bitmaps extension claims 65536 bitmaps", "bitmap",
         _bitmap_field(0, ">I", 65536), REFUSED, "exceeding the QEMU supported maximum of 65535", True),
    Case("bitmap-directory-huge", "a 1 GiB bitmap directory", "bitmap",
         _bitmap_field(8, ">Q", 1 << 30), REFUSED, "bitmap directory size", True),
    Case("bitmap-directory-past-eof", "the bitmap directory 1 TiB into the file", "bitmap",
         _bitmap_field(16, ">Q", TiB), REFUSED, "bitmap directory lies past the end of the file", True,
         qemu_words=False),  # qemu reads zeroes there and refuses the nameless bitmap it finds
    Case("bitmap-table-huge", "a bitmap table of 2^31 entries", "bitmap",
         _bitmap_entry_field(8, ">I", 1 << 31), REFUSED, "doesn't satisfy the constraints", True),
    Case("bitmap-table-past-eof", "a bitmap table 1 TiB into the file", "bitmap",
         _bitmap_entry_field(0, ">Q", TiB), REFUSED, "outside the file", False,
         "qemu reads the table as zeroes past the end of the file (an all-clean bitmap)"),
    Case("bitmap-in-use-huge", "an in-use bitmap of 512-byte granularity over a 4 TiB disk", "bitmap",
         _bitmap_in_use_huge, REFUSED, "doesn't satisfy the constraints", False,
         "qemu allocates in-use bitmaps without touching them; pynbd loads them fully dirty, which "
         "for this one is 1 GiB of memory"),
    # -- data
    Case("zlib-bomb", "a zlib cluster that inflates to 16 MiB", "zlib",
         zlib_bomb, READ_EIO, "inflates to more than a cluster", False,
         "qemu fills the cluster and ignores the rest of the stream; qemu's own zstd reader refuses "
         "the same thing, and no qcow2 writer makes it"),
    Case("zstd-bomb", "a zstd cluster whose frame says 16 MiB", "zstd",
         lambda path: zstd_bomb(path, True), READ_EIO, "inflates to more than a cluster", False),
    Case("zstd-bomb-streamed", "a zstd cluster that inflates to 16 MiB, its size unsaid", "zstd",
         lambda path: zstd_bomb(path, False), READ_EIO, "inflates to more than a cluster", False),
    Case("l2-entry-past-eof", "a data cluster 1 TiB into a 384 KiB file", "plain",
         _l2_entry, READ_EIO, "past the end of the file", False),
]  # fmt: skip

BY_NAME = {case.name: case for case in CASES}


# -- backing chains (refused with ELOOP: a loop, or a chain deeper than pynbd's limit) -------------


def set_backing(path: Path, name: str) -> None:
    """Point an image at a new backing file with qemu-img (unsafe rebase: only the header changes)."""
    run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", name, "-F", "qcow2", str(path)])


def backing_loop(directory: Path, bases: dict[str, Path], length: int) -> Path:
    """A chain of ``length`` images whose last names the first as its backing file (1: itself)."""
    names = [directory / f"loop{length}-{i}.qcow2" for i in range(length)]
    for path in names:
        shutil.copy(bases["plain"], path)
    for i, path in enumerate(names):
        set_backing(path, names[(i + 1) % length].name)
    return names[0]


def deep_chain(directory: Path, bases: dict[str, Path], depth: int) -> Path:
    """``depth`` overlays on the plain base, each backed by the one below: the top is returned.

    The overlays are copies of one qemu-img overlay whose backing file name has a fixed width,
    each patched to name the image below it (qemu-img would take minutes to make hundreds)."""
    directory.mkdir(parents=True, exist_ok=True)
    width = 6
    base = directory / f"{0:0{width}}.qcow2"
    shutil.copy(bases["plain"], base)
    template = directory / "template.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(template)])
    offset, size = field(template, BACKING_FILE_OFFSET, ">Q"), field(template, BACKING_FILE_SIZE, ">I")
    assert read_at(template, offset, size) == base.name.encode()
    data = bytearray(template.read_bytes())
    top = base
    for level in range(1, depth + 1):
        data[offset : offset + size] = f"{level - 1:0{width}}.qcow2".encode()
        top = directory / f"{level:0{width}}.qcow2"
        top.write_bytes(data)
    template.unlink()
    return top
