"""``pynbd serve``: serve one disk over NBD, in the manner of qemu-nbd and nbdkit."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sys

from pynbd.cli.pidfile import pid_file
from pynbd.graph.core import ChildLink, GraphUser
from pynbd.graph.perms import ALL, Perm, Role
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.memory import MemoryNode
from pynbd.nodes.open import FORMATS, open_image
from pynbd.protocol.constants import DEFAULT_PORT
from pynbd.protocol.negotiation import TLSMode
from pynbd.server.export import Export, ExportRegistry
from pynbd.server.nbd import NBDServer, ServerConfig
from pynbd.sizes import parse_size
from pynbd.tls import TLSConfigError, server_context

log = logging.getLogger("pynbd.serve")

DEFAULT_MEMORY_SIZE = "1G"
SD_LISTEN_FDS_START = 3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a disk over NBD", description=__doc__)
    p.add_argument(
        "file", nargs="?", metavar="FILE", help="raw or qcow2 image, or block device (default: in-memory disk)"
    )
    p.add_argument("--memory", metavar="SIZE", help="serve a sparse in-memory disk of SIZE (e.g. 1G)")
    p.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    p.add_argument("-f", "--format", choices=FORMATS, help="image format (default: probed, as qemu-nbd)")
    p.add_argument(
        "-B",
        "--bitmap",
        action="append",
        default=[],
        metavar="NAME",
        help="export the image's dirty bitmap NAME as qemu:dirty-bitmap:NAME (repeatable; qemu-nbd -B)",
    )
    p.add_argument("-A", "--allocation-depth", action="store_true", help="export qemu:allocation-depth (qemu-nbd -A)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-k", "--socket", metavar="PATH", help="listen on a Unix socket")
    where.add_argument("-b", "--bind", metavar="ADDR", help="TCP address (default 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("-x", "--export-name", default="", metavar="NAME", help="export name (default: empty)")
    p.add_argument("-D", "--description", default="", metavar="TEXT", help="export description")
    p.add_argument(
        "-e", "--shared", type=int, default=0, metavar="N", help="serve at most N clients at once (0: unlimited)"
    )
    p.add_argument("--once", action="store_true", help="exit after the first client disconnects")
    p.add_argument("--tls", choices=[m.value for m in TLSMode], default=None, help="TLS mode (default: off)")
    p.add_argument("--tls-creds", metavar="DIR", help="directory with ca-cert.pem, server-cert.pem, server-key.pem")
    p.add_argument("--tls-verify-peer", action="store_true", help="require client certificates")
    p.add_argument("--pid-file", metavar="PATH", help="write the process id here once listening")
    p.set_defaults(func=run)


async def open_node(args: argparse.Namespace) -> BlockNode:
    if args.file and args.memory:
        raise SystemExit("pynbd serve: give FILE or --memory, not both")
    if args.file:
        return await open_image(args.file, args.format, read_only=args.read_only, node_name="disk")
    return MemoryNode(parse_size(args.memory or DEFAULT_MEMORY_SIZE), node_name="disk")


def add_contexts(export: Export, node: BlockNode, args: argparse.Namespace) -> None:
    """-A and -B: the bitmap is looked up down the backing chain, as qemu-nbd does."""
    if args.allocation_depth:
        export.add_allocation_depth()
    for name in args.bitmap:
        current: BlockNode | None = node
        while current is not None and name not in current.dirty_bitmaps:
            current = getattr(current, "backing", None)
        if current is None:
            raise BlockError(errno.ENOENT, f"Bitmap '{name}' is not found")
        export.add_bitmap(name, current.dirty_bitmaps[name])


def activation_socket() -> socket.socket | None:
    """The listening socket systemd-style socket activation passed us (LISTEN_PID/LISTEN_FDS)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except (BlockError, TLSConfigError, OSError, ValueError) as exc:
        print(f"pynbd serve: {exc}", file=sys.stderr)
        return 1


async def serve(args: argparse.Namespace) -> int:
    tls_mode = TLSMode(args.tls) if args.tls else (TLSMode.REQUIRED if args.tls_creds else TLSMode.OFF)
    tls_context = None
    if tls_mode is not TLSMode.OFF:
        if not args.tls_creds:
            raise TLSConfigError("--tls needs --tls-creds DIR")
        tls_context = server_context(args.tls_creds, verify_peer=args.tls_verify_peer)
    node = await open_node(args)
    try:
        export = Export(args.export_name, node, description=args.description, read_only=args.read_only)
        # requests go through a link, so the request gate marks bitmaps and tracks them (not yet
        # attached in a graph: serve takes no permissions or locks until it opens through one)
        user = GraphUser(args.export_name, "block-backend", f"export {args.export_name!r}")
        perm = Perm.CONSISTENT_READ if export.read_only else Perm.CONSISTENT_READ | Perm.WRITE
        export.link = ChildLink(user, user.name, node, Role(0), perm, ALL & ~Perm.RESIZE)
        add_contexts(export, node, args)
    except BaseException:
        await node.close()
        raise
    server = NBDServer(
        ExportRegistry([export]),
        ServerConfig(tls_mode=tls_mode, tls_context=tls_context, max_connections=args.shared),
    )
    activated = activation_socket()
    if activated is not None:
        server.listen_socket(activated)
    elif args.socket:
        server.listen_unix(args.socket)
    else:
        server.listen_tcp(args.bind or "127.0.0.1", args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.create_task(stop.wait())]
    if args.once:
        waiters.append(asyncio.create_task(server.client_gone.wait()))
    log.info("serving %s (%d bytes) as export %r", node.describe(), node.size, export.name)
    with pid_file(args.pid_file):
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in waiters:
            task.cancel()
        await server.shutdown()
        await node.close()
    return 0
