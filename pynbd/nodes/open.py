"""Open an image file by name: probe its format and resolve its backing chain into nodes.

A qcow2 image names its backing file relative to its own directory (as qemu resolves it), and
usually says the backing format; where it does not, the backing file is probed too. Backing
files are opened read-only unless the caller asks for a layer to be writable (``commit``).
"""

from __future__ import annotations

import errno
import logging
import os

from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.file import FileNode, check_raw_file
from pynbd.qcow2.layout import INCOMPAT_DIRTY, MAGIC, FormatError

log = logging.getLogger("pynbd.open")

FORMATS = ("raw", "qcow2")
MAX_CHAIN = 256


def probe_format(filename: str) -> str:
    """``qcow2`` if the file starts with the qcow2 magic, else ``raw``."""
    try:
        with open(filename, "rb") as f:
            return "qcow2" if f.read(4) == MAGIC else "raw"
    except IsADirectoryError:
        raise BlockError(errno.EINVAL, f"{filename}: is a directory") from None
    except FileNotFoundError:
        raise BlockError(errno.ENOENT, f"Could not open '{filename}': No such file or directory") from None


def resolve_backing(image: str, backing: str) -> str:
    """A backing file name as qemu resolves it: relative names are relative to the image's directory."""
    if "://" in backing or backing.startswith("json:"):
        raise BlockError(errno.ENOTSUP, f"backing file {backing!r}: only local files are supported")
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(image), backing)


async def open_image(
    filename: str,
    fmt: str | None = None,
    read_only: bool = False,
    node_name: str = "",
    backing: bool = True,
    writable_layers: int = 1,
    _depth: int = 0,
    _seen: frozenset[str] = frozenset(),
) -> BlockNode:
    """Open ``filename`` (format ``fmt`` or probed) with its whole backing chain.

    The top ``writable_layers`` layers are opened read-write (unless ``read_only``); every layer
    below is read-only, as a backing file must be."""
    from pynbd.qcow2.node import Qcow2Node, read_header

    if fmt is None:
        fmt = probe_format(filename)
    if fmt not in FORMATS:
        raise BlockError(errno.EINVAL, f"Unknown driver '{fmt}' (supported: {', '.join(FORMATS)})")
    real = os.path.realpath(filename)
    if real in _seen or _depth > MAX_CHAIN:
        raise BlockError(errno.ELOOP, f"{filename}: the backing chain loops or is too deep")
    layer_read_only = read_only or _depth >= writable_layers
    check_raw_file(filename)
    file = FileNode(filename, read_only=layer_read_only, node_name=f"{node_name}-file" if node_name else "")
    if fmt == "raw":
        file.node_name = node_name
        return file
    try:
        header = await read_header(file)
        if not layer_read_only and header.incompatible_features & INCOMPAT_DIRTY:
            file, header = await _repair_dirty(filename, file, node_name)
        backing_node = None
        if backing and header.backing_file:
            backing_name = resolve_backing(filename, header.backing_file)
            backing_node = await open_image(
                backing_name,
                header.backing_format,
                read_only,
                "",
                True,
                writable_layers,
                _depth + 1,
                _seen | {real},
            )
        try:
            return await Qcow2Node.open(
                file,
                header=header,
                backing=backing_node,
                read_only=layer_read_only,
                filename=filename,
                node_name=node_name,
            )
        except BaseException:
            if backing_node is not None:
                await backing_node.close()
            raise
    except FormatError as exc:
        await file.close()
        raise BlockError(errno.EINVAL, f"{filename}: {exc}") from None
    except BaseException:
        await file.close()
        raise


async def _repair_dirty(filename: str, file: FileNode, node_name: str):
    """A lazy-refcounts image left with the dirty bit: rebuild its refcounts before writing (as qemu)."""
    from pynbd.qcow2.check import REPAIR_ALL, check_image
    from pynbd.qcow2.node import read_header

    log.warning("%s: the image was not closed cleanly (dirty bit set): repairing its refcounts", filename)
    await file.close()
    result = await check_image(filename, REPAIR_ALL)
    if result.corruptions or result.check_errors:
        raise BlockError(errno.EIO, f"{filename}: could not repair the refcounts: {result.failure or 'errors remain'}")
    file = FileNode(filename, node_name=f"{node_name}-file" if node_name else "")
    return file, await read_header(file)


def chain(node: BlockNode) -> list[BlockNode]:
    """The node and its backing nodes, top first."""
    nodes = []
    current: BlockNode | None = node
    while current is not None:
        nodes.append(current)
        current = getattr(current, "backing", None)
    return nodes
