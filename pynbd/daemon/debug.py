"""pynbd's own debugging commands (``x-pynbd-*``): not in qemu, for tests and diagnosis.

``x-pynbd-freeze-link`` / ``x-pynbd-unfreeze-link`` hold a child link frozen the way a job does.
qemu freezes with a flag, so two holders cannot share a link; pynbd lets holders that need the
link unchanged share it, and these commands make that reachable over QMP (a link a job will
change on completion cannot be held). A hold belongs to the monitor that took it: only
that monitor can drop it, and it goes when that monitor disconnects, so a client can neither pull
a running job's freeze from under it nor leave a link frozen behind it.
"""

from __future__ import annotations

from pynbd.daemon.core import Daemon, Monitor
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


def calling_monitor(daemon: Daemon, command_name: str) -> Monitor:
    if daemon.caller is None:
        raise QMPError(f"{command_name} needs a QMP monitor to own the hold")
    return daemon.caller


@command("x-pynbd-freeze-link", LINK_SPEC)
async def freeze_link(daemon: Daemon, args: dict) -> dict:
    monitor = calling_monitor(daemon, "x-pynbd-freeze-link")
    link = find_link(daemon, args)
    link.freeze(monitor.name)  # a hold that needs the link unchanged: refused if a job will change it
    monitor.frozen_links.append(link)
    return {"freeze-count": link.freeze_count}


@command("x-pynbd-unfreeze-link", LINK_SPEC)
async def unfreeze_link(daemon: Daemon, args: dict) -> dict:
    monitor = calling_monitor(daemon, "x-pynbd-unfreeze-link")
    link = find_link(daemon, args)
    if link not in monitor.frozen_links:  # links compare by identity
        if link.frozen:
            raise QMPError(
                f"Link '{args['child']}' of node '{args['node-name']}' is frozen {link.freeze_count} time(s), "
                "none of them by this monitor: a monitor may drop only the holds it took itself"
            )
        raise QMPError(f"Link '{args['child']}' of node '{args['node-name']}' is not frozen")
    monitor.frozen_links.remove(link)
    link.unfreeze(monitor.name)
    return {"freeze-count": link.freeze_count}
