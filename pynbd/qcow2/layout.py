"""qcow2 on-disk structures: header, header extensions, table entries, compressed descriptors.

Pure encode/decode, no I/O, so the node, ``create``, ``check`` and the tests share one reading of
docs/interop/qcow2.txt. All integers on disk are big-endian; tables are held in memory as
``array('Q')`` in host order (one C-level byteswap on load and store, no per-entry Python work).
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from dataclasses import dataclass, field

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


class FormatError(ValueError):
    """The file is not a qcow2 image this driver can open (the message says why)."""


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


def decode_header(buf: bytes) -> Header:
    """Parse the first cluster (or at least the header and its extensions). Raises FormatError."""
    if len(buf) < _V2.size or buf[:4] != MAGIC:
        raise FormatError("not a qcow2 image (bad magic)")
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
        raise FormatError(f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"unsupported cluster size 2^{cluster_bits} (512 B to 2 MiB)")
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
            raise FormatError("truncated qcow2 v3 header")
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order, h.header_length) = (
            _V3.unpack_from(buf, _V2.size)
        )
        if h.header_length < V3_HEADER_LENGTH or h.header_length % 8:
            raise FormatError(f"invalid header length {h.header_length}")
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = buf[V3_HEADER_LENGTH]
            h.tail = bytes(buf[V3_HEADER_LENGTH + 1 : h.header_length]).rstrip(b"\0")
        else:
            h.compression_type = COMPRESSION_ZLIB
    else:
        h.header_length = V2_HEADER_LENGTH
        h.refcount_order = 4
    if h.refcount_order > 6:
        raise FormatError(f"invalid refcount order {h.refcount_order}")
    pos = h.header_length
    while True:
        if pos + 8 > len(buf):
            raise FormatError("header extensions run past the first cluster")
        ext_type, length = _EXT.unpack_from(buf, pos)
        pos += 8
        if ext_type == EXT_END:
            break
        if pos + length > len(buf):
            raise FormatError(f"header extension {ext_type:#x} runs past the first cluster")
        h.extensions.append(Extension(ext_type, bytes(buf[pos : pos + length])))
        pos += length + (-length % 8)
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_offset + h.backing_file_size > len(buf):
            raise FormatError("backing file name is too long or outside the first cluster")
        raw = bytes(buf[h.backing_file_offset : h.backing_file_offset + h.backing_file_size])
        h.backing_file = raw.decode(errors="surrogateescape")
    return h


def feature_table() -> bytes:
    return b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_NAMES)


def check_openable(h: Header) -> None:
    """Refuse what this driver cannot read, with the reason (qemu's wording where it has one)."""
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise FormatError(f"unsupported qcow2 incompatible feature bits {unknown:#x}")
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        raise FormatError("qcow2 images with an external data file are not supported")
    if h.crypt_method:
        raise FormatError("encrypted qcow2 images are not supported")
    if h.compression_type not in COMPRESSION_NAMES:
        raise FormatError(f"unknown compression type {h.compression_type}")
    if bool(h.incompatible_features & INCOMPAT_COMPRESSION) != (h.compression_type != COMPRESSION_ZLIB):
        raise FormatError("compression type field and incompatible feature bit disagree")
    if h.extended_l2 and h.cluster_bits < 14:
        raise FormatError("extended L2 entries need clusters of at least 16 KiB")
    cs = h.cluster_size
    for name, off in (("L1 table", h.l1_table_offset), ("refcount table", h.refcount_table_offset)):
        if off % cs or not off:
            raise FormatError(f"{name} offset {off:#x} is invalid")
    if h.refcount_table_clusters == 0:
        raise FormatError("image has no refcount table")
    if h.l1_size < l1_entries_needed(h.size, h.cluster_bits, h.l2_entries):
        raise FormatError("L1 table is too small")


def l1_entries_needed(size: int, cluster_bits: int, l2_entries: int) -> int:
    span = l2_entries << cluster_bits
    return (size + span - 1) // span


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
    """One cluster from compressed data that may be followed by padding or another cluster's data."""
    if compression_type == COMPRESSION_ZLIB:
        out = zlib.decompressobj(-15).decompress(data, cluster_size)
    elif compression_type == COMPRESSION_ZSTD:
        import zstandard  # only images that say zstd need it

        out = zstandard.ZstdDecompressor().decompressobj().decompress(data)[:cluster_size]
    else:
        raise FormatError(f"unknown compression type {compression_type}")
    if len(out) != cluster_size:
        raise ValueError(f"compressed cluster decompressed to {len(out)} bytes, not {cluster_size}")
    return out


def compress(data: bytes, compression_type: int) -> bytes:
    """Compress one cluster as qemu does (raw deflate with a 4 KiB window, or one zstd frame)."""
    if compression_type == COMPRESSION_ZLIB:
        z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return z.compress(data) + z.flush()
    import zstandard

    return zstandard.ZstdCompressor().compress(data)
