"""Switching nodes between read-only and read-write while the graph is live.

A commit writes into a base that was opened read-only (as backing files are); like qemu, the job
reopens it read-write for its duration and back afterwards. The permission refresh that follows a
reopen goes through the same transaction as any graph change, and file nodes take their new locks
by first holding the union of old and new (pynbd.graph.locks.transition), so the change never
passes through a state that allows what neither side allows.
"""

from __future__ import annotations

from collections.abc import Callable

from pynbd.graph.core import BlockGraph
from pynbd.graph.io import drained
from pynbd.graph.transaction import Transaction
from pynbd.nodes.base import BlockNode


def storage_chain(node: BlockNode) -> list[BlockNode]:
    """The node and the nodes below it through ``file`` links (format, then protocol)."""
    nodes = [node]
    while (child := nodes[-1].child_node("file")) is not None:
        nodes.append(child)
    return nodes


async def set_read_only(
    graph: BlockGraph, node: BlockNode, read_only: bool, inherits: Callable[[BlockNode], bool] | None = None
) -> list[BlockNode]:
    """Reopen ``node`` and its storage read-only or read-write, drained; returns the nodes that
    changed. Read-write: the file first, then the format, then the permissions and locks, and
    only then the format's first writes (start_writing). Read-only: the format first.

    ``inherits`` limits the storage that follows: as qemu's reopen queue, which takes along only
    the children that inherit their options from the node (made with it, inline), the reopen
    stops at the first storage node for which it is false (one added on its own, which merely
    loses the permissions the node held on it)."""
    chain = storage_chain(node)
    if inherits is not None:
        below = next((i for i, n in enumerate(chain[1:], 1) if not inherits(n)), len(chain))
        chain = chain[:below]
    changed = [n for n in chain if n.read_only != read_only]
    await _reopen(graph, changed, read_only)
    return changed


async def restore(graph: BlockGraph, nodes: list[BlockNode], read_only: bool) -> None:
    """Undo :func:`set_read_only` for the nodes it changed."""
    await _reopen(graph, nodes, read_only)


async def _reopen(graph: BlockGraph, nodes: list[BlockNode], read_only: bool) -> None:
    if not nodes:
        return
    async with drained(nodes):
        for n in nodes if read_only else reversed(nodes):
            await n.reopen(read_only)
        with Transaction() as tran:
            graph.refresh_perms(tran, [nodes[0]])
        if not read_only:
            for n in reversed(nodes):
                await n.start_writing()
