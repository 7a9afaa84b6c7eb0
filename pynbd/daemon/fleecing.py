"""Fleecing building blocks under QMP: the copy-before-write and snapshot-access drivers, and
inserting or removing a filter above a live node as one step (also a transaction action).

qemu 7.2 cannot put a copy-before-write filter under a running export atomically with the
checkpoint bitmap (it takes blockdev-add plus qom-set, outside any transaction). Here
``blockdev-insert-filter`` re-points every user of the filter's child at the filter, and inside a
``transaction`` it happens together with the bitmap actions, at one instant.
"""

from __future__ import annotations

from pynbd.daemon.blockdev import CHILD, child_node, driver
from pynbd.daemon.core import Daemon
from pynbd.daemon.registry import action, command_from_action
from pynbd.graph.core import filtered_or_cow_child
from pynbd.graph.transaction import Transaction
from pynbd.nodes.base import BlockNode
from pynbd.nodes.cbw import CopyBeforeWriteNode, SnapshotAccessNode
from pynbd.qmp.protocol import QMPError


@driver(
    "copy-before-write",
    {
        "file": CHILD,
        "target": CHILD,
        "*bitmap": {"node": "str", "name": "str"},
        "*on-cbw-error": ("break-guest-write", "break-snapshot"),
        "*cbw-timeout": "uint",
    },
)
async def open_cbw(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    access = None
    if "bitmap" in options:
        ref = options["bitmap"]
        bitmap = daemon.node(ref["node"]).dirty_bitmaps.get(ref["name"])
        if bitmap is None:
            raise QMPError(f"Dirty bitmap '{ref['name']}' not found")
        access = bitmap.bitmap
    node = CopyBeforeWriteNode(on_cbw_error=options.get("on-cbw-error", "break-guest-write"), access=access)
    node.node_name = options.get("node-name") or daemon.graph.auto_name()
    file = await child_node(daemon, options["file"], created)
    if access is not None and access.size != file.size:  # e.g. a bitmap of a smaller backing node
        raise QMPError(
            f"Cannot create block-copy-state: Failed to merge bitmap '{options['bitmap']['name']}' to internal "
            f"copy-bitmap: Bitmaps are of different sizes (destination size is {file.size}, source size is "
            f"{access.size}) and can't be merged"
        )
    target = await child_node(daemon, options["target"], created)
    links = [daemon.graph.attach_child(node, "file", file)]
    try:
        links.append(daemon.graph.attach_child(node, "target", target))
        node.activate()
    except BaseException:
        for link in links:
            daemon.graph.detach(link)
        raise
    return node


@driver("snapshot-access", {"file": CHILD})
async def open_snapshot_access(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    file = await child_node(daemon, options["file"], created)
    if not isinstance(file, CopyBeforeWriteNode):
        raise QMPError("snapshot-access: file must be a copy-before-write node")
    node = SnapshotAccessNode()
    node.read_only = False  # writes are refused by the driver; discard is how readers free space
    daemon.graph.attach_child(node, "file", file)
    return node


def _filter_child(filt: BlockNode) -> BlockNode:
    link = filtered_or_cow_child(filt)
    if link is None or "file" not in filt.children:
        raise QMPError(f"Node '{filt.node_name}' is not a filter")
    return link.node


@action("blockdev-insert-filter", {"filter": "str"})
async def insert_filter_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    """Every user of the filter's child now goes through the filter (pynbd extension)."""
    filt = daemon.node(args["filter"])
    below = _filter_child(filt)
    daemon.graph.replace_node(below, filt, keep=[filt.children["file"]], tran=tran)
    if isinstance(filt, CopyBeforeWriteNode):
        # the point in time is the moment of insertion, when the whole transaction commits (the
        # graph is drained until then); a failed transaction leaves the filter's state alone
        tran.add(commit=filt.activate)


@action("blockdev-remove-filter", {"filter": "str"})
async def remove_filter_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    """The filter's users go back to its child; the filter stays in the graph, unused."""
    filt = daemon.node(args["filter"])
    below = _filter_child(filt)
    daemon.graph.replace_node(filt, below, tran=tran)


command_from_action("blockdev-insert-filter")
command_from_action("blockdev-remove-filter")
