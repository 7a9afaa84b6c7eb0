"""The ``pynbd`` command: one sub-command per tool.

Only the chosen sub-command's module is imported (a tool's start-up time is part of every copy
and every backup a script runs); the others appear in ``--help`` by their one-line summary.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "serve": ("pynbd.cli.serve", "serve a disk over NBD"),
    "daemon": ("pynbd.cli.daemon", "run a QMP-driven block graph and NBD server"),
    "info": ("pynbd.cli.info", "show an NBD export's size, flags, contexts and map"),
    "copy": ("pynbd.cli.copy", "copy between NBD exports, files and pipes, sparsely"),
    "img": ("pynbd.cli.img", "create, inspect, check and convert images (qemu-img style)"),
    "backup": ("pynbd.cli.backup", "pull full and incremental backups from an NBD export"),
}


def _chosen(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is one)."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pynbd", description="NBD server, client and block tools")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (twice for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for name, (module, summary) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="pynbd %(name)s: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
