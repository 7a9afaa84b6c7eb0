"""``pynbd copy SRC DST``: copy a disk between NBD exports, raw files and pipes, sparsely.

SRC and DST are NBD URIs, raw files, ``-`` (stdin / stdout) or, for DST, ``null:``; either may
also be a server command in brackets, started with socket activation:
``pynbd copy -- [ nbdkit memory 1G ] out.raw``. Holes in the source (``base:allocation``,
SEEK_HOLE) and all-zero blocks become zero requests on the target, or nothing when the target
already reads as zeroes, so sparse images stay sparse.

    pynbd copy nbd://host/disk disk.raw
    pynbd copy --connections 4 --requests 32 disk.raw nbd+unix:///?socket=/tmp/s
    pynbd copy --bitmap b0 nbd://host/disk backup.raw     # only the dirty clusters of bitmap b0
    pynbd copy --progress nbd://host/disk null:
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from pynbd.client.copy import DEFAULT_REQUESTS, CopyError, CopyOptions, copy
from pynbd.client.errors import NBDConnectionError, OptionError
from pynbd.client.uri import URIError
from pynbd.protocol.constants import DIRTY_BITMAP_PREFIX
from pynbd.sizes import parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "copy", help="copy between NBD exports, raw files and pipes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("ends", nargs="+", metavar="SRC DST", help="source and destination")
    p.add_argument("-C", "--connections", type=int, default=4, help="connections per NBD end (multi-conn servers)")
    p.add_argument("-R", "--requests", type=int, default=DEFAULT_REQUESTS, help="requests in flight per connection")
    p.add_argument("--request-size", default="1M", metavar="SIZE", help="bytes per read/write request (1M)")
    p.add_argument("--flush", action="store_true", help="flush the destination at the end")
    p.add_argument("--target-is-zero", action="store_true", help="the destination already reads as zeroes")
    p.add_argument("--allocated", action="store_true", help="zero NBD targets with allocated blocks, not holes")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--bitmap", metavar="NAME", help="copy only what qemu:dirty-bitmap:NAME marks dirty")
    which.add_argument("--map-context", metavar="CTX", help="copy only what meta context CTX marks (bit 0)")
    p.add_argument("-p", "--progress", action="store_true", help="show a progress bar on stderr")
    p.add_argument("--progress-fd", type=int, metavar="FD", help='write "done/total" byte counts as lines to FD')
    p.set_defaults(func=run)


def split_ends(words: list[str]) -> list[str | list[str]]:
    """SRC and DST from the words: each a single word or a bracketed server command."""
    ends: list[str | list[str]] = []
    i = 0
    while i < len(words):
        if words[i] == "[":
            try:
                close = words.index("]", i + 1)
            except ValueError:
                raise ValueError("'[' without a matching ']' around a server command") from None
            if close == i + 1:
                raise ValueError("empty server command in [ ]")
            ends.append(words[i + 1 : close])
            i = close + 1
        else:
            ends.append(words[i])
            i += 1
    if len(ends) != 2:
        raise ValueError(f"expected SRC and DST, got {len(ends)} argument(s)")
    return ends


def run(args: argparse.Namespace) -> int:
    try:
        src, dst = split_ends(args.ends)
        context = DIRTY_BITMAP_PREFIX + args.bitmap if args.bitmap else args.map_context
        options = CopyOptions(
            connections=max(1, args.connections),
            requests=max(1, args.requests),
            request_size=parse_size(args.request_size),
            flush=args.flush,
            target_is_zero=args.target_is_zero,
            allocated=args.allocated,
            map_context=context,
            progress_bar=args.progress,
            progress_fd=args.progress_fd,
        )
        if args.progress_fd is not None:
            os.fstat(args.progress_fd)  # fail early on a bad descriptor
        asyncio.run(copy(src, dst, options))
        return 0
    except (CopyError, OSError, NBDConnectionError, OptionError, URIError, ValueError) as exc:
        print(f"pynbd copy: {exc}", file=sys.stderr)
        return 1
