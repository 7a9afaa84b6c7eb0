"""Creating empty qcow2 and raw images, laid out as ``qemu-img create`` lays them out.

Cluster 0 holds the header, its extensions and the backing file name; then the refcount table,
the refcount blocks that count every metadata cluster, and the (all-empty) L1 table. The file
ends right after the L1 table, so a fresh image is a few clusters long however large its disk.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass

from pynbd.qcow2.layout import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    QEMU_HEADER_LENGTH,
    V2_HEADER_LENGTH,
    Extension,
    Header,
    feature_table,
    l1_entries_needed,
    table_to_bytes,
)
from pynbd.qcow2.refcount import encode_block, new_block

DEFAULT_CLUSTER_SIZE = 65536


@dataclass
class CreateOptions:
    """``-o`` options qemu-img create accepts for qcow2 (the subset that makes sense here)."""

    cluster_size: int = DEFAULT_CLUSTER_SIZE
    refcount_bits: int = 16
    compat: str = "1.1"
    compression_type: str = "zlib"
    lazy_refcounts: bool = False
    extended_l2: bool = False

    def describe(self) -> str:
        """The option part of qemu-img's "Formatting ..." line."""
        return (
            f"cluster_size={self.cluster_size} extended_l2={'on' if self.extended_l2 else 'off'} "
            f"compression_type={self.compression_type}"
        )


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b


def create_qcow2(
    path: str,
    size: int,
    options: CreateOptions | None = None,
    backing_file: str | None = None,
    backing_format: str | None = None,
) -> Header:
    options = options or CreateOptions()
    cs = options.cluster_size
    bits = cs.bit_length() - 1
    if cs != 1 << bits or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise ValueError("Cluster size must be a power of two between 512 and 2048k")
    if size % 512:
        raise ValueError("Image size must be a multiple of 512 bytes")
    if options.refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError("Refcount width must be a power of two and may not exceed 64 bits")
    if options.extended_l2:
        raise ValueError("extended L2 entries are not supported by pynbd")
    compression = {name: code for code, name in COMPRESSION_NAMES.items()}.get(options.compression_type)
    if compression is None:
        raise ValueError(f"Unknown compression type '{options.compression_type}'")
    version = {"1.1": 3, "v3": 3, "0.10": 2, "v2": 2}.get(options.compat)
    if version is None:
        raise ValueError(f"Invalid compatibility level: '{options.compat}'")
    if version == 2 and (options.refcount_bits != 16 or compression != COMPRESSION_ZLIB or options.lazy_refcounts):
        raise ValueError("compat=0.10 supports only 16-bit refcounts, zlib compression and no lazy refcounts")

    l2_entries = cs // 8
    l1_size = l1_entries_needed(size, bits, l2_entries)
    l1_clusters = max(1, _ceil(l1_size * 8, cs))
    per_block = cs * 8 // options.refcount_bits
    blocks, table_clusters = 1, 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters
        need_blocks = _ceil(total, per_block)
        need_table = _ceil(need_blocks * 8, cs)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)

    table_offset = cs
    blocks_offset = table_offset + table_clusters * cs
    l1_offset = blocks_offset + blocks * cs
    header = Header(
        version=version,
        cluster_bits=bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=table_offset,
        refcount_table_clusters=table_clusters,
        refcount_order=options.refcount_bits.bit_length() - 1,
        header_length=QEMU_HEADER_LENGTH if version >= 3 else V2_HEADER_LENGTH,
        compression_type=compression,
        incompatible_features=INCOMPAT_COMPRESSION if compression != COMPRESSION_ZLIB else 0,
        compatible_features=COMPAT_LAZY_REFCOUNTS if options.lazy_refcounts else 0,
        backing_file=backing_file,
    )
    if backing_file and backing_format:
        header.extensions.append(Extension(EXT_BACKING_FORMAT, backing_format.encode()))
    if version >= 3:
        header.extensions.append(Extension(EXT_FEATURE_TABLE, feature_table()))

    table = array("Q", [blocks_offset + i * cs for i in range(blocks)] + [0] * (table_clusters * cs // 8 - blocks))
    refcount_blocks = []
    for b in range(blocks):
        blk = new_block(per_block, options.refcount_bits)
        for c in range(b * per_block, min(total, (b + 1) * per_block)):
            blk[c - b * per_block] = 1
        refcount_blocks.append(encode_block(blk, options.refcount_bits))

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.pwrite(fd, header.encode(), 0)
        os.pwrite(fd, table_to_bytes(table), table_offset)
        os.pwrite(fd, b"".join(refcount_blocks), blocks_offset)
        os.ftruncate(fd, l1_offset + l1_clusters * cs)
        os.fsync(fd)
    finally:
        os.close(fd)
    return header


def create_raw(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
