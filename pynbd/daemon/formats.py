"""The qcow2 format under QMP: blockdev-add driver=qcow2 and blockdev-create for qcow2.

``backing`` follows qemu: absent means "open the backing chain the image header names" (as
implicit nodes, by :func:`pynbd.daemon.open.open_backing_chain`), null means no backing, a string
is an existing node-name, an object an inline node definition. A read-write open of an image left
with the dirty bit (lazy refcounts) repairs its refcounts first, as qemu does.
"""

from __future__ import annotations

import errno
import logging

from pynbd.daemon.blockdev import CHILD, child_node, creator, driver, node_filename
from pynbd.daemon.core import Daemon
from pynbd.daemon.open import open_backing_chain
from pynbd.graph.core import GraphUser
from pynbd.graph.perms import ALL, Perm
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.file import FileNode
from pynbd.qcow2.create import CreateOptions, create_qcow2
from pynbd.qcow2.layout import INCOMPAT_DIRTY, FormatError
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
    try:
        header = await read_header(file)
        if not read_only and header.incompatible_features & INCOMPAT_DIRTY:
            header = await _repair_dirty(daemon, file)
        node = await Qcow2Node.open(
            file, header=header, read_only=read_only, filename=node_filename(file), defer_activation=True
        )
    except FormatError as exc:
        raise QMPError(f"Image is not in qcow2 format: {exc}") from None
    node.node_name = options.get("node-name") or daemon.graph.auto_name()
    try:
        daemon.graph.attach_child(node, "file", file)  # permissions and locks first ...
        await node.activate()  # ... and only then the writes of a read-write open
        if "backing" not in options:
            backing = await open_backing_chain(daemon, header, file, created)
        elif options["backing"] is None:
            backing = None
        else:
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
