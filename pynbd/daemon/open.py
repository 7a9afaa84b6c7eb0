"""One way to open an image: blockdev-add, ``pynbd serve``, ``pynbd img`` and ``pynbd backup`` all
open images here, into a block graph, as qemu-storage-daemon, qemu-nbd and qemu-img share one block
layer.

- :func:`open_node` is blockdev-add's core: a node and its inline children from blockdev options,
  every node it opened closed again if anything fails.
- :func:`open_backing_chain` opens the backing file a qcow2 header names (format from the header,
  else probed; the name relative to the image's directory, as qemu resolves it) as read-only
  implicit nodes, and refuses a chain that comes back to an image already above it.
- :func:`open_image` is what the command-line tools use: a file name becomes the blockdev options
  qemu-img and qemu-nbd would build (``{"driver": FORMAT, "file": {"driver": "file", ...}}``),
  opened by :func:`open_node` into a :class:`~pynbd.daemon.core.Daemon`'s graph, and a root
  :class:`~pynbd.graph.core.GraphUser` then takes the permissions the tool's qemu counterpart takes.
  Permissions are what lock the image against other processes (file nodes take qemu's OFD lock
  bytes in ``set_perm``), so an image another process writes is refused exactly as qemu refuses it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from pynbd.daemon.blockdev import add_node, close_and_remove, node_filename, undo_created
from pynbd.daemon.core import Daemon
from pynbd.graph.core import ChildLink, GraphError, GraphUser
from pynbd.graph.perms import ALL, NONE, Perm
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.file import FileNode, ImageLocked
from pynbd.qcow2.layout import MAGIC
from pynbd.qmp.protocol import QMPError

FORMATS = ("raw", "qcow2")

#: What qemu-img takes on its image: a consistent read, and the right to write when it writes.
#: It shares everything; the format driver below unshares what it must (qcow2 its metadata).
IMG_READ = Perm.CONSISTENT_READ
IMG_WRITE = Perm.CONSISTENT_READ | Perm.WRITE
#: qemu-img convert's source: others may not change it while it is copied.
CONVERT_SOURCE_SHARED = ALL & ~(Perm.WRITE | Perm.RESIZE)

#: (device, inode) of the images whose backing chains are being opened, top first.
_CHAIN_ABOVE: ContextVar[tuple[tuple[int, int], ...]] = ContextVar("pynbd_backing_chain_above", default=())
#: How many backing files are being opened above this one (header chains and inline definitions).
_CHAIN_DEPTH: ContextVar[int] = ContextVar("pynbd_backing_chain_depth", default=0)

#: The most backing files one image may have below it. qemu has no limit (it opens thousands, if
#: the file descriptors last); pynbd opens a chain and serves requests through it by recursion,
#: a few Python frames a layer, and this keeps both far from Python's recursion limit (with the
#: graph's own limit, pynbd.graph.core.MAX_GRAPH_DEPTH, above it for filters and exports).
MAX_BACKING_CHAIN = 128


def nbd_export_perm(writable: bool) -> tuple[Perm, Perm]:
    """What an NBD export (qemu-nbd, block-export-add) takes on its node and lets others take."""
    return Perm.CONSISTENT_READ | (Perm.WRITE if writable else NONE), ALL & ~Perm.RESIZE


def probe_format(filename: str) -> str:
    """``qcow2`` if the file starts with the qcow2 magic, else ``raw``."""
    try:
        with open(filename, "rb") as f:
            return "qcow2" if f.read(4) == MAGIC else "raw"
    except OSError as exc:
        raise BlockError(exc.errno or errno.EIO, f"Could not open '{filename}': {exc.strerror}") from None


def resolve_backing(image: str, backing: str) -> str:
    """A backing file name as qemu resolves it: relative names are relative to the image's directory."""
    if "://" in backing or backing.startswith("json:"):
        raise BlockError(errno.ENOTSUP, f"backing file {backing!r}: only local files are supported")
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(image), backing)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # opening it will say why
    return st.st_dev, st.st_ino


def _file_identity(file: BlockNode) -> tuple[int, int] | None:
    if not isinstance(file, FileNode):
        return None  # an image on NBD or in memory cannot be its own backing file
    st = os.fstat(file.fd)
    return st.st_dev, st.st_ino


async def open_node(daemon: Daemon, options: dict, keyval: bool = False) -> BlockNode:
    """Open a node from blockdev options (blockdev-add); on failure every node opened is closed."""
    created: list[BlockNode] = []
    try:
        return await add_node(daemon, options, created, keyval)
    except BaseException:
        await undo_created(daemon, created)
        raise


async def open_backing_chain(daemon: Daemon, header, file: BlockNode, created: list[BlockNode]) -> BlockNode | None:
    """The backing file ``header`` names, for the image on ``file``, opened read-only as implicit
    nodes (and its own backing files, recursively).

    A backing file that is the image itself or one above it is refused, with qemu-img's message
    for such chains: qemu 7.2 itself recurses until it runs out of file descriptors (read-only)
    or trips over its own lock (read-write). Errors below get qemu's "Could not open backing
    file: " in front, once per level."""
    if not header.backing_file:
        return None
    image = node_filename(file)
    path = resolve_backing(image, header.backing_file)
    above = _CHAIN_ABOVE.get()
    own = _file_identity(file)
    if own is not None:
        above = (*above, own)
    if _identity(path) in above:
        raise BlockError(errno.ELOOP, f"Could not open backing file: Backing file '{path}' creates an infinite loop.")
    fmt = header.backing_format or probe_format(path)
    if fmt not in FORMATS:
        raise QMPError(f"Could not open backing file: Unknown driver '{fmt}'")
    # discard=unmap: qemu's default for every layer below the one the user opened (block.c,
    # bdrv_inherited_options): a commit that gives clusters back gives the file space back too
    file = {"driver": "file", "filename": path, "read-only": True, "discard": "unmap"}
    options: dict = {"driver": fmt, "read-only": True, "discard": "unmap", "file": file}
    token = _CHAIN_ABOVE.set(above)
    try:
        async with backing_level(path):
            return await add_node(daemon, options, created)
    except BackingChainTooDeep:
        raise  # said once, not once per level
    except ImageLocked as exc:
        raise ImageLocked(f"Could not open backing file: {exc}", exc.hint) from None
    except BlockError as exc:
        raise BlockError(exc.errno, f"Could not open backing file: {exc}") from None
    except (QMPError, GraphError) as exc:
        raise QMPError(f"Could not open backing file: {exc}") from None
    finally:
        _CHAIN_ABOVE.reset(token)


class BackingChainTooDeep(BlockError):
    """A backing chain deeper than MAX_BACKING_CHAIN (ELOOP, as a loop)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            errno.ELOOP,
            f"Could not open backing file: Backing file '{name}' is more than {MAX_BACKING_CHAIN} "
            "backing files deep (pynbd's limit)",
        )


@asynccontextmanager
async def backing_level(name: str) -> AsyncIterator[None]:
    """Opening one more backing file below the images being opened: refused with ELOOP past
    MAX_BACKING_CHAIN levels (as a loop is), whether the chain comes from image headers or from
    inline blockdev definitions, before the recursion could go deeper."""
    depth = _CHAIN_DEPTH.get() + 1
    if depth > MAX_BACKING_CHAIN:
        raise BackingChainTooDeep(name)
    token = _CHAIN_DEPTH.set(depth)
    try:
        yield
    finally:
        _CHAIN_DEPTH.reset(token)


@dataclass
class Image:
    """An image a command-line tool opened: its graph (in ``daemon``) and the root user's link."""

    daemon: Daemon
    filename: str
    user: GraphUser
    link: ChildLink

    @property
    def node(self) -> BlockNode:
        return self.link.node

    def chain(self) -> list[BlockNode]:
        """The image's node and its backing nodes, top first."""
        nodes = [self.node]
        while (below := nodes[-1].child_node("backing")) is not None:
            nodes.append(below)
        return nodes

    async def close(self) -> None:
        """Drop the user and close every node of the image, formats before their files."""
        node = self.link.node
        if self.link in self.user.links:
            self.daemon.graph.detach(self.link)
        if node.node_name in self.daemon.graph.nodes and not node.parents:
            await close_and_remove(self.daemon, node)


class OpenError(BlockError):
    """Opening ``filename`` failed; ``reason`` is the block layer's message, ``hint`` qemu's
    second line ("Is another process using the image [...]?") where it has one."""

    def __init__(self, filename: str, reason: str, hint: str = "", err: int = errno.EIO) -> None:
        super().__init__(err, f"Could not open '{filename}': {reason}")
        self.filename = filename
        self.reason = reason
        self.hint = hint

    def report(self, prefix: str = "Could not open") -> str:
        """The message as qemu-img (``Could not open``) or qemu-nbd (``Failed to blk_new_open``) says it."""
        text = f"{prefix} '{self.filename}': {self.reason}"
        return f"{text}\n{self.hint}" if self.hint else text


def image_options(
    filename: str,
    fmt: str,
    read_only: bool,
    force_share: bool = False,
    backing: bool = True,
    node_name: str = "",
    locking: bool = True,
) -> dict:
    """The blockdev options qemu-img/qemu-nbd build for a file name (``discard=unmap``: the tools
    pass discards down, where blockdev-add's default drops them)."""
    file: dict = {"driver": "file", "filename": filename}
    if not locking:
        file["locking"] = "off"
    if fmt == "file":
        options: dict = file
    else:
        options = {"driver": fmt, "file": file}
        if fmt == "qcow2" and not backing:
            options["backing"] = None
    options.update({"read-only": read_only, "discard": "unmap"})
    if force_share:
        options["force-share"] = True
    if node_name:
        options["node-name"] = node_name
    return options


async def open_image(
    filename: str,
    fmt: str | None = None,
    *,
    read_only: bool,
    perm: Perm | None = None,
    shared: Perm = ALL,
    force_share: bool = False,
    backing: bool = True,
    user: str = "pynbd",
    node_name: str = "",
    locking: bool = True,
    daemon: Daemon | None = None,
) -> Image:
    """Open ``filename`` (format ``fmt``, probed if None; ``"file"`` for the bare protocol node)
    with its backing chain (unless ``backing`` is False), and attach a root user taking ``perm``
    (default: a read, plus write unless ``read_only``) and sharing ``shared`` (everything with
    ``force_share``, which qemu allows only read-only). ``locking=False`` is for code that runs
    under a lock its caller already holds on the same file (qcow2 repair). Raises :class:`OpenError`."""
    from pynbd.daemon import load_commands

    load_commands()  # the drivers register themselves with the commands
    daemon = daemon or Daemon()
    perm = (IMG_READ if read_only else IMG_WRITE) if perm is None else perm
    if force_share:
        shared = ALL
    try:
        fmt = fmt or probe_format(filename)
        if fmt not in (*FORMATS, "file"):
            raise BlockError(errno.EINVAL, f"Unknown driver '{fmt}'")
        options = image_options(filename, fmt, read_only, force_share, backing, node_name, locking)
        node = await open_node(daemon, options)
    except ImageLocked as exc:
        raise OpenError(filename, str(exc), exc.hint, errno.EAGAIN) from None
    except (BlockError, QMPError, GraphError, OSError) as exc:
        raise OpenError(filename, _reason(filename, exc), err=getattr(exc, "errno", None) or errno.EIO) from None
    graph_user = GraphUser(user, "block-backend", f"{user} (image {filename!r})")
    try:
        link = daemon.graph.attach_user(graph_user, node, perm, shared)
    except BaseException as exc:
        await close_and_remove(daemon, node)
        if isinstance(exc, ImageLocked):
            raise OpenError(filename, str(exc), exc.hint, errno.EAGAIN) from None
        if isinstance(exc, (BlockError, GraphError)):
            raise OpenError(filename, str(exc), err=errno.EPERM) from None
        raise
    return Image(daemon, filename, graph_user, link)


def _reason(filename: str, exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, BlockError):
        return f"Could not open '{filename}': {exc.strerror or exc}"
    return str(exc)
