"""The NBD server and its exports under QMP: nbd-server-start/stop, block-export-add/del/query.

An export is a graph user: it holds CONSISTENT_READ (and WRITE when writable) on its node and
shares everything but RESIZE, as qemu's NBD exports do, so graph permission rules apply to it
like to any parent.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from pynbd.daemon.blockdev import SOCKET_ADDRESS
from pynbd.daemon.core import Daemon
from pynbd.daemon.objects import NO_IOTHREADS, tls_server_context
from pynbd.daemon.open import nbd_export_perm
from pynbd.daemon.registry import command
from pynbd.graph.core import ChildLink, GraphUser
from pynbd.graph.io import drained
from pynbd.graph.perms import Perm
from pynbd.protocol.negotiation import TLSMode
from pynbd.qmp.protocol import QMPError
from pynbd.qmp.schema import Spec, str_or_object
from pynbd.server.export import Export
from pynbd.server.nbd import NBDServer, ServerConfig

ADDRESS: Spec = {**SOCKET_ADDRESS, "*data": "any"}  # also SocketAddressLegacy (QMP's {type, data})
#: nbd-server-start and --nbd-server: qemu 7.2's arguments, handshake-max-seconds as qemu 10.0
#: has it, and pynbd's memory limits (docs/qmp.md)
NBD_SERVER_SPEC: Spec = {
    "addr": ADDRESS,
    "*tls-creds": "str",
    "*tls-authz": "str",
    "*max-connections": "uint32",
    "*handshake-max-seconds": "uint32",
    "*x-max-in-flight-bytes": "uint",
    "*x-buffer-limit": "uint",
}
BITMAP_REF = str_or_object({"node": "str", "name": "str"})


@dataclass
class DaemonExport:
    id: str
    export: Export
    user: GraphUser
    link: ChildLink
    bitmaps: list[Any]


def flatten_address(addr: dict) -> dict:
    """Accept both SocketAddressLegacy (QMP: {type, data: {...}}) and SocketAddress (CLI: flat)."""
    if "data" in addr:
        data = addr["data"]
        if not isinstance(data, dict):
            raise QMPError("Invalid parameter type for 'addr.data', expected: object")
        return {"type": addr["type"], **data}
    return addr


@command("nbd-server-start", NBD_SERVER_SPEC)
async def nbd_server_start(daemon: Daemon, args: dict) -> None:
    await start_nbd_server(daemon, args)


async def start_nbd_server(daemon: Daemon, args: dict) -> None:
    if daemon.nbd_server is not None:
        raise QMPError("NBD server already running")
    addr = flatten_address(args["addr"])
    tls_context = None
    if "tls-creds" in args:
        tls_context = tls_server_context(daemon, args["tls-creds"])
    for name in ("x-max-in-flight-bytes", "x-buffer-limit"):
        if args.get(name) == 0:
            raise QMPError(f"Parameter '{name}' must be at least 1")
    defaults = ServerConfig()
    config = ServerConfig(
        tls_mode=TLSMode.REQUIRED if tls_context else TLSMode.OFF,
        tls_context=tls_context,
        max_connections=args.get("max-connections", defaults.max_connections),
        handshake_limit=args.get("handshake-max-seconds", defaults.handshake_limit),
        max_connection_bytes=args.get("x-max-in-flight-bytes", defaults.max_connection_bytes),
        buffer_limit=args.get("x-buffer-limit", defaults.buffer_limit),
    )
    server = NBDServer(daemon.registry, config)
    try:
        if addr["type"] == "unix":
            if "path" not in addr:
                raise QMPError("Parameter 'addr.path' is missing")
            server.listen_unix(addr["path"])
        elif addr["type"] == "inet":
            if "host" not in addr or "port" not in addr:
                raise QMPError("Parameters 'addr.host' and 'addr.port' are required")
            server.listen_tcp(addr["host"], int(addr["port"]))
        elif addr["type"] == "fd" and "str" in addr:  # an inherited listening socket
            server.listen_socket(socket.socket(fileno=int(addr["str"])))
        else:
            raise QMPError(f"NBD server address type '{addr['type']}' is not supported")
    except OSError as exc:
        await server.stop_listening()
        raise QMPError(f"Failed to bind socket: {exc.strerror}") from None
    daemon.nbd_server = server


@command("nbd-server-stop", {})
async def nbd_server_stop(daemon: Daemon, args: dict) -> None:
    if daemon.nbd_server is None:
        raise QMPError("NBD server not running")
    server, daemon.nbd_server = daemon.nbd_server, None
    for export_id in list(daemon.exports):  # qemu removes the NBD exports with the server
        await remove_export(daemon, export_id, hard=True)
    await server.shutdown()


EXPORT_SPEC: Spec = {
    "type": ("nbd", "fuse", "vhost-user-blk", "vduse-blk"),
    "id": "str",
    "node-name": "str",
    "*writable": "bool",
    "*writethrough": "bool",
    "*iothread": "str",
    "*fixed-iothread": "bool",
    "*name": "str",
    "*description": "str",
    "*bitmaps": [BITMAP_REF],
    "*allocation-depth": "bool",
}


@command("block-export-add", EXPORT_SPEC)
async def block_export_add(daemon: Daemon, args: dict) -> None:
    await add_export(daemon, args)


async def add_export(daemon: Daemon, args: dict) -> DaemonExport:
    if args["type"] != "nbd":
        raise QMPError(f"Export type '{args['type']}' is not supported")
    if "iothread" in args:
        raise QMPError(f"Parameter 'iothread' is not supported: {NO_IOTHREADS}")
    if args.get("fixed-iothread"):
        raise QMPError(f"Parameter 'fixed-iothread' is not supported: {NO_IOTHREADS}")
    if daemon.nbd_server is None:
        raise QMPError("NBD server not running")
    export_id = args["id"]
    if export_id in daemon.exports:
        raise QMPError(f"Block export id '{export_id}' is already in use")
    node = daemon.node(args["node-name"])
    name = args.get("name", args["node-name"])
    if daemon.registry.lookup(name) is not None:
        raise QMPError(f"NBD server already has export named '{name}'")
    if len(name.encode()) > 4096:
        raise QMPError("export name too long to send to clients")
    writable = args.get("writable", False)
    if writable and node.read_only:
        raise QMPError("Cannot export a read-only node as writable")
    bitmaps = [resolve_bitmap(daemon, node, ref, writable) for ref in args.get("bitmaps", [])]
    user = GraphUser(export_id, "block-backend", f"NBD export {export_id!r}")
    link = daemon.graph.attach_user(user, node, *nbd_export_perm(writable))
    export = Export(name, node, description=args.get("description", ""), read_only=not writable)
    export.link = link
    max_connections = daemon.nbd_server.config.max_connections
    export.multi_conn = max_connections != 1
    if args.get("allocation-depth"):
        export.add_allocation_depth()
    for bitmap_name, bitmap in bitmaps:
        export.add_bitmap(bitmap_name, bitmap)
        _set_busy(bitmap, +1)
    daemon.registry.add(export)
    entry = DaemonExport(export_id, export, user, link, [b for _, b in bitmaps])
    daemon.exports[export_id] = entry
    return entry


def resolve_bitmap(daemon: Daemon, node, ref: Any, writable: bool):
    """Find an exported bitmap: by {node, name}, or by name down the node's filter/COW chain."""
    from pynbd.daemon.blockdev import chain_below

    if isinstance(ref, dict):
        candidates, name = [daemon.node(ref["node"])], ref["name"]
    else:
        candidates, name = chain_below(node), ref
    for candidate in candidates:
        bitmaps = getattr(candidate, "dirty_bitmaps", {})
        if name in bitmaps:
            bitmap = bitmaps[name]
            if getattr(bitmap, "inconsistent", False):
                raise QMPError(f"Bitmap '{name}' is inconsistent and cannot be used")
            if getattr(bitmap, "enabled", False) and not writable and candidate_is_written(candidate):
                raise QMPError(f"Enabled bitmap '{name}' incompatible with readonly export")
            return name, bitmap
    raise QMPError(f"Bitmap '{name}' is not found")


def candidate_is_written(node) -> bool:
    return bool(node.perm & Perm.WRITE) or not node.read_only


def _set_busy(bitmap, delta: int) -> None:
    if hasattr(bitmap, "busy_count"):
        bitmap.busy_count += delta


async def remove_export(daemon: Daemon, export_id: str, hard: bool = False, emit: bool = True) -> None:
    entry = daemon.exports.get(export_id)
    if entry is None:
        raise QMPError(f"Export '{export_id}' is not found")
    server = daemon.nbd_server
    clients = [c for c in server.connections if c.export is entry.export] if server else []
    if clients and not hard:
        raise QMPError(f"export '{export_id}' still in use (use mode='hard' to force client disconnect)")
    daemon.registry.remove(entry.export.name)
    if server is not None:
        await server.close_export(entry.export)
    async with drained([entry.link.node]):
        daemon.graph.detach(entry.link)
    for bitmap in entry.bitmaps:
        _set_busy(bitmap, -1)
    del daemon.exports[export_id]
    if emit:
        daemon.emit("BLOCK_EXPORT_DELETED", {"id": export_id})


@command("block-export-del", {"id": "str", "*mode": ("safe", "hard")})
async def block_export_del(daemon: Daemon, args: dict) -> None:
    await remove_export(daemon, args["id"], hard=args.get("mode") == "hard")


@command("query-block-exports", {})
async def query_block_exports(daemon: Daemon, args: dict) -> list:
    return [
        {"type": "nbd", "id": e.id, "node-name": e.link.node.node_name, "shutting-down": False}
        for e in reversed(daemon.exports.values())  # newest first, as qemu lists them
    ]
