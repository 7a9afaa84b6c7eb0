"""``pynbd info``: what an NBD server exports, in the manner of nbdinfo.

pynbd info nbd://host/disk                   size, flags, block sizes, contexts
pynbd info --json nbd+unix:///?socket=S      the same as JSON (nbdinfo's keys)
pynbd info --list nbd://host                 every export the server lists
pynbd info --map [CONTEXT] URI               extents (default base:allocation)
pynbd info --map --totals URI                bytes per extent type
pynbd info -- nbdkit memory 1G               start a server (socket activation) and ask it
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from pynbd.client import Client, NBDConnectionError, NBDError, OptionError, connect
from pynbd.client.contexts import describe_extent, human_size
from pynbd.client.uri import URIError, is_nbd_uri
from pynbd.protocol.constants import BASE_ALLOCATION, TransmissionFlag
from pynbd.protocol.wire import ExportInfo

FLAG_KEYS = [
    ("is_rotational", TransmissionFlag.ROTATIONAL),
    ("is_read_only", TransmissionFlag.READ_ONLY),
    ("can_cache", TransmissionFlag.SEND_CACHE),
    ("can_df", TransmissionFlag.SEND_DF),
    ("can_fast_zero", TransmissionFlag.SEND_FAST_ZERO),
    ("can_flush", TransmissionFlag.SEND_FLUSH),
    ("can_fua", TransmissionFlag.SEND_FUA),
    ("can_multi_conn", TransmissionFlag.CAN_MULTI_CONN),
    ("can_trim", TransmissionFlag.SEND_TRIM),
    ("can_zero", TransmissionFlag.SEND_WRITE_ZEROES),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="show what an NBD server exports", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("target", nargs="*", metavar="URI | -- COMMAND", help="NBD URI, or a server command after --")
    p.add_argument("--json", action="store_true", help="machine-readable output (nbdinfo's keys)")
    p.add_argument("--list", action="store_true", help="list every export of the server")
    p.add_argument(
        "--map", nargs="?", const=BASE_ALLOCATION, metavar="CONTEXT", help="print extents of CONTEXT (base:allocation)"
    )
    p.add_argument("--totals", action="store_true", help="with --map: bytes and percentage per extent type")
    p.add_argument("--size", action="store_true", help="print only the export size in bytes")
    p.add_argument("--export", metavar="NAME", help="export name (overrides the URI's)")
    p.set_defaults(func=run)


def split_target(words: Sequence[str]) -> str | list[str]:
    """One NBD URI, or a server command (nbdinfo's ``[ CMD ARGS ]`` brackets are accepted)."""
    words = list(words)
    if len(words) == 1 and is_nbd_uri(words[0]):
        return words[0]
    if len(words) >= 2 and words[0] == "[" and words[-1] == "]":
        words = words[1:-1]
    if not words:
        raise URIError("empty server command")
    return words


def export_record(info: ExportInfo, contexts: list[str], uri: str | None) -> dict:
    """One export in nbdinfo --json's shape."""
    record: dict = {"export-name": info.name}
    if info.description:
        record["description"] = info.description
    if uri:
        record["uri"] = uri
    record["contexts"] = contexts
    for key, flag in FLAG_KEYS:
        record[key] = bool(info.flags & flag)
    if info.block_size:
        minimum, preferred, maximum = info.block_size
        record |= {"block_size_minimum": minimum, "block_size_preferred": preferred, "block_size_maximum": maximum}
    record["export-size"] = info.size
    size_str = human_size(info.size)
    if size_str:
        record["export-size-str"] = size_str
    return record


def print_export(record: dict) -> None:
    print(f'export="{record["export-name"]}":')
    size = record["export-size"]
    print(f"\texport-size: {size}" + (f" ({record['export-size-str']})" if "export-size-str" in record else ""))
    for key in ("description", "uri"):
        if key in record:
            print(f"\t{key}: {record[key]}")
    if record["contexts"]:
        print("\tcontexts:")
        for name in record["contexts"]:
            print(f"\t\t{name}")
    for key, _ in FLAG_KEYS:
        print(f"\t{key}: {str(record[key]).lower()}")
    for key in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
        if key in record:
            print(f"\t{key}: {record[key]}")


def protocol_line(client: Client) -> str:
    tls = "with" if client.tls else "without"
    packets = "structured" if client.structured else "simple"
    return f"protocol: {client.protocol} {tls} TLS, using {packets} packets"


async def list_contexts(client: Client, export: str) -> list[str]:
    try:
        return await client.opt_list_meta_context(export)
    except OptionError:
        return []


async def info(args: argparse.Namespace) -> int:
    target = split_target(args.target)
    uri = target if isinstance(target, str) else None
    client = await connect(target, export=args.export, opt_mode=True)
    try:
        if args.list:
            return await show_list(client, args, uri)
        contexts: list[str] = []
        if client.opt_mode:
            contexts = await list_contexts(client, client.export_name)
            await client.opt_go(meta_contexts=[args.map] if args.map else [])
        if args.size:
            print(client.size)
        elif args.map:
            await show_map(client, args)
        else:
            record = export_record(client.info, contexts, uri)
            if args.json:
                document = {"protocol": client.protocol, "TLS": client.tls, "structured": client.structured}
                document["exports"] = [record]
                print(json.dumps(document, indent="\t"))
            else:
                print(protocol_line(client))
                print_export(record)
        await client.disconnect()
        return 0
    finally:
        await client.close()


async def show_list(client: Client, args: argparse.Namespace, uri: str | None) -> int:
    records = []
    if client.opt_mode:
        for name, description in await client.opt_list():
            try:
                export = await client.opt_info(name)
            except OptionError as exc:
                print(f"pynbd info: export {name!r}: {exc}", file=sys.stderr)
                continue
            export.description = export.description or description or None
            records.append(export_record(export, await list_contexts(client, name), None))
        await client.opt_abort()
    else:  # oldstyle or non-fixed newstyle: the one export there is
        records.append(export_record(client.info, [], uri))
    if args.json:
        document = {"protocol": client.protocol, "TLS": client.tls, "structured": client.structured}
        print(json.dumps(document | {"exports": records}, indent="\t"))
    else:
        print(protocol_line(client))
        for record in records:
            print_export(record)
    return 0


async def show_map(client: Client, args: argparse.Namespace) -> None:
    context = args.map
    if context not in client.contexts:
        raise NBDError(95, f"the server does not support meta context {context!r}")
    extents = (await client.map_extents([context]))[context]
    if args.totals:
        totals: dict[int, int] = {}
        for ext in extents:
            totals[ext.flags] = totals.get(ext.flags, 0) + ext.length
        rows = []
        for kind in sorted(totals):
            percent = 100.0 * totals[kind] / client.size if client.size else 0.0
            row: dict[str, object] = {"size": totals[kind], "percent": percent, "type": kind}
            description = describe_extent(context, kind)
            if description is not None:
                row["description"] = description
            rows.append(row)
        if args.json:
            print(json.dumps(rows, indent="\t"))
        else:
            for row in rows:
                line = f"{row['size']:10d} {row['percent']:5.1f}% {row['type']:3d} {row.get('description', '')}"
                print(line.rstrip())
        return
    if args.json:
        rows = []
        for ext in extents:
            row = {"offset": ext.offset, "length": ext.length, "type": ext.flags}
            description = describe_extent(context, ext.flags)
            if description is not None:
                row["description"] = description
            rows.append(row)
        print(json.dumps(rows, indent="\t"))
        return
    for ext in extents:
        line = f"{ext.offset:10d}  {ext.length:10d}  {ext.flags:3d}  {describe_extent(context, ext.flags) or ''}"
        print(line.rstrip())


def run(args: argparse.Namespace) -> int:
    if args.map and "://" in args.map:  # "--map URI": the URI is the target, the context the default
        args.target.insert(0, args.map)
        args.map = BASE_ALLOCATION
    if args.totals and not args.map:
        args.map = BASE_ALLOCATION
    if not args.target:
        print("pynbd info: give an NBD URI, or -- and a server command", file=sys.stderr)
        return 2
    try:
        return asyncio.run(info(args))
    except (OSError, NBDConnectionError, OptionError, URIError, ValueError) as exc:
        print(f"pynbd info: {exc}", file=sys.stderr)
        if isinstance(exc, OptionError) and exc.reply == 0x80000006:
            print("pynbd info: suggestion: to list all exports on the server, use --list", file=sys.stderr)
        return 1
