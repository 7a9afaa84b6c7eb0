"""``pynbd serve``: serve one disk over NBD, in the manner of qemu-nbd and nbdkit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from pynbd.cli.pidfile import pid_file
from pynbd.daemon.core import Daemon
from pynbd.daemon.exports import add_export
from pynbd.daemon.open import FORMATS, OpenError, open_image
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.nodes.file import ImageLocked
from pynbd.nodes.memory import MemoryNode
from pynbd.protocol.constants import DEFAULT_PORT
from pynbd.protocol.negotiation import TLSMode
from pynbd.qmp.protocol import QMPError
from pynbd.server.nbd import (
    BUFFER_LIMIT,
    DEFAULT_MAX_CONNECTIONS,
    HANDSHAKE_LIMIT,
    MAX_CONNECTION_BYTES,
    NBDServer,
    ServerConfig,
)
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
    p.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="open the image even while another process writes it (only with --read-only; qemu-img -U)",
    )
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
        "-e",
        "--shared",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"serve at most N clients at once; later ones wait, connected but not greeted, "
        f"until one leaves (default {DEFAULT_MAX_CONNECTIONS}; 0: no limit)",
    )
    p.add_argument(
        "--handshake-limit",
        type=float,
        default=HANDSHAKE_LIMIT,
        metavar="SECONDS",
        help=f"disconnect a client that has not finished negotiation after SECONDS "
        f"(default {HANDSHAKE_LIMIT:g}; 0: no limit; as qemu-nbd 10.0)",
    )
    p.add_argument(
        "--max-in-flight-bytes",
        type=parse_size,
        default=MAX_CONNECTION_BYTES,
        metavar="SIZE",
        help="READ/WRITE payload one client may have in flight; beyond it the server reads no more "
        "of its requests until replies have gone out (default 64M)",
    )
    p.add_argument(
        "--buffer-limit",
        type=parse_size,
        default=BUFFER_LIMIT,
        metavar="SIZE",
        help="payload buffers in use at once, all clients together; beyond it clients wait (default 128M)",
    )
    p.add_argument("--once", action="store_true", help="exit after the first client disconnects")
    p.add_argument("--tls", choices=[m.value for m in TLSMode], default=None, help="TLS mode (default: off)")
    p.add_argument("--tls-creds", metavar="DIR", help="directory with ca-cert.pem, server-cert.pem, server-key.pem")
    p.add_argument("--tls-verify-peer", action="store_true", help="require client certificates")
    p.add_argument("--pid-file", metavar="PATH", help="write the process id here once listening")
    p.set_defaults(func=run)


NODE_NAME = "disk"


async def open_disk(daemon: Daemon, args: argparse.Namespace) -> BlockNode:
    """The served node, opened as qemu-nbd opens its image (pynbd.daemon.open: image locks,
    backing chain), or an in-memory disk."""
    if args.file and args.memory:
        raise SystemExit("pynbd serve: give FILE or --memory, not both")
    if args.file:
        image = await open_image(
            args.file,
            args.format,
            read_only=args.read_only,
            force_share=args.force_share,
            user="qemu-nbd",
            node_name=NODE_NAME,
            daemon=daemon,
        )
        return image.node
    if args.force_share:
        raise SystemExit("pynbd serve: --force-share is for image files")
    return daemon.graph.add_node(MemoryNode(parse_size(args.memory or DEFAULT_MEMORY_SIZE), node_name=NODE_NAME))


def export_options(args: argparse.Namespace) -> dict:
    """block-export-add's arguments for what the command line asks (qemu-nbd does the same)."""
    options: dict = {
        "type": "nbd",
        "id": NODE_NAME,
        "node-name": NODE_NAME,
        "name": args.export_name,
        "description": args.description,
        "writable": not args.read_only,
        "bitmaps": args.bitmap,  # looked up down the backing chain, as qemu-nbd does
    }
    if args.allocation_depth:
        options["allocation-depth"] = True
    return options


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
    except OpenError as exc:  # qemu-nbd's words, and its hint on a second line
        print(f"pynbd serve: {exc.report('Failed to blk_new_open')}", file=sys.stderr)
        return 1
    except ImageLocked as exc:
        print(f"pynbd serve: {exc}\n{exc.hint}", file=sys.stderr)
        return 1
    except (BlockError, QMPError, TLSConfigError, OSError, ValueError) as exc:
        print(f"pynbd serve: {exc}", file=sys.stderr)
        return 1


def server_config(args: argparse.Namespace, tls_mode: TLSMode, tls_context) -> ServerConfig:
    if args.shared < 0:
        raise ValueError(f"--shared {args.shared}: give 0 (no limit) or a number of clients")
    if not 0 <= args.handshake_limit < 1e9:
        raise ValueError(f"--handshake-limit {args.handshake_limit:g}: give 0 (no limit) or seconds")
    if args.max_in_flight_bytes < 1 or args.buffer_limit < 1:
        raise ValueError("--max-in-flight-bytes and --buffer-limit must be at least 1 byte")
    return ServerConfig(
        tls_mode=tls_mode,
        tls_context=tls_context,
        max_connections=args.shared,
        handshake_limit=args.handshake_limit,
        max_connection_bytes=args.max_in_flight_bytes,
        buffer_limit=args.buffer_limit,
    )


async def serve(args: argparse.Namespace) -> int:
    tls_mode = TLSMode(args.tls) if args.tls else (TLSMode.REQUIRED if args.tls_creds else TLSMode.OFF)
    tls_context = None
    if tls_mode is not TLSMode.OFF:
        if not args.tls_creds:
            raise TLSConfigError("--tls needs --tls-creds DIR")
        tls_context = server_context(args.tls_creds, verify_peer=args.tls_verify_peer)
    daemon = Daemon()
    try:
        node = await open_disk(daemon, args)
        server = NBDServer(daemon.registry, server_config(args, tls_mode, tls_context))
        daemon.nbd_server = server
        export = (await add_export(daemon, export_options(args))).export
        activated = activation_socket()
        if activated is not None:
            server.listen_socket(activated)
        elif args.socket:
            server.listen_unix(args.socket)
        else:
            server.listen_tcp(args.bind or "127.0.0.1", args.port)
    except BaseException:
        await daemon.shutdown()  # nothing half-open stays behind (a read-write qcow2 is closed cleanly)
        raise
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
        await daemon.shutdown()  # the server, the export, then the nodes (formats before files)
    return 0
