"""The qcow2 format under QMP: blockdev-add driver=qcow2 and blockdev-create for qcow2.

``backing`` follows qemu: absent means "open the backing chain the image header names" (as
implicit nodes), null means no backing, a string is an existing node-name, an object an inline
node definition.
"""

from __future__ import annotations

import errno

from pynbd.daemon.blockdev import CHILD, child_node, creator, driver, node_filename
from pynbd.daemon.core import Daemon
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.file import FileNode
from pynbd.nodes.open import probe_format, resolve_backing
from pynbd.qcow2.create import CreateOptions, create_qcow2
from pynbd.qcow2.layout import FormatError
from pynbd.qcow2.node import Qcow2Node, read_header
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import nullable_str

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
        node = await Qcow2Node.open(
            file, header=header, read_only=read_only, filename=node_filename(file), defer_activation=True
        )
    except FormatError as exc:
        raise QMPError(f"Image is not in qcow2 format: {exc}") from None
    node.node_name = options.get("node-name") or daemon.graph.auto_name()
    try:
        daemon.graph.attach_child(node, "file", file)  # permissions and locks first ...
        await node.start_writing()  # ... and only then the writes of a read-write open
        if "backing" not in options:
            backing = await _open_backing_chain(daemon, header, node_filename(file), created)
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


async def _open_backing_chain(daemon: Daemon, header, image: str, created: list[BlockNode]) -> BlockNode | None:
    """The backing file the header names, opened read-only as implicit nodes (recursively)."""
    if not header.backing_file:
        return None
    path = resolve_backing(image, header.backing_file)
    fmt = header.backing_format or probe_format(path)
    options: dict = {"driver": fmt, "read-only": True, "file": {"driver": "file", "filename": path, "read-only": True}}
    if fmt not in ("raw", "qcow2"):
        raise QMPError(f"Unknown backing format '{fmt}'")
    from pynbd.daemon.blockdev import add_node

    return await add_node(daemon, options, created)


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
