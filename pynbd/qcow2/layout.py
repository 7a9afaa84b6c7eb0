"""qcow2 on-disk structures: header, header extensions, table entries, compressed descriptors.

Pure encode/decode, no I/O, so the node, ``create``, ``check`` and the tests share one reading of
docs/interop/qcow2.txt. All integers on disk are big-endian; tables are held in memory as
``array('Q')`` in host order (one C-level byteswap on load and store, no per-entry Python work).
"""

from __future__ import annotations

import errno
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass, field

from pynbd.errors import BlockError

MAGIC = b"QFI\xfb"

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# table entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF
L2E_RESERVED = 0x3F000000000001FE
REFT_RESERVED = 0x1FF

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
QEMU_HEADER_LENGTH = 112  # v3 with the compression_type byte, padded to 8

# Sanity limits, qemu's (block/qcow2.h): a header may name tables of any size, and everything
# proportional to them is allocated, so each is checked before anything is read.
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE: enough for 2 PiB at 64 KiB clusters
MAX_REFTABLE_BYTES = 8 << 20  # QCOW_MAX_REFTABLE_SIZE: likewise
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
SNAPSHOT_HEADER_SIZE = 40  # sizeof(QCowSnapshotHeader)
MAX_SNAPSHOTS_BYTES = 1024 * MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE: 1 KiB a snapshot on average
MAX_SNAPSHOT_EXTRA_DATA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")

# The feature name table qemu-img writes, so that tools that do not know a bit can name it.
FEATURE_NAMES = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


class FormatError(BlockError, ValueError):
    """The file is not a qcow2 image this driver can open (the message says why, in qemu's words
    where qemu has them). EINVAL unless it says otherwise (EFBIG for a table over its limit,
    ENOTSUP for a feature pynbd lacks), as qemu's qcow2_do_open returns them."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(err, message)


class CompressedClusterError(ValueError):
    """A compressed cluster's data does not decompress to exactly one cluster."""


@dataclass
class Extension:
    type: int
    data: bytes


@dataclass
class Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = QEMU_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    #: header bytes after compression_type up to header_length (future fields), kept verbatim
    tail: bytes = b""
    extensions: list[Extension] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    def extension(self, ext_type: int) -> Extension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (or add, or with ``None`` remove) one extension, keeping the others in order."""
        for i, ext in enumerate(self.extensions):
            if ext.type == ext_type:
                if data is None:
                    del self.extensions[i]
                else:
                    ext.data = data
                return
        if data is not None:
            self.extensions.append(Extension(ext_type, data))

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(EXT_BACKING_FORMAT)
        return ext.data.decode(errors="replace") if ext else None

    def encode(self, cluster_size: int | None = None) -> bytes:
        """The whole first-cluster content: header, extensions, end marker, backing file name."""
        fixed = _V2.pack(
            MAGIC,
            self.version,
            0,
            0,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version >= 3:
            v3 = _V3.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            )
            extra = b""
            if self.header_length > V3_HEADER_LENGTH:
                extra = (bytes([self.compression_type]) + self.tail).ljust(self.header_length - V3_HEADER_LENGTH, b"\0")
            head = bytearray(fixed + v3 + extra)
        else:
            head = bytearray(fixed)
        for ext in self.extensions:
            head += _EXT.pack(ext.type, len(ext.data)) + ext.data + bytes(-len(ext.data) % 8)
        head += _EXT.pack(EXT_END, 0)
        if self.backing_file is not None:
            name = self.backing_file.encode()
            if len(name) > MAX_BACKING_NAME:
                raise FormatError("backing file name longer than 1023 bytes")
            struct.pack_into(">QI", head, 8, len(head), len(name))
            head += name
        limit = cluster_size or self.cluster_size
        if len(head) > limit:
            raise FormatError(f"header and extensions ({len(head)} bytes) do not fit in the first cluster")
        return bytes(head)


def decode_header(buf: bytes | bytearray) -> Header:
    """Parse the first cluster (or as much of it as the file has: the rest reads as zeroes).
    Raises FormatError.

    Every size a header gives is checked before it is used, with qemu's qcow2_do_open checks and
    messages: the cluster size, the header length (within the first cluster), the header
    extensions (each within the area before the backing file name) and the backing file name
    (at most 1023 bytes, within the first cluster). Nothing here allocates more than ``buf``."""
    if len(buf) < _V2.size or buf[:4] != MAGIC:
        raise FormatError("Image is not in qcow2 format")
    (
        _,
        version,
        backing_off,
        backing_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
    ) = _V2.unpack_from(buf)
    if version not in (2, 3):
        raise FormatError(f"Unsupported qcow2 version {version}", errno.ENOTSUP)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    h = Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_off,
        refcount_table_offset=rt_off,
        refcount_table_clusters=rt_clusters,
        backing_file_offset=backing_off,
        backing_file_size=backing_size,
        crypt_method=crypt,
        nb_snapshots=nb_snap,
        snapshots_offset=snap_off,
    )
    if version >= 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise FormatError("qcow2 header too short")
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order, h.header_length) = (
            _V3.unpack_from(buf, _V2.size)
        )
        if h.header_length < V3_HEADER_LENGTH:
            raise FormatError("qcow2 header too short")
        if h.header_length > cluster_size:
            raise FormatError("qcow2 header exceeds cluster size")
        if h.header_length % 8:
            raise FormatError(f"invalid header length {h.header_length}")
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = buf[V3_HEADER_LENGTH] if len(buf) > V3_HEADER_LENGTH else 0
            h.tail = bytes(buf[V3_HEADER_LENGTH + 1 : h.header_length]).rstrip(b"\0")
        else:
            h.compression_type = COMPRESSION_ZLIB
    else:
        h.header_length = V2_HEADER_LENGTH
        h.refcount_order = 4
    if h.backing_file_offset > cluster_size:
        raise FormatError("Invalid backing file offset")
    if h.refcount_order > 6:
        raise FormatError("Reference count entry width too large; may not exceed 64 bits")
    # Extensions lie between the header and the backing file name (or the end of the cluster).
    # A file shorter than a cluster reads as zeroes past its end, as qemu reads it.
    if len(buf) < cluster_size:
        buf = bytes(buf) + bytes(cluster_size - len(buf))
    ext_end = h.backing_file_offset or cluster_size
    pos = h.header_length
    while pos < ext_end:
        if pos + 8 > ext_end:
            raise FormatError("Header extension too large")
        ext_type, length = _EXT.unpack_from(buf, pos)
        pos += 8
        if length > ext_end - pos:
            raise FormatError("Header extension too large")
        if ext_type == EXT_END:
            break
        h.extensions.append(Extension(ext_type, bytes(buf[pos : pos + length])))
        pos += length + (-length % 8)
    if h.backing_file_offset:
        if h.backing_file_size > min(MAX_BACKING_NAME, cluster_size - h.backing_file_offset):
            raise FormatError("Backing file name too long")
        raw = bytes(buf[h.backing_file_offset : h.backing_file_offset + h.backing_file_size])
        h.backing_file = raw.decode(errors="surrogateescape")
    return h


def feature_table() -> bytes:
    return b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_NAMES)


def validate_table(
    offset: int, entries: int, entry_size: int, max_bytes: int, name: str, cluster_size: int, file_size: int
) -> None:
    """qemu's qcow2_validate_table, then one check of pynbd's own: the table lies in the file.

    qemu reads a table that runs past the end of the file as zeroes; no writer makes such an
    image, and a crafted header could then make pynbd read (and hold) up to the cap from a file of
    a few clusters, so pynbd refuses it instead."""
    if entries > max_bytes // entry_size:
        raise FormatError(f"{name} too large", errno.EFBIG)
    length = entries * entry_size
    if INT64_MAX - length < offset or offset % cluster_size:
        raise FormatError(f"{name} offset invalid")
    if length and offset + length > file_size:
        raise FormatError(f"{name} lies past the end of the file ({offset:#x}+{length:#x} > {file_size:#x})")


def check_openable(h: Header, file_size: int) -> None:
    """Refuse what this driver cannot read, with the reason (qemu's wording where it has one).

    The tables the header names are checked against qemu's caps and against the file's size
    before anything proportional to them is allocated: opening any crafted header takes bounded
    memory (the L1 table at most 32 MiB, the refcount table 8 MiB, and never more than the file)."""
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise FormatError(f"Unsupported qcow2 feature(s): incompatible feature bits {unknown:#x}", errno.ENOTSUP)
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        raise FormatError("qcow2 images with an external data file are not supported", errno.ENOTSUP)
    if h.crypt_method:
        raise FormatError("encrypted qcow2 images are not supported", errno.ENOTSUP)
    if h.compression_type not in COMPRESSION_NAMES:
        raise FormatError(f"unknown compression type {h.compression_type}", errno.ENOTSUP)
    if bool(h.incompatible_features & INCOMPAT_COMPRESSION) != (h.compression_type != COMPRESSION_ZLIB):
        raise FormatError("compression type field and incompatible feature bit disagree")
    if h.extended_l2 and h.cluster_bits < 14:
        raise FormatError("extended L2 entries need clusters of at least 16 KiB")
    cs = h.cluster_size
    if h.refcount_table_clusters == 0:
        raise FormatError("Image does not contain a reference count table")
    reftable = h.refcount_table_offset, h.refcount_table_clusters
    validate_table(*reftable, cs, MAX_REFTABLE_BYTES, "Reference count table", cs, file_size)
    if h.refcount_table_offset == 0:  # qemu only finds out when it writes over the header
        raise FormatError("Reference count table overlaps the image header")
    # the size of each entry is known only once read (read_snapshot_table checks the rest)
    validate_table(
        h.snapshots_offset,
        h.nb_snapshots,
        SNAPSHOT_HEADER_SIZE,
        SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
        "Snapshot table",
        cs,
        file_size,
    )
    validate_table(h.l1_table_offset, h.l1_size, 8, MAX_L1_BYTES, "Active L1 table", cs, file_size)
    if h.l1_size and h.l1_table_offset == 0:
        raise FormatError("Active L1 table overlaps the image header")
    needed = l1_entries_needed(h.size, h.cluster_bits, h.l2_entries)
    if needed > INT_MAX:
        raise FormatError("Image is too big", errno.EFBIG)
    if h.l1_size < needed:
        raise FormatError("L1 table is too small")


def check_table_entries(h: Header, l1: array, reftable: array, file_size: int, writable: bool) -> None:
    """Refuse refcount blocks and L2 tables that overlap the header, the L1 table or the refcount
    table, and (``writable``) refcount blocks outside the file, which would count in-use clusters
    as free.

    qemu opens such images and catches the overlap when it is about to write over metadata
    (its overlap checks); pynbd has no check on the write path, so it refuses them here, before a
    write could allocate clusters over metadata or count refcounts in the L1 table. One pass over
    the non-zero entries: bounded by the table sizes check_openable allows."""
    cs = h.cluster_size
    metadata = (
        (0, cs, "image header"),
        (h.l1_table_offset, h.l1_table_offset + h.l1_size * 8, "active L1 table"),
        (h.refcount_table_offset, h.refcount_table_offset + h.refcount_table_clusters * cs, "refcount table"),
    )

    def overlap(offset: int) -> str | None:
        for start, end, what in metadata:
            if offset < end and start < offset + cs:
                return what
        return None

    for index, entry in enumerate(reftable):
        offset = entry & ~REFT_RESERVED
        if not offset:
            continue
        what = overlap(offset)
        if what is not None:
            raise FormatError(f"Refcount block {index} at {offset:#x} overlaps the {what}")
        if writable and offset + cs > file_size:
            raise FormatError(f"Refcount block {index} at {offset:#x} lies past the end of the file")
    for index, entry in enumerate(l1):
        offset = entry & OFFSET_MASK
        if offset:
            what = overlap(offset)
            if what is not None:
                raise FormatError(f"L2 table {index} at {offset:#x} overlaps the {what}")


def l1_entries_needed(size: int, cluster_bits: int, l2_entries: int) -> int:
    span = l2_entries << cluster_bits
    return (size + span - 1) // span


# -- internal snapshots ----------------------------------------------------------------------------

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # QCowSnapshotHeader
assert SNAPSHOT_HEADER.size == SNAPSHOT_HEADER_SIZE


@dataclass
class Snapshot:
    """One entry of the internal snapshot table (only what pynbd uses: it reads images that have
    snapshots, and ``check`` counts their tables, but never reverts to one)."""

    offset: int  # where the entry starts in the file
    length: int  # its bytes, padding to 8 excluded
    l1_table_offset: int
    l1_size: int
    id: str
    name: str


# -- tables --------------------------------------------------------------------------------------

_NATIVE_LITTLE = sys.byteorder == "little"


def table_from_bytes(data: bytes | bytearray | memoryview, typecode: str = "Q") -> array:
    """Big-endian on-disk integers into a host-order array."""
    table = array(typecode)
    table.frombytes(bytes(data))
    if _NATIVE_LITTLE and table.itemsize > 1:
        table.byteswap()
    return table


def table_to_bytes(table: array) -> bytes:
    if _NATIVE_LITTLE and table.itemsize > 1:
        swapped = array(table.typecode, table)
        swapped.byteswap()
        return swapped.tobytes()
    return table.tobytes()


# -- compressed clusters ---------------------------------------------------------------------------


def compressed_location(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, byte length) of a compressed cluster's data, as qemu computes them."""
    shift = 62 - (cluster_bits - 8)
    offset = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, sectors * 512 - (offset & 511)


def compressed_entry(host_offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of compressed data at ``host_offset`` spanning ``length`` bytes."""
    shift = 62 - (cluster_bits - 8)
    sectors = (host_offset + length - 1) // 512 - host_offset // 512
    return OFLAG_COMPRESSED | (sectors << shift) | host_offset


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """One cluster from compressed data that may be followed by padding or another cluster's data.

    Memory stays within one cluster whatever the data says: a stream that would inflate to more
    than a cluster raises CompressedClusterError (so does one that inflates to less). qemu's zstd
    reader refuses such a stream too; its zlib reader keeps the first cluster and ignores the rest,
    but no qcow2 writer makes one, and pynbd treats both formats alike."""
    if compression_type == COMPRESSION_ZLIB:
        inflater = zlib.decompressobj(-15)
        out = inflater.decompress(data, cluster_size)
        if len(out) == cluster_size and not inflater.eof:
            try:
                more = inflater.decompress(inflater.unconsumed_tail, 1)
            except zlib.error:  # what follows the cluster's stream is not ours to judge (as qemu)
                more = b""
            if more:
                raise CompressedClusterError("inflates to more than a cluster")
    elif compression_type == COMPRESSION_ZSTD:
        out = _zstd_cluster(data, cluster_size)
    else:
        raise FormatError(f"unknown compression type {compression_type}", errno.ENOTSUP)
    if len(out) != cluster_size:
        raise CompressedClusterError(f"decompressed to {len(out)} bytes, not {cluster_size}")
    return out


#: input fed to a zstd decoder at a time when the frame does not say its size: a block header of
#: 3 bytes can stand for 128 KiB (an RLE block), so 64 bytes inflate to 2.7 MiB at most
_ZSTD_STEP = 64


def _zstd_cluster(data: bytes, cluster_size: int) -> bytes:
    import zstandard  # only images that say zstd need it

    # A frame that states its size is decoded in one go into that much (qemu's frames say it);
    # the decoder would allocate whatever it says, so it is checked first. A frame that does not
    # say is fed a little at a time, and given up as soon as it passes a cluster.
    declared = zstandard.get_frame_parameters(data).content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN:
        if declared > cluster_size:
            raise CompressedClusterError("inflates to more than a cluster")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=cluster_size)
    decoder = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    for start in range(0, len(data), _ZSTD_STEP):
        out += decoder.decompress(data[start : start + _ZSTD_STEP])
        if len(out) > cluster_size:
            raise CompressedClusterError("inflates to more than a cluster")
        if decoder.eof:
            break
    return bytes(out)


def compress(data: bytes, compression_type: int) -> bytes:
    """Compress one cluster as qemu does (raw deflate with a 4 KiB window, or one zstd frame)."""
    if compression_type == COMPRESSION_ZLIB:
        z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return z.compress(data) + z.flush()
    import zstandard

    return zstandard.ZstdCompressor().compress(data)
