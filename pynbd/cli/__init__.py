"""The ``pynbd`` command: one sub-command per tool."""

from __future__ import annotations

import argparse
import logging
import sys

from pynbd.cli import backup, copy, daemon, img, info, serve

COMMANDS = [serve, daemon, info, copy, img, backup]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pynbd", description="NBD server, client and block tools")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (twice for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="pynbd %(name)s: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
