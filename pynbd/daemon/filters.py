"""The copy-on-read and blkdebug drivers, and blockdev-reopen."""

from __future__ import annotations

from pynbd.daemon.blockdev import CHILD, DRIVERS, child_node, driver
from pynbd.daemon.core import Daemon
from pynbd.daemon.registry import command
from pynbd.graph.core import chain_links
from pynbd.graph.reopen import storage_chain
from pynbd.graph.transaction import Transaction
from pynbd.nodes.base import BlockNode
from pynbd.nodes.blkdebug import BlkdebugNode, Rule
from pynbd.nodes.cor import CopyOnReadNode
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import check


@driver("copy-on-read", {"file": CHILD, "*bottom": "str", "*x-track-copied": "bool"})
async def open_cor(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    file = await child_node(daemon, options["file"], created)
    bottom = daemon.node(options["bottom"]) if "bottom" in options else None
    if bottom is not None and not any(link.node is bottom for link in chain_links(file, None)) and bottom is not file:
        raise QMPError(f"'{bottom.node_name}' is not in the backing chain of '{file.node_name}'")
    track_copied = options.get("x-track-copied", False)
    if track_copied and not file.can_unallocate:
        raise QMPError(
            f"x-track-copied needs a top that can give clusters back to its backing (qcow2): "
            f"{file.describe()} cannot give clusters back"
        )
    node = CopyOnReadNode(bottom=bottom, track_copied=track_copied)
    node.node_name = options.get("node-name") or daemon.graph.auto_name()
    daemon.graph.attach_child(node, "file", file)
    return node


@command("x-copy-on-read-release", {"node-name": "str"})
async def cor_release(daemon: Daemon, args: dict) -> dict:
    """pynbd extension: give back, in the top, what a copy-on-read filter copied up and nobody
    changed since (pynbd/nodes/cor.py says exactly which clusters)."""
    node = daemon.node(args["node-name"])
    if not isinstance(node, CopyOnReadNode):
        raise QMPError(f"Node '{node.node_name}' is not a copy-on-read filter")
    if not node.track_copied:
        raise QMPError(f"Copy-on-read node '{node.node_name}' was not opened with x-track-copied")
    return {"released": await node.release_copied()}


RULE = {"event": "str", "*errno": "int", "*sector": "int", "*once": "bool", "*immediately": "bool", "*state": "int"}


@driver("blkdebug", {"image": CHILD, "*inject-error": [RULE], "*config": "str", "*align": "uint"})
async def open_blkdebug(daemon: Daemon, options: dict, created: list[BlockNode]) -> BlockNode:
    image = await child_node(daemon, options["image"], created)
    rules = [
        Rule(r["event"], r.get("errno", 5), r.get("sector", -1), r.get("once", False))
        for r in options.get("inject-error", [])
    ]
    node = BlkdebugNode(rules)
    node.node_name = options.get("node-name") or daemon.graph.auto_name()
    daemon.graph.attach_child(node, "image", image)
    return node


@command("blockdev-reopen", {"options": ["any"]})
async def blockdev_reopen(daemon: Daemon, args: dict) -> None:
    """Change read-only and the ``file``/``backing`` links of nodes, all or nothing.

    The nodes are reopened first (file descriptors change access mode while keeping their locks),
    then the links change and permissions are recomputed in one transaction; if that fails, the
    reopens are undone. File locks take the union of old and new rights before narrowing
    (pynbd.graph.locks.transition), so the change never allows what neither state allows."""
    plans = []
    for index, entry in enumerate(args["options"]):
        if not isinstance(entry, dict) or "node-name" not in entry:
            raise QMPError(f"Parameter 'options[{index}].node-name' is missing")
        node = daemon.node(entry["node-name"])
        if entry.get("driver") != node.driver:
            raise QMPError(f"Cannot change the option 'driver' of node '{node.node_name}'")
        plans.append((node, check(DRIVERS[node.driver].spec, entry, f"options[{index}]")))
    reopened: list[tuple[BlockNode, bool]] = []
    try:
        for node, entry in plans:
            read_only = entry.get("read-only", False)
            storage = storage_chain(node)
            # read-write: the file first, so the format can write its metadata; read-only: the format
            # first; a node's file only becomes writable with it, never read-only on its behalf
            for member in storage if read_only else reversed(storage):
                if member.read_only != read_only and (member is node or not read_only):
                    reopened.append((member, member.read_only))
                    await member.reopen(read_only)
        with Transaction() as tran:
            seeds = [node for node, _ in plans]
            for node, entry in plans:
                for name in ("file", "backing"):
                    if name in entry and (entry[name] is None or isinstance(entry[name], str)):
                        child = None if entry[name] is None else daemon.node(entry[name])
                        if (old_child := node.child_node(name)) is not None:
                            seeds.append(old_child)  # it drops what this node held on it
                        daemon.graph.set_child(tran, node, name, child)
            daemon.graph.refresh_perms(tran, seeds)
    except BaseException:
        for member, old in reversed(reopened):
            await member.reopen(old)
        raise
    for member, was_read_only in reversed(reopened):
        if was_read_only:
            await member.start_writing()
