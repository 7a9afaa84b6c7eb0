"""The qcow2 format under QMP: blockdev-add driver=qcow2 and blockdev-create for qcow2.

``backing`` follows qemu: absent means "open the backing chain the image header names" (as
implicit nodes, by :func:`pynbd.daemon.open.open_backing_chain`), null means no backing, a string
is an existing node-name, an object an inline node definition. A read-write open of an image left
with the dirty bit (lazy refcounts) repairs its refcounts first, as qemu does.

``cache-size``, ``l2-cache-size`` and ``refcount-cache-size`` size the node's metadata caches as
qemu does (same defaults once any is given, same split, same refusals); pynbd caches whole L2
tables, so ``l2-cache-entry-size`` may only be the cluster size.
"""

from __future__ import annotations

import errno
import logging

from pynbd.daemon.blockdev import CHILD, backing_depth, child_node, creator, driver, node_filename
from pynbd.daemon.core import Daemon
from pynbd.daemon.open import MAX_BACKING_CHAIN, BackingChainTooDeep, backing_level, open_backing_chain
from pynbd.graph.core import GraphUser
from pynbd.graph.perms import ALL, Perm
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.file import FileNode
from pynbd.qcow2.create import CreateOptions, create_qcow2
from pynbd.qcow2.layout import INCOMPAT_DIRTY, FormatError, Header
from pynbd.qcow2.node import Qcow2Node, read_header
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import nullable_str

log = logging.getLogger("pynbd.daemon")

QCOW2_SPEC = {
    "file": CHILD,
    "*backing": nullable_str,
    "*lazy-refcounts": "bool",
    "*pass-discard-request": "bool",
    "*pass-discard-snapshot": "bool",
    "*pass-discard-other": "bool",
    "*discard-no-unref": "bool",
    "*overlap-check": "any",
    "*cache-size": "uint",
    "*l2-cache-size": "uint",
    "*l2-cache-entry-size": "uint",
    "*refcount-cache-size": "uint",
    "*cache-clean-interval": "uint",
    "*encrypt": "any",
    "*data-file": "any",
}


@driver("qcow2", QCOW2_SPEC)
async def open_qcow2(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    file = await child_node(daemon, options["file"], created)
    read_only = options.get("read-only", False)
    # A FormatError (a BlockError, EINVAL unless it says otherwise) says what is wrong in qemu's
    # words; the daemon answers it as a QMP error, the tools as "Could not open".
    header = await read_header(file)
    if not read_only and header.incompatible_features & INCOMPAT_DIRTY:
        header = await _repair_dirty(daemon, file)
    l2_cache_size, refcount_cache_size = cache_sizes(options, header)
    node = await Qcow2Node.open(
        file,
        header=header,
        read_only=read_only,
        filename=node_filename(file),
        defer_activation=True,
        l2_cache_size=l2_cache_size,
        refcount_cache_size=refcount_cache_size,
    )
    node.node_name = options.get("node-name") or daemon.graph.auto_name()
    try:
        daemon.graph.attach_child(node, "file", file)  # permissions and locks first ...
        await node.start_writing()  # ... and only then the writes of a read-write open
        if "backing" not in options:
            backing = await open_backing_chain(daemon, header, file, created)
        elif options["backing"] is None:
            backing = None
        elif isinstance(options["backing"], str):  # an existing node: its chain is already open
            backing = daemon.node(options["backing"])
            if backing_depth(backing) >= MAX_BACKING_CHAIN:
                raise BackingChainTooDeep(options["backing"])
        else:
            async with backing_level(node.node_name):
                backing = await child_node(daemon, options["backing"], created)
        if backing is not None:
            daemon.graph.attach_child(node, "backing", backing)
    except BaseException:
        if "file" in node.children:
            await node.close()  # while its file link exists: a qcow2 node closes an unlinked file itself
        else:  # never got permission on the file (conflict, lock): write nothing, close nothing of it
            node.closed = True
        for link in list(node.children.values()):
            daemon.graph.detach(link)
        raise
    return node


DEFAULT_L2_CACHE_MAX_SIZE = 32 << 20  # qemu's, on Linux
MIN_REFCOUNT_CACHE_CLUSTERS = 4
INT_MAX = (1 << 31) - 1


def cache_sizes(options: dict, header: Header) -> tuple[int | None, int | None]:
    """(L2, refcount) cache sizes in bytes from the blockdev options, as qemu's read_cache_sizes
    derives them; (None, None) when no size is given, for pynbd's own defaults."""
    cs = header.cluster_size
    entry_size = options.get("l2-cache-entry-size")
    if entry_size is not None:
        if not 512 <= entry_size <= cs or entry_size & (entry_size - 1):
            raise QMPError(f"L2 cache entry size must be a power of two between 512 and the cluster size ({cs})")
        if entry_size != cs:
            raise QMPError(f"l2-cache-entry-size: pynbd caches whole L2 tables, so only the cluster size ({cs})")
    combined, l2, refcount = (options.get(k) for k in ("cache-size", "l2-cache-size", "refcount-cache-size"))
    if combined is None and l2 is None and refcount is None:
        return None, None
    max_l2_cache = -(-(-(-header.size // cs) * 8) // cs) * cs  # every L2 table the disk can have
    min_refcount_cache = MIN_REFCOUNT_CACHE_CLUSTERS * cs
    l2_size = min(max_l2_cache, DEFAULT_L2_CACHE_MAX_SIZE if l2 is None else l2)
    refcount_size = refcount or 0
    if combined is not None:
        if l2 is not None and refcount is not None:
            raise QMPError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
        if l2 is not None and l2 > combined:
            raise QMPError("l2-cache-size may not exceed cache-size")
        if refcount_size > combined:
            raise QMPError("refcount-cache-size may not exceed cache-size")
        if l2 is not None:
            refcount_size = combined - l2_size
        elif refcount is not None:
            l2_size = combined - refcount_size
        elif combined >= max_l2_cache + min_refcount_cache:  # the whole L2 cache, the rest for refcounts
            l2_size, refcount_size = max_l2_cache, combined - max_l2_cache
        else:
            refcount_size = min(combined, min_refcount_cache)
            l2_size = combined - refcount_size
    if entry_size is None:  # qemu's default entry: 4 KiB unless the cache covers the whole disk
        entry_size = cs if l2_size >= max_l2_cache else min(cs, 4096)
    if l2_size // entry_size > INT_MAX:
        raise QMPError("L2 cache size too big")
    if refcount_size // cs > INT_MAX:
        raise QMPError("Refcount cache size too big")
    return l2_size, refcount_size


async def _repair_dirty(daemon: Daemon, file: BlockNode):
    """A lazy-refcounts image left with the dirty bit, opened read-write: rebuild its refcounts
    first, as qemu does. The repair holds what a read-write qcow2 holds on its file (so the image
    locks keep others out meanwhile); returns the header as it is after the repair."""
    from pynbd.qcow2.check import REPAIR_ALL, check_image

    if not isinstance(file, FileNode):
        raise FormatError("image has the dirty bit set (lazy refcounts); repair it with 'pynbd img check -r all'")
    log.warning("%s: the image was not closed cleanly (dirty bit set): repairing its refcounts", file.filename)
    user = GraphUser("qcow2-repair", "block-job", f"refcount repair of {file.filename!r}")
    perm = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
    daemon.graph.attach_user(user, file, perm, ALL & ~(Perm.WRITE | Perm.RESIZE))
    try:
        result = await check_image(file.filename, REPAIR_ALL)
    finally:
        daemon.graph.detach_user(user)
    if result.corruptions or result.check_errors:
        raise BlockError(
            errno.EIO, f"{file.filename}: could not repair the refcounts: {result.failure or 'errors remain'}"
        )
    file.refresh_size()
    return await read_header(file)


@creator(
    "qcow2",
    {
        "driver": "str",
        "file": "str",
        "size": "uint",
        "*version": ("v2", "v3"),
        "*backing-file": "str",
        "*backing-fmt": "str",
        "*cluster-size": "uint",
        "*refcount-bits": "uint",
        "*lazy-refcounts": "bool",
        "*extended-l2": "bool",
        "*compression-type": ("zlib", "zstd"),
        "*preallocation": ("off", "metadata", "falloc", "full"),
        "*encrypt": "any",
        "*data-file": "str",
        "*data-file-raw": "bool",
    },
)
async def create_qcow2_image(daemon: Daemon, options: dict) -> None:
    file = daemon.node(options["file"])
    if not isinstance(file, FileNode):
        raise BlockError(errno.ENOTSUP, "blockdev-create qcow2 needs a 'file' protocol node")
    for unsupported in ("encrypt", "data-file"):  # never create a plain image where one of these was asked
        if options.get(unsupported):
            raise BlockError(errno.ENOTSUP, f"qcow2 option '{unsupported}' is not supported")
    create_options = CreateOptions(
        cluster_size=options.get("cluster-size", 65536),
        refcount_bits=options.get("refcount-bits", 16),
        compat="v2" if options.get("version") == "v2" else "v3",
        compression_type=options.get("compression-type", "zlib"),
        lazy_refcounts=options.get("lazy-refcounts", False),
        extended_l2=options.get("extended-l2", False),
    )
    try:
        create_qcow2(
            file.filename, options["size"], create_options, options.get("backing-file"), options.get("backing-fmt")
        )
    except ValueError as exc:
        raise BlockError(errno.EINVAL, str(exc)) from None
    file.refresh_size()
