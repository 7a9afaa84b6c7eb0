"""blockdev-add, blockdev-del, blockdev-create and the node queries.

Each driver has an argument spec (qemu 7.2's names) and an opener; children given inline as
objects become nodes of their own (named ``#blockNNN`` unless they give a node-name) that belong
to their parent: blockdev-del of the parent deletes them too, unless another parent still uses
them. Children given as strings are existing node-names. A failed blockdev-add removes every node
it created, so the graph is exactly as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pynbd.daemon.core import Daemon
from pynbd.daemon.registry import command
from pynbd.graph.core import GraphError, GraphUser, filtered_or_cow_child
from pynbd.graph.io import drained
from pynbd.jobs.core import Job
from pynbd.nodes.base import BlockNode
from pynbd.nodes.file import FileNode
from pynbd.nodes.nbd import NBDNode, target_from_options
from pynbd.nodes.null import NullNode
from pynbd.nodes.raw import RawNode
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import Spec, check, str_or_object

log = logging.getLogger("pynbd.daemon")

COMMON: Spec = {
    "driver": "str",
    "*node-name": "str",
    "*discard": ("ignore", "unmap"),
    "*cache": {"*direct": "bool", "*no-flush": "bool"},
    "*read-only": "bool",
    "*auto-read-only": "bool",
    "*force-share": "bool",
    "*detect-zeroes": ("off", "on", "unmap"),
}
CHILD = str_or_object({"driver": "str"})

Opener = Callable[[Daemon, dict, list[BlockNode]], Awaitable[BlockNode]]


@dataclass
class Driver:
    spec: Spec
    open: Opener


DRIVERS: dict[str, Driver] = {}


def driver(name: str, spec: Spec):
    def register(opener: Opener) -> Opener:
        DRIVERS[name] = Driver({**COMMON, **spec}, opener)
        return opener

    return register


async def add_node(daemon: Daemon, options: dict, created: list[BlockNode], keyval: bool = False) -> BlockNode:
    """Open a node from blockdev options, recording every node made in ``created`` (for undo)."""
    name = options.get("driver")
    if not isinstance(name, str):
        raise QMPError("Parameter 'driver' is missing" if name is None else "Invalid parameter type for 'driver'")
    drv = DRIVERS.get(name)
    if drv is None:
        raise QMPError(f"Parameter 'driver' does not accept value '{name}'")
    options = check(drv.spec, options, keyval=keyval)
    node_name = options.get("node-name", "")
    if node_name and (node_name in daemon.graph.nodes or node_name in daemon.exports):
        raise QMPError(f"Duplicate nodes with node-name='{node_name}'")
    if node_name and not _valid_node_name(node_name):
        raise QMPError(f"Invalid node-name: '{node_name}'")
    for value in options.values():  # as qemu: children defined inline inherit these unless they say
        if isinstance(value, dict) and "driver" in value:
            for key in ("read-only", "auto-read-only", "discard", "force-share"):
                if key in options:
                    value.setdefault(key, options[key])
    force_share = options.get("force-share", False)
    if force_share and not options.get("read-only", False):
        raise QMPError("force-share=on can only be used with read-only images")
    node = await drv.open(daemon, options, created)
    node.unmap = options.get("discard", "ignore") == "unmap"  # qemu's default: ignore discards
    node.force_share = force_share
    node.node_name = node_name
    daemon.graph.add_node(node)
    created.append(node)
    return node


def _valid_node_name(name: str) -> bool:
    return name[0].isalpha() and all(c.isalnum() or c in "-._" for c in name) and len(name) < 32


async def child_node(daemon: Daemon, ref: Any, created: list[BlockNode], keyval: bool = False) -> BlockNode:
    """An existing node by name, or a new implicit node from an inline definition."""
    if isinstance(ref, str):
        return daemon.node(ref)
    return await add_node(daemon, ref, created, keyval)


async def undo_created(daemon: Daemon, created: list[BlockNode]) -> None:
    for node in reversed(created):
        for link in list(node.parents):
            daemon.graph.detach(link)
        await node.close()  # before unlinking its children, which it may still flush to
        if node.node_name in daemon.graph.nodes:
            daemon.graph.remove_node(node)


# -- drivers --------------------------------------------------------------------------------------


@driver("file", {"filename": "str", "*aio": ("threads", "native", "io_uring"), "*locking": ("auto", "on", "off")})
async def open_file(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    read_only = options.get("read-only", False)
    filename = options["filename"]
    try:
        node = FileNode(filename, read_only=read_only, locking=options.get("locking", "auto") != "off")
    except OSError as exc:
        raise QMPError(f"Could not open '{filename}': {exc.strerror}") from None
    if not node.is_regular_file and not node.is_block_device:
        await node.close()
        raise QMPError(f"'file' driver requires '{filename}' to be a regular file")
    return node


@driver("raw", {"file": CHILD, "*offset": "uint", "*size": "uint"})
async def open_raw(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    child = await child_node(daemon, options["file"], created)
    node = RawNode(offset=options.get("offset", 0), size=options.get("size"), read_only=options.get("read-only", False))
    node.node_name = "#raw-pending"
    daemon.graph.attach_child(node, "file", child)
    try:
        node.check_window()
    except Exception:
        daemon.graph.detach(node.children["file"])
        raise
    return node


@driver("null-co", {"*size": "uint", "*read-zeroes": "bool", "*latency-ns": "uint"})
async def open_null(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    return NullNode(options.get("size", 1 << 30), read_zeroes=options.get("read-zeroes", False))


SOCKET_ADDRESS: Spec = {  # qemu's flat SocketAddress
    "type": ("unix", "inet", "vsock", "fd"),
    "*path": "str",
    "*abstract": "bool",
    "*tight": "bool",
    "*host": "str",
    "*port": "str",
    "*numeric": "bool",
    "*to": "uint",
    "*ipv4": "bool",
    "*ipv6": "bool",
    "*keep-alive": "bool",
    "*mptcp": "bool",
    "*cid": "str",
    "*str": "str",
}


@driver(
    "nbd",
    {
        "server": SOCKET_ADDRESS,
        "*export": "str",
        "*tls-creds": "str",
        "*tls-hostname": "str",
        "*x-dirty-bitmap": "str",
        "*reconnect-delay": "uint",
        "*open-timeout": "uint",
    },
)
async def open_nbd(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    from pynbd.daemon.objects import tls_creds

    certificates, verify = None, True
    if "tls-creds" in options:
        creds = tls_creds(daemon, options["tls-creds"], "client")
        certificates, verify = creds.dir, creds.verify_peer
    target = target_from_options(
        options["server"], options.get("export", ""), "tls-creds" in options, options.get("tls-hostname")
    )
    node = NBDNode(
        target,
        read_only=options.get("read-only", False),
        auto_read_only=options.get("auto-read-only", False),
        dirty_bitmap=options.get("x-dirty-bitmap"),
        tls_certificates=certificates,
        tls_verify_peer=verify,
    )
    await node.open()
    return node


# -- commands -------------------------------------------------------------------------------------


@command("blockdev-add")
async def blockdev_add(daemon: Daemon, args: dict) -> None:
    await blockdev_add_options(daemon, args)


async def blockdev_add_options(daemon: Daemon, args: dict, keyval: bool = False) -> BlockNode:
    if "node-name" not in args:
        raise QMPError("A block device must be given a node-name when added with blockdev-add")
    from pynbd.daemon.open import open_node

    node = await open_node(daemon, args, keyval)
    daemon.monitor_owned.add(node.node_name)
    return node


@command("blockdev-del", {"node-name": "str"})
async def blockdev_del(daemon: Daemon, args: dict) -> None:
    name = args["node-name"]
    node = daemon.node(name)
    if name not in daemon.monitor_owned:
        raise QMPError(f"Node {name} is not owned by the monitor")
    await close_and_remove(daemon, node)
    daemon.monitor_owned.discard(name)


async def close_and_remove(daemon: Daemon, node: BlockNode) -> None:
    """As qemu's bdrv_close: the driver closes (flushing into its children) before its child links
    go. Then, as qemu's reference counting does, each child left without a parent goes too unless
    the monitor owns it (blockdev-add made it): children defined inline belong to the parent
    whether or not they were given a node-name, and live on only while another parent uses them."""
    daemon.graph.check_removable(node)
    children = list(dict.fromkeys(link.node for link in node.children.values()))
    await node.close()
    daemon.graph.remove_node(node)
    for child in children:
        orphan = not child.parents and daemon.graph.nodes.get(child.node_name) is child
        if not orphan or child.node_name in daemon.monitor_owned:
            continue
        try:
            await close_and_remove(daemon, child)
        except GraphError as exc:  # e.g. a job froze one of its links: it stays, named
            log.warning("keeping node %s: %s", child.node_name, exc)


async def release_orphans(daemon: Daemon) -> None:
    """Close the nodes nobody uses any more and the monitor does not own: as qemu's reference
    counting frees a node when its last parent lets go, whatever took it away (a mirror's pivot
    replacing it, a commit or stream dropping backing layers, blockdev-reopen re-pointing a link,
    the export of an inline child going). Nodes blockdev-add made stay until blockdev-del."""
    orphans = [
        node for name, node in daemon.graph.nodes.items() if not node.parents and name not in daemon.monitor_owned
    ]
    if not orphans:
        return
    async with drained(orphans):
        for node in orphans:
            if node.parents or daemon.graph.nodes.get(node.node_name) is not node:
                continue  # taken along by an orphan closed before it
            try:
                await close_and_remove(daemon, node)
            except GraphError as exc:  # a frozen link: it stays, and says why
                log.warning("keeping unused node %s: %s", node.node_name, exc)


def node_filename(node: BlockNode) -> str:
    while True:
        if hasattr(node, "filename"):
            return node.filename
        describe = getattr(node, "uri", None)
        if describe:
            return describe
        file_child = node.child_node("file")
        if file_child is None:
            return f'json:{{"driver": "{node.driver}"}}'
        node = file_child


def backing_depth(node: BlockNode) -> int:
    """qemu's ``backing_file_depth``: steps down through backing links and filters (a filter
    counts as a layer there, for compatibility with when filters sat on ``backing``)."""
    depth, current = 0, node
    while (link := current.filter_child() or current.child("backing")) is not None:
        depth, current = depth + 1, link.node
    return depth


def node_info(node: BlockNode) -> dict:
    """One entry of query-named-block-nodes (BlockDeviceInfo), the fields clients read."""
    image: dict[str, Any] = {
        "virtual-size": node.size,
        "filename": node_filename(node),
        "format": node.driver,
        "dirty-flag": False,
    }
    if hasattr(node, "fd") and node.fd >= 0:
        try:
            image["actual-size"] = os.fstat(node.fd).st_blocks * 512
        except OSError:
            pass
    backing = node.child_node("backing")
    if backing is not None:
        image["backing-filename"] = node_filename(backing)
        image["full-backing-filename"] = node_filename(backing)
    info = {
        "iops_rd": 0,
        "detect_zeroes": "off",
        "image": image,
        "iops_wr": 0,
        "ro": bool(node.read_only),
        "node-name": node.node_name,
        "backing_file_depth": backing_depth(node),
        "drv": node.driver,
        "iops": 0,
        "bps_wr": 0,
        "write_threshold": 0,
        "encrypted": False,
        "bps": 0,
        "bps_rd": 0,
        "cache": {"no-flush": False, "direct": False, "writeback": True},
        "file": node_filename(node),
    }
    if backing is not None:
        info["backing_file"] = node_filename(backing)
    if node.dirty_bitmaps:
        info["dirty-bitmaps"] = [bitmap.info() for bitmap in node.dirty_bitmaps.values()]
    return info


@command("query-named-block-nodes", {"*flat": "bool"})
async def query_named_block_nodes(daemon: Daemon, args: dict) -> list:
    return [node_info(node) for node in reversed(daemon.graph.nodes.values())]  # newest first, as qemu


@command("x-debug-query-block-graph", {})
async def query_block_graph(daemon: Daemon, args: dict) -> dict:
    users: list[GraphUser] = [export.user for export in daemon.exports.values()]
    users += [user for job in daemon.jobs.jobs.values() for user in getattr(job, "users", [])]
    return daemon.graph.debug_graph(users)


# -- blockdev-create --------------------------------------------------------------------------------

CREATE_SPECS: dict[str, Spec] = {
    "file": {
        "driver": "str",
        "filename": "str",
        "size": "uint",
        "*preallocation": ("off", "falloc", "full", "metadata"),
        "*nocow": "bool",
        "*extent-size-hint": "uint",
    },
}
CREATORS: dict[str, Callable[[Daemon, dict], Awaitable[None]]] = {}


def creator(name: str, spec: Spec):
    def register(fn):
        CREATE_SPECS[name] = spec
        CREATORS[name] = fn
        return fn

    return register


@creator("file", CREATE_SPECS["file"])
async def create_file(daemon: Daemon, options: dict) -> None:
    filename, size = options["filename"], options["size"]
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd = os.open(filename, flags, 0o644)
    try:
        os.ftruncate(fd, size)
        if options.get("preallocation") in ("falloc", "full"):
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


class CreateJob(Job):
    job_type = "create"
    is_block_job = False

    def __init__(self, job_id: str, daemon: Daemon, options: dict) -> None:
        super().__init__(job_id, auto_finalize=True, auto_dismiss=False)
        self.daemon = daemon
        self.options = options

    async def work(self) -> None:
        self.total_progress = 1
        await CREATORS[self.options["driver"]](self.daemon, self.options)
        self.current_progress = 1


@command("blockdev-create", {"job-id": "str", "options": "any"})
async def blockdev_create(daemon: Daemon, args: dict) -> None:
    options = args["options"]
    if not isinstance(options, dict):
        raise QMPError("Invalid parameter type for 'options', expected: object")
    drv = options.get("driver")
    if drv not in CREATE_SPECS:
        raise QMPError(f"Driver '{drv}' does not support blockdev-create" if drv else "Parameter 'driver' is missing")
    options = check(CREATE_SPECS[drv], options, "options")
    daemon.jobs.start(CreateJob(args["job-id"], daemon, options))


def chain_below(node: BlockNode) -> list[BlockNode]:
    """The node and every node down its filter/COW chain."""
    chain = [node]
    while (link := filtered_or_cow_child(chain[-1])) is not None:
        chain.append(link.node)
    return chain
