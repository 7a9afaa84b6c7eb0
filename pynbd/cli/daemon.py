"""``pynbd daemon``: a block graph served over NBD and driven over QMP, like qemu-storage-daemon.

Command-line options are applied in order, as qemu-storage-daemon does, each through the same
code as its QMP command: ``--blockdev`` is blockdev-add, ``--nbd-server`` nbd-server-start,
``--export`` block-export-add, ``--object`` object-add.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

log = logging.getLogger("pynbd.daemon")


class OrderedOption(argparse.Action):
    """Keep --blockdev/--export/... in the order given (they depend on one another)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.ordered.append((self.dest, values))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("daemon", help="run a QMP-driven block graph and NBD server", description=__doc__)
    p.set_defaults(ordered=[], func=run)
    p.add_argument("--qmp", action="append", default=[], metavar="unix:PATH|tcp:HOST:PORT", help="QMP monitor")
    for option, meta in (("blockdev", "DEF"), ("nbd-server", "DEF"), ("export", "DEF"), ("object", "DEF")):
        p.add_argument(f"--{option}", dest=option, action=OrderedOption, metavar=meta, default=None)
    p.add_argument("--pid-file", metavar="PATH", help="write the process id here once ready")
    p.add_argument(
        "--qmp-max-message",
        type=positive_size,
        default=None,
        metavar="SIZE",
        help="longest JSON value a QMP client may send, in characters (default 16M)",
    )
    p.add_argument(
        "--qmp-event-buffer",
        type=positive_size,
        default=None,
        metavar="SIZE",
        help="unsent output a QMP client may have queued before new events for it are dropped (default 1M)",
    )


def positive_size(text: str) -> int:
    from pynbd.sizes import parse_size

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return size


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except StartupError as exc:
        print(f"pynbd daemon: {exc}", file=sys.stderr)
        return 1


class StartupError(Exception):
    pass


async def apply_option(daemon, kind: str, text: str) -> None:
    from pynbd.daemon.blockdev import blockdev_add_options
    from pynbd.daemon.exports import EXPORT_SPEC, add_export, start_nbd_server
    from pynbd.daemon.objects import object_add
    from pynbd.qmp import keyval
    from pynbd.qmp.schema import check

    implied = {"object": "qom-type", "export": "type"}.get(kind)
    options, is_keyval = keyval.parse_option(text, implied)
    if kind == "blockdev":
        await blockdev_add_options(daemon, options, keyval=is_keyval)
    elif kind == "nbd-server":
        from pynbd.daemon.exports import NBD_SERVER_SPEC

        await start_nbd_server(daemon, check(NBD_SERVER_SPEC, options, keyval=is_keyval))
    elif kind == "export":
        await add_export(daemon, check(EXPORT_SPEC, options, keyval=is_keyval))
    elif kind == "object":
        await object_add(daemon, options, keyval=is_keyval)


async def serve(args: argparse.Namespace) -> int:
    from pynbd.cli.pidfile import pid_file
    from pynbd.daemon import load_commands
    from pynbd.daemon.core import Daemon
    from pynbd.graph.core import GraphError
    from pynbd.nodes.base import BlockError
    from pynbd.qmp import keyval
    from pynbd.qmp.protocol import QMPError
    from pynbd.qmp.server import QMPServer

    load_commands()
    daemon = Daemon()
    limits = {"max_message": args.qmp_max_message, "event_buffer": args.qmp_event_buffer}
    qmp = QMPServer(daemon, **{name: value for name, value in limits.items() if value is not None})
    try:
        for kind, text in args.ordered:
            try:
                await apply_option(daemon, kind, text)
            except (QMPError, keyval.KeyvalError, GraphError, BlockError, OSError) as exc:  # what QMP would answer
                raise StartupError(f"--{kind} {text}: {exc}") from None
        for spec in args.qmp:
            try:
                await qmp.listen(spec)
            except (OSError, ValueError) as exc:
                raise StartupError(f"--qmp {spec}: {exc}") from None
    except BaseException:
        await daemon.shutdown()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.quit.set)
    with pid_file(args.pid_file):
        await daemon.quit.wait()
        daemon.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        await qmp.close()
        await daemon.shutdown()
    return 0
