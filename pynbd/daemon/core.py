"""The daemon: one block graph, one NBD server, exports, objects and jobs, driven over QMP.

It is the counterpart of qemu-storage-daemon. Command modules (``blockdev``, ``exports``,
``objects``, ``misc``) register their QMP handlers in :mod:`pynbd.daemon.registry`; the daemon
checks arguments against each command's spec and dispatches.

Commands run one at a time across all monitors, as under qemu's big lock: a command that waits
(closing an image, draining requests, connecting to an NBD server) finishes before any other
monitor's command starts, so none sees another's change half-done. No command waits for a job to
finish (jobs run on their own and report by events), and events are sent without waiting for the
clients to read them, so a job or a slow client never holds the other monitors up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pynbd.daemon.registry import COMMANDS
from pynbd.graph.core import BlockGraph, ChildLink, GraphError
from pynbd.graph.io import drained
from pynbd.jobs.core import JobError, JobManager
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import check
from pynbd.server.export import ExportRegistry
from pynbd.server.nbd import NBDServer

log = logging.getLogger("pynbd.daemon")

VERSION = (7, 2, 0)  # the qemu-storage-daemon QMP dialect we speak
PACKAGE = "pynbd 0.1.0"


class Monitor:
    """One QMP connection, as the daemon sees it: the holds it took, which only it may drop and
    which go when it disconnects (a client cannot leave a link frozen behind it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frozen_links: list[ChildLink] = []  # one entry per x-pynbd-freeze-link (a link may repeat)

    def release(self) -> None:
        for link in reversed(self.frozen_links):
            link.unfreeze(self.name)
        self.frozen_links.clear()


class Daemon:
    def __init__(self) -> None:
        self.graph = BlockGraph()
        self.registry = ExportRegistry()
        self.nbd_server: NBDServer | None = None
        self.exports: dict[str, Any] = {}  # export id -> DaemonExport (pynbd.daemon.exports)
        self.objects: dict[str, Any] = {}  # object id -> object (pynbd.daemon.objects)
        self.monitor_owned: set[str] = set()  # node-names added by blockdev-add (deletable)
        # one command at a time, across all monitors (FIFO); jobs take it for their graph changes
        self.command_lock = asyncio.Lock()
        self.jobs = JobManager(emit=self.emit, graph_lock=self.command_lock, after_graph_change=self.release_orphans)
        self._listeners: list[Callable[[str, dict], None]] = []
        self.quit = asyncio.Event()
        self.caller: Monitor | None = None  # the monitor whose command runs (None: the command line)

    # -- events ---------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str, dict], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, event: str, data: dict | None = None) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, data or {})
            except Exception:
                log.exception("event listener failed")

    # -- commands -------------------------------------------------------------------------------

    async def execute(self, name: str, arguments: Any, keyval: bool = False, monitor: Monitor | None = None) -> Any:
        """Run one QMP command for ``monitor``, once no other command is running; every refusal
        is a QMPError and leaves the daemon as it was."""
        async with self.command_lock:
            self.caller = monitor
            try:
                return await self._execute(name, arguments, keyval)
            finally:
                self.caller = None
                await self.release_orphans()

    async def release_orphans(self) -> None:
        """Close the nodes a command or a job's end left without any user that the monitor does
        not own (pynbd.daemon.blockdev.release_orphans); a failure is logged, never raised."""
        from pynbd.daemon.blockdev import release_orphans  # local: blockdev imports core

        try:
            await release_orphans(self)
        except Exception:
            log.exception("closing nodes nobody uses failed")

    async def _execute(self, name: str, arguments: Any, keyval: bool) -> Any:
        cmd = COMMANDS.get(name)
        if cmd is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        args = arguments if arguments is not None else {}
        if cmd.spec is not None:
            args = check(cmd.spec, args, keyval=keyval)
        elif not isinstance(args, dict):
            raise QMPError("Invalid parameter type for 'arguments', expected: object")
        try:
            if cmd.drained:
                async with drained(self.graph.nodes.values()):
                    result = await cmd.handler(self, args)
            else:
                result = await cmd.handler(self, args)
        except QMPError:
            raise
        except (GraphError, BlockError, JobError) as exc:
            raise QMPError(str(exc)) from None
        except OSError as exc:
            raise QMPError(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")) from None
        return {} if result is None else result

    def node(self, name: str) -> BlockNode:
        node = self.graph.nodes.get(name)
        if node is None:
            raise QMPError(f"Cannot find device={name} nor node-name={name}", "GenericError")
        return node

    # -- shutdown -------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop serving, cancel jobs, and close every node (parents before children) cleanly."""
        if self.nbd_server is not None:
            await self.nbd_server.shutdown()
            self.nbd_server = None
        await self.jobs.cancel_all()
        from pynbd.daemon.exports import remove_export  # local: exports imports core

        for export_id in list(self.exports):
            await remove_export(self, export_id, hard=True, emit=False)
        await close_all_nodes(self.graph)


async def close_all_nodes(graph: BlockGraph) -> None:
    """Close nodes top-down so formats write their metadata before their files close."""
    remaining = dict(graph.nodes)
    while remaining:
        tops = [
            n
            for n in remaining.values()
            if not any(not lk.is_root and lk.parent in remaining.values() for lk in n.parents)
        ]
        if not tops:  # should not happen (the graph is acyclic); close the rest anyway
            tops = list(remaining.values())
        for node in tops:
            try:
                await node.close()
            except Exception:
                log.exception("closing node %s failed", node.node_name)
            remaining.pop(node.node_name, None)
