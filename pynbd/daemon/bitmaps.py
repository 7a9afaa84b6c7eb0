"""Dirty bitmap commands, each also a ``transaction`` action.

Every command prepares its change inside a :class:`Transaction` with its undo registered, so in
a QMP ``transaction`` a failing later action rolls back the bitmaps an earlier one touched, and a
single command is simply a transaction of one. ``block-dirty-bitmap-copy`` is pynbd's own: qemu
copies by adding an empty bitmap and merging into it, which takes two actions.
"""

from __future__ import annotations

from typing import Any

from pynbd.bitmap import DEFAULT_GRANULARITY, NodeBitmap, check_granularity
from pynbd.daemon.core import Daemon
from pynbd.daemon.registry import action, command_from_action
from pynbd.graph.transaction import Transaction
from pynbd.nodes.base import BlockNode
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import Spec, str_or_object

MAX_NAME = 1023
SOURCE = str_or_object({"node": "str", "name": "str"})

ADD_SPEC: Spec = {"node": "str", "name": "str", "*granularity": "uint", "*persistent": "bool", "*disabled": "bool"}
NAME_SPEC: Spec = {"node": "str", "name": "str"}
MERGE_SPEC: Spec = {"node": "str", "target": "str", "bitmaps": [SOURCE]}
COPY_SPEC: Spec = {
    "node": "str",
    "name": "str",
    "source": SOURCE,
    "*persistent": "bool",
    "*disabled": "bool",
}


def lookup(daemon: Daemon, node_name: str, name: str) -> tuple[BlockNode, NodeBitmap]:
    node = daemon.node(node_name)
    bitmap = node.dirty_bitmaps.get(name)
    if bitmap is None:
        raise QMPError(f"Dirty bitmap '{name}' not found")
    return node, bitmap


def check_usable(bitmap: NodeBitmap) -> None:
    """Refuse changes to bitmaps that exports or jobs rely on, or that cannot be trusted."""
    if bitmap.busy:
        raise QMPError(f"Bitmap '{bitmap.name}' is currently in use by another operation and cannot be used")
    if bitmap.inconsistent:
        raise QMPError(
            f"Bitmap '{bitmap.name}' is inconsistent and cannot be used; "
            "try block-dirty-bitmap-remove to delete this bitmap from disk"
        )


def default_granularity(node: BlockNode) -> int:
    """As qemu: the node's cluster size clamped to [4 KiB, 64 KiB], else 64 KiB."""
    cluster = getattr(node, "cluster_size", None)
    if cluster:
        return min(max(cluster, 4096), 65536)
    return DEFAULT_GRANULARITY


def _attach(node: BlockNode, bitmap: NodeBitmap, tran: Transaction) -> None:
    node.dirty_bitmaps[bitmap.name] = bitmap

    def detach() -> None:
        node.dirty_bitmaps.pop(bitmap.name, None)

    tran.add(abort=detach)
    if bitmap.persistent:
        store = getattr(node, "bitmap_added", None)
        if store is not None:  # qcow2 records it (and marks it IN_USE) when the transaction commits
            tran.add(commit=lambda: store(bitmap))


def _check_new(node: BlockNode, name: str, persistent: bool) -> None:
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    if len(name.encode()) > MAX_NAME:
        raise QMPError("Bitmap name is too long")
    if name in node.dirty_bitmaps:
        raise QMPError(f"Bitmap already exists: {name}")
    if persistent and not getattr(node, "can_store_bitmaps", False):
        raise QMPError(f"Cannot store dirty bitmaps in {node.driver} format")


@action("block-dirty-bitmap-add", ADD_SPEC)
async def add_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    node = daemon.node(args["node"])
    persistent = args.get("persistent", False)
    _check_new(node, args["name"], persistent)
    granularity = args.get("granularity", default_granularity(node))
    try:
        check_granularity(granularity)
    except ValueError:
        raise QMPError("Granularity must be power of 2 and at least 512") from None
    bitmap = NodeBitmap(args["name"], node.size, granularity, enabled=not args.get("disabled", False))
    bitmap.persistent = persistent
    _attach(node, bitmap, tran)


@action("block-dirty-bitmap-remove", NAME_SPEC)
async def remove_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    node, bitmap = lookup(daemon, args["node"], args["name"])
    if bitmap.busy:
        check_usable(bitmap)
    del node.dirty_bitmaps[bitmap.name]
    tran.add(abort=lambda: node.dirty_bitmaps.__setitem__(bitmap.name, bitmap))
    if bitmap.persistent:
        drop = getattr(node, "bitmap_removed", None)
        if drop is not None:
            tran.add(commit=lambda: drop(bitmap))


@action("block-dirty-bitmap-clear", NAME_SPEC)
async def clear_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    _, bitmap = lookup(daemon, args["node"], args["name"])
    check_usable(bitmap)
    saved = bitmap.bitmap.bits.copy()
    bitmap.bitmap.clear()
    tran.add(abort=lambda: setattr(bitmap.bitmap, "bits", saved))


def _set_enabled(daemon: Daemon, args: dict, tran: Transaction, enabled: bool) -> None:
    _, bitmap = lookup(daemon, args["node"], args["name"])
    check_usable(bitmap)
    old = bitmap.enabled
    bitmap.enabled = enabled
    tran.add(abort=lambda: setattr(bitmap, "enabled", old))


@action("block-dirty-bitmap-enable", NAME_SPEC)
async def enable_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    _set_enabled(daemon, args, tran, True)


@action("block-dirty-bitmap-disable", NAME_SPEC)
async def disable_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    _set_enabled(daemon, args, tran, False)


def _source(daemon: Daemon, node_name: str, ref: Any) -> NodeBitmap:
    if isinstance(ref, dict):
        return lookup(daemon, ref["node"], ref["name"])[1]
    return lookup(daemon, node_name, ref)[1]


@action("block-dirty-bitmap-merge", MERGE_SPEC)
async def merge_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    _, target = lookup(daemon, args["node"], args["target"])
    check_usable(target)
    sources = [_source(daemon, args["node"], ref) for ref in args["bitmaps"]]
    saved = target.bitmap.bits.copy()
    tran.add(abort=lambda: setattr(target.bitmap, "bits", saved))
    for source in sources:
        if source.inconsistent:
            check_usable(source)
        if source.bitmap.size != target.bitmap.size:
            raise QMPError(f"Bitmap '{source.name}' has a different size than '{target.name}'")
        target.bitmap.merge(source.bitmap)


@action("block-dirty-bitmap-copy", COPY_SPEC)
async def copy_action(daemon: Daemon, args: dict, tran: Transaction) -> None:
    """pynbd extension: a new bitmap with the content (and granularity) of another."""
    node = daemon.node(args["node"])
    source = _source(daemon, args["node"], args["source"])
    if source.inconsistent:
        check_usable(source)
    persistent = args.get("persistent", False)
    _check_new(node, args["name"], persistent)
    if source.bitmap.size != node.size:
        raise QMPError(f"Bitmap '{source.name}' covers {source.bitmap.size} bytes, node has {node.size}")
    copy = NodeBitmap(args["name"], node.size, enabled=not args.get("disabled", False), bitmap=source.bitmap.copy())
    copy.persistent = persistent
    _attach(node, copy, tran)


for _name in (
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "block-dirty-bitmap-copy",
):
    command_from_action(_name)
