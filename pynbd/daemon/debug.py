"""pynbd's own debugging commands (``x-pynbd-*``): not in qemu, for tests and diagnosis.

``x-pynbd-freeze-link`` / ``x-pynbd-unfreeze-link`` hold a child link frozen the way a job does.
qemu freezes with a flag, so two holders cannot share a link; pynbd counts holders, and these
commands make that counter reachable over QMP.
"""

from __future__ import annotations

from pynbd.daemon.core import Daemon
from pynbd.daemon.registry import command
from pynbd.graph.core import ChildLink
from pynbd.qmp.protocol import QMPError

LINK_SPEC = {"node-name": "str", "child": "str"}


def find_link(daemon: Daemon, args: dict) -> ChildLink:
    node = daemon.node(args["node-name"])
    link = node.children.get(args["child"])
    if link is None:
        raise QMPError(f"Node '{node.node_name}' has no child '{args['child']}'")
    return link


@command("x-pynbd-freeze-link", LINK_SPEC)
async def freeze_link(daemon: Daemon, args: dict) -> dict:
    link = find_link(daemon, args)
    link.freeze()
    return {"freeze-count": link.freeze_count}


@command("x-pynbd-unfreeze-link", LINK_SPEC)
async def unfreeze_link(daemon: Daemon, args: dict) -> dict:
    link = find_link(daemon, args)
    link.unfreeze()
    return {"freeze-count": link.freeze_count}
