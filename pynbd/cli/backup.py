"""``pynbd backup``: pull backups from an NBD export into a chain of qcow2 files, and verify them.

    pynbd backup full URI OUTPUT.qcow2
    pynbd backup incremental URI --bitmap NAME --base PREVIOUS.qcow2 OUTPUT.qcow2
    pynbd backup verify URI CHAIN_TOP.qcow2

A full backup copies what base:allocation reports as data into a new, sparse qcow2 of the
export's size. An incremental backup copies only what qemu:dirty-bitmap:NAME marks dirty
(dirty ranges that now read as zeroes become zero clusters, so restores are byte-exact) into a
new qcow2 whose backing file is PREVIOUS.qcow2, by a relative name. Restore any backup with
`qemu-img convert -O raw TOP.qcow2 disk.raw` or by serving it and using `pynbd copy`.

verify reads the chain through pynbd's qcow2 driver and compares it with the export; it exits
with 0 if they are identical, 1 at the first difference (reported as a byte range), 2 on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from pynbd.backup.pull import EXPECTED_ERRORS, BackupOptions, BackupResult, full_backup, incremental_backup
from pynbd.backup.verify import VerifyOptions, verify_chain
from pynbd.client.copy import DEFAULT_REQUESTS
from pynbd.client.errors import OptionError
from pynbd.sizes import parse_size


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", metavar="URI", help="the export: nbd://host/name, nbd+unix:///name?socket=PATH, nbds://...")
    p.add_argument("-C", "--connections", type=int, default=4, help="connections (if the server allows multi-conn)")
    p.add_argument("-R", "--requests", type=int, default=DEFAULT_REQUESTS, help="requests in flight per connection")
    p.add_argument("--request-size", default="1M", metavar="SIZE", help="bytes per read request (1M)")
    p.add_argument("-p", "--progress", action="store_true", help="show a progress bar on stderr")
    p.add_argument("--progress-fd", type=int, metavar="FD", help='write "done/total" byte counts as lines to FD')
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _writer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-size", default="64K", metavar="SIZE", help="cluster size of the new qcow2 (64K)")
    p.add_argument("-f", "--force", action="store_true", help="replace OUTPUT if it exists")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup", help="full and incremental backups of NBD exports into qcow2 chains", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    kinds = p.add_subparsers(dest="kind", required=True, metavar="full|incremental|verify")

    full = kinds.add_parser("full", help="copy the whole export into a new qcow2")
    _common(full)
    full.add_argument("output", metavar="OUTPUT.qcow2")
    _writer(full)

    inc = kinds.add_parser("incremental", help="copy the dirty clusters into a qcow2 on top of the previous backup")
    _common(inc)
    inc.add_argument("--bitmap", required=True, metavar="NAME", help="use meta context qemu:dirty-bitmap:NAME")
    inc.add_argument("--base", required=True, metavar="PREVIOUS.qcow2", help="the previous backup of the chain")
    inc.add_argument("output", metavar="OUTPUT.qcow2")
    _writer(inc)

    verify = kinds.add_parser("verify", help="compare a backup chain with the export")
    _common(verify)
    verify.add_argument("image", metavar="CHAIN_TOP.qcow2")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _describe(result: BackupResult) -> str:
    text = f"{result.kind} backup of {_size(result.size)} into {result.output}"
    if result.backing:
        text += f" (backing file {result.backing})"
    text += f": {_size(result.data_bytes)} data"
    if result.dirty is not None:
        text += f", {_size(result.zero_bytes)} zeroed, {_size(result.dirty_bytes)} dirty in {len(result.dirty)} ranges"
    return text + f", {result.seconds:.2f} s"


def run(args: argparse.Namespace) -> int:
    try:
        if args.progress_fd is not None:
            os.fstat(args.progress_fd)  # fail early on a bad descriptor
        request_size = parse_size(args.request_size)
        if args.kind == "verify":
            return _verify(args, request_size)
        options = BackupOptions(
            connections=args.connections,
            requests=args.requests,
            request_size=request_size,
            cluster_size=parse_size(args.cluster_size),
            force=args.force,
            progress_bar=args.progress,
            progress_fd=args.progress_fd,
        )
        if args.kind == "full":
            result = asyncio.run(full_backup(args.uri, args.output, options))
        else:
            result = asyncio.run(incremental_backup(args.uri, args.bitmap, args.base, args.output, options))
    except (*EXPECTED_ERRORS, OptionError) as exc:
        print(f"pynbd backup: {exc}", file=sys.stderr)
        return 2 if args.kind == "verify" else 1
    print(json.dumps(result.as_dict()) if args.json else _describe(result))
    return 0


def _verify(args: argparse.Namespace, request_size: int) -> int:
    options = VerifyOptions(
        connections=args.connections,
        requests=args.requests,
        request_size=request_size,
        progress_bar=args.progress,
        progress_fd=args.progress_fd,
    )
    result = asyncio.run(verify_chain(args.uri, args.image, options))
    if args.json:
        print(json.dumps(result.as_dict()))
    elif result.equal:
        print(f"{args.image} matches the export: {_size(result.export_size)}, {_size(result.compared_bytes)} compared")
    elif result.export_size != result.image_size:
        print(f"size mismatch: the export is {result.export_size} bytes, {args.image} is {result.image_size} bytes")
    else:
        assert result.mismatch is not None  # not equal, same size: a range differs
        start, end = result.mismatch
        print(f"mismatch at bytes [{start}, {end}) ({end - start} bytes): {args.image} differs from the export")
    return 0 if result.equal else 1
