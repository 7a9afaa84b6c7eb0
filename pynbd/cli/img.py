"""``pynbd img``: create, inspect, check, map, copy and commit disk images, as qemu-img does.

Sub-commands, flags, messages, JSON shapes and exit codes follow qemu-img 7.2 wherever qemu-img
has the same command, so that scripts written for one work with the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pynbd.bitmap import DirtyBitmap
from pynbd.daemon.blockdev import node_filename
from pynbd.daemon.core import Daemon
from pynbd.daemon.open import (
    CONVERT_SOURCE_SHARED,
    FORMATS,
    IMG_READ,
    Image,
    OpenError,
    open_image,
    open_node,
    probe_format,
    resolve_backing,
)
from pynbd.graph.perms import ALL, NONE, Perm, Role, default_child_perm
from pynbd.graph.reopen import set_read_only
from pynbd.graph.transaction import Transaction
from pynbd.jobs.copy import CopyError
from pynbd.jobs.copyjob import CONVERGE, CopyJob
from pynbd.jobs.core import VERBS
from pynbd.jobs.mirror import MirrorJob
from pynbd.nodes.base import DATA, HOLE_ZERO, BlockError, BlockNode
from pynbd.nodes.file import ImageLocked
from pynbd.qcow2.check import check_image
from pynbd.qcow2.create import CreateOptions, create_qcow2, create_raw
from pynbd.qcow2.layout import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, FormatError
from pynbd.qcow2.node import COMPRESSED, NORMAL, ZERO_ALLOC, ZERO_PLAIN, Qcow2Node
from pynbd.sizes import parse_size

log = logging.getLogger("pynbd.img")

PROG = "pynbd img"
COPY_CHUNK = 2 << 20
ZERO_DETECT = 4096  # qemu-img convert's -S default: aligned 4 KiB blocks of zeroes are not written as data


FORCE_SHARE_HELP = "open the image even while another process writes it (read-only use only)"


class UsageError(Exception):
    pass


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("img", help="create, inspect, check and convert images (like qemu-img)", description=__doc__)
    cmds = p.add_subparsers(dest="img_command", required=True, metavar="COMMAND")

    c = cmds.add_parser("create", help="create a new image")
    c.add_argument("-f", dest="fmt", default="raw", choices=FORMATS)
    c.add_argument("-o", dest="options", action="append", default=[], help="cluster_size=,refcount_bits=,compat=,...")
    c.add_argument("-b", dest="backing", help="backing file (stored as given, relative to the image's directory)")
    c.add_argument("-F", dest="backing_fmt", choices=FORMATS, help="backing file format (default: probed)")
    c.add_argument("-u", dest="unsafe", action="store_true", help="do not open the backing file")
    c.add_argument("-q", dest="quiet", action="store_true")
    c.add_argument("filename")
    c.add_argument("size", nargs="?")
    c.set_defaults(img_func=cmd_create)

    i = cmds.add_parser("info", help="show information about an image")
    i.add_argument("-f", dest="fmt", choices=FORMATS)
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("--backing-chain", action="store_true")
    i.add_argument("-U", "--force-share", action="store_true", help=FORCE_SHARE_HELP)
    i.add_argument("filename")
    i.set_defaults(img_func=cmd_info)

    k = cmds.add_parser("check", help="check (and repair) a qcow2 image")
    k.add_argument("-f", dest="fmt", choices=FORMATS)
    k.add_argument("--output", choices=("human", "json"), default="human")
    k.add_argument("-r", dest="repair", choices=("leaks", "all"))
    k.add_argument("-q", dest="quiet", action="store_true")
    k.add_argument("-U", "--force-share", action="store_true", help=FORCE_SHARE_HELP)
    k.add_argument("filename")
    k.set_defaults(img_func=cmd_check)

    m = cmds.add_parser("map", help="show how the image's data is laid out, layer by layer")
    m.add_argument("-f", dest="fmt", choices=FORMATS)
    m.add_argument("--output", choices=("human", "json"), default="human")
    m.add_argument("--start-offset", default="0")
    m.add_argument("--max-length")
    m.add_argument("-U", "--force-share", action="store_true", help=FORCE_SHARE_HELP)
    m.add_argument("filename")
    m.set_defaults(img_func=cmd_map)

    b = cmds.add_parser("bitmap", help="add, remove, clear, enable, disable or merge persistent bitmaps")
    for flag in ("add", "remove", "clear", "enable", "disable"):
        b.add_argument(f"--{flag}", dest="ops", action="append_const", const=(flag, None))
    b.add_argument("--merge", dest="ops", action="append", type=lambda src: ("merge", src), metavar="SOURCE")
    b.add_argument("-g", dest="granularity", help="granularity of a new bitmap (with --add)")
    b.add_argument("-b", dest="source_file", help="image holding the --merge source bitmap")
    b.add_argument("-F", dest="source_fmt", choices=FORMATS)
    b.add_argument("-f", dest="fmt", choices=FORMATS)
    b.add_argument("filename")
    b.add_argument("bitmap")
    b.set_defaults(img_func=cmd_bitmap)

    cmp = cmds.add_parser("compare", help="compare the contents of two images")
    cmp.add_argument("-f", dest="fmt1", choices=FORMATS)
    cmp.add_argument("-F", dest="fmt2", choices=FORMATS)
    cmp.add_argument("-s", dest="strict", action="store_true", help="images of different sizes differ")
    cmp.add_argument("-q", dest="quiet", action="store_true")
    cmp.add_argument("-U", "--force-share", action="store_true", help=FORCE_SHARE_HELP)
    cmp.add_argument("filename1")
    cmp.add_argument("filename2")
    cmp.set_defaults(img_func=cmd_compare)

    v = cmds.add_parser("convert", help="copy images (one after the other) into a new one (sparse), changing format")
    v.add_argument("-f", dest="fmt", choices=FORMATS, help="format of every source (default: probed)")
    v.add_argument("-O", dest="out_fmt", default="raw", choices=FORMATS)
    v.add_argument("-o", dest="options", action="append", default=[])
    v.add_argument("-n", dest="no_create", action="store_true", help="write into an existing target")
    v.add_argument("--bitmaps", action="store_true", help="copy the persistent bitmaps too (one source only)")
    v.add_argument("-p", dest="progress", action="store_true", help="show progress")
    v.add_argument("-r", dest="rate", metavar="RATE", help="at most RATE bytes per second (K, M, G suffixes)")
    v.add_argument("-q", dest="quiet", action="store_true")
    v.add_argument("-U", "--force-share", action="store_true", help=FORCE_SHARE_HELP)
    v.add_argument("files", nargs="+", metavar="FILE", help="the sources, then the target")
    v.set_defaults(img_func=cmd_convert)

    t = cmds.add_parser("commit", help="write an overlay's changes into its backing file")
    t.add_argument("-f", dest="fmt", choices=FORMATS)
    t.add_argument("-b", dest="base", help="commit into this image of the chain (default: the backing file)")
    t.add_argument("-d", dest="keep", action="store_true", help="do not empty the committed image")
    t.add_argument("-p", dest="progress", action="store_true", help="show progress")
    t.add_argument("-r", dest="rate", metavar="RATE", help="at most RATE bytes per second (K, M, G suffixes)")
    t.add_argument("-q", dest="quiet", action="store_true")
    t.add_argument("filename")
    t.set_defaults(img_func=cmd_commit)

    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.verbose:  # a failed job is reported once, in qemu-img's words, not also logged
        logging.getLogger("pynbd.jobs").setLevel(logging.ERROR)
    try:
        return asyncio.run(args.img_func(args))
    except Interrupted as exc:  # cleaned up: now end as the signal would have ended us
        signal.signal(exc.signum, signal.SIG_DFL)
        os.kill(os.getpid(), exc.signum)
        return 128 + exc.signum
    except OpenError as exc:  # qemu-img's words, and its hint on a second line
        print(f"{PROG}: {exc.report()}", file=sys.stderr)
        return 1
    except ImageLocked as exc:
        print(f"{PROG}: {exc}\n{exc.hint}", file=sys.stderr)
        return 1
    except (BlockError, FormatError, OSError, ValueError, UsageError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror and not str(exc) else str(exc)
        print(f"{PROG}: {message}", file=sys.stderr)
        return 1


# -- helpers --------------------------------------------------------------------------------------


def parse_options(items: list[str]) -> dict[str, str]:
    """qemu's ``-o key=value,key=value`` (``,,`` escapes a comma)."""
    options: dict[str, str] = {}
    for item in items:
        for part in item.replace(",,", "\0").split(","):
            if not part:
                continue
            key, _, value = part.partition("=")
            options[key.strip()] = value.replace("\0", ",")
    return options


def qcow2_options(raw: dict[str, str]) -> CreateOptions:
    opts = CreateOptions()
    for key, value in raw.items():
        if key == "cluster_size":
            opts.cluster_size = parse_size(value)
        elif key == "refcount_bits":
            opts.refcount_bits = int(value)
        elif key == "compat":
            opts.compat = value
        elif key == "compression_type":
            opts.compression_type = value
        elif key == "lazy_refcounts":
            opts.lazy_refcounts = value in ("on", "true", "yes")
        elif key == "extended_l2":
            opts.extended_l2 = value in ("on", "true", "yes")
        elif key in ("backing_file", "backing_fmt", "size") or (key == "preallocation" and value == "off"):
            continue
        else:
            raise UsageError(f"Invalid parameter '{key}'")
    return opts


def qemu_json(value: object, indent: int = 0) -> str:
    """JSON pretty-printed as qemu's QObject printer does (json.dumps differs on empty lists)."""
    pad, inner = " " * indent, " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {qemu_json(v, indent + 4)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + ("\n" if items else "") + pad + "}"
    if isinstance(value, list):
        items = [f"{inner}{qemu_json(v, indent + 4)}" for v in value]
        return "[\n" + ",\n".join(items) + ("\n" if items else "") + pad + "]"
    return json.dumps(value)


def size_to_str(value: int) -> str:
    """qemu's size_to_str: three significant digits and a binary unit."""
    import math

    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _, exponent = math.frexp(value / (1000.0 / 1024.0)) if value else (0, 0)
    index = max(0, min((exponent - 1) // 10, len(suffixes) - 1))
    return f"{value / (1 << (index * 10)):0.3g} {suffixes[index]}B"


async def with_image(filename: str, fmt: str | None, work: Callable[[Image], Awaitable[int]], **kwargs) -> int:
    """Open an image through pynbd.daemon.open (image locks, backing chain), run ``work``, close it."""
    image = await open_image(filename, fmt, user="qemu-img", **kwargs)
    try:
        return await work(image)
    finally:
        await image.close()


# -- create ---------------------------------------------------------------------------------------


async def cmd_create(args: argparse.Namespace) -> int:
    raw = parse_options(args.options)
    backing = args.backing or raw.get("backing_file")
    backing_fmt = args.backing_fmt or raw.get("backing_fmt")
    size = parse_size(args.size) if args.size else (parse_size(raw["size"]) if "size" in raw else None)
    if backing and args.fmt != "qcow2":
        raise UsageError(f"'{args.fmt}' does not support backing files")
    if backing and not args.unsafe:
        path = resolve_backing(args.filename, backing)
        backing_fmt = backing_fmt or probe_format(path)
        if size is None:  # as qemu-img: only the size is read, so the backing file is force-shared
            backing_image = await open_image(
                path, backing_fmt, read_only=True, force_share=True, backing=False, perm=NONE, user="qemu-img"
            )
            size = backing_image.node.size
            await backing_image.close()
    if size is None:
        raise UsageError("Image creation needs a size parameter")
    if args.fmt == "qcow2":
        opts = qcow2_options(raw)
        line = f"Formatting '{args.filename}', fmt=qcow2 {opts.describe()} size={size}"
        if backing:
            line += f" backing_file={backing}" + (f" backing_fmt={backing_fmt}" if backing_fmt else "")
        line += f" lazy_refcounts={'on' if opts.lazy_refcounts else 'off'} refcount_bits={opts.refcount_bits}"
        create_qcow2(args.filename, size, opts, backing, backing_fmt)
    else:
        line = f"Formatting '{args.filename}', fmt=raw size={size}"
        create_raw(args.filename, size)
    if not args.quiet:
        print(line)
    return 0


# -- info -----------------------------------------------------------------------------------------


def image_info(node: BlockNode, filename: str) -> dict:
    """qemu-img info's ImageInfo for one layer."""
    info: dict = {}
    if isinstance(node, Qcow2Node):
        h = node.header
        if h.backing_file and h.backing_format:
            info["backing-filename-format"] = h.backing_format
    info["virtual-size"] = node.size
    info["filename"] = filename
    if isinstance(node, Qcow2Node):
        info["cluster-size"] = node.cluster_size
    info["format"] = "qcow2" if isinstance(node, Qcow2Node) else "raw"
    try:
        info["actual-size"] = os.stat(filename).st_blocks * 512
    except OSError:
        pass
    if isinstance(node, Qcow2Node):
        h = node.header
        data: dict = {"compat": "1.1" if h.version >= 3 else "0.10", "compression-type": node.compression}
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible_features & 1)
            if node.disk_bitmaps:
                data["bitmaps"] = [
                    {"flags": entry.flag_names(), "name": entry.name, "granularity": entry.granularity}
                    for entry, _ in node.disk_bitmaps
                ]
            data["refcount-bits"] = h.refcount_bits
            data["corrupt"] = bool(h.incompatible_features & INCOMPAT_CORRUPT)
            data["extended-l2"] = h.extended_l2
        else:
            data["refcount-bits"] = h.refcount_bits
        info["format-specific"] = {"type": "qcow2", "data": data}
        if h.backing_file:
            info["full-backing-filename"] = resolve_backing(filename, h.backing_file)
            info["backing-filename"] = h.backing_file
        info["dirty-flag"] = bool(h.incompatible_features & INCOMPAT_DIRTY)
    else:
        info["dirty-flag"] = False
    return info


def human_info(info: dict, node: BlockNode) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {size_to_str(info.get('actual-size', 0))}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        lines.append(f"backing file: {info['backing-filename']}")
        if info["full-backing-filename"] != info["backing-filename"]:
            lines[-1] += f" (actual path: {info['full-backing-filename']})"
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    specific = info.get("format-specific")
    if specific:
        data = specific["data"]
        lines.append("Format specific information:")
        for key, value in data.items():
            label = key.replace("-", " ")
            if key == "bitmaps":
                lines.append("    bitmaps:")
                for index, entry in enumerate(value):
                    lines.append(f"        [{index}]:")
                    lines.append("            flags:")
                    for flag_index, flag in enumerate(entry["flags"]):
                        lines.append(f"                [{flag_index}]: {flag}")
                    lines.append(f"            name: {entry['name']}")
                    lines.append(f"            granularity: {entry['granularity']}")
            elif isinstance(value, bool):
                lines.append(f"    {label}: {'true' if value else 'false'}")
            else:
                lines.append(f"    {label}: {value}")
    if isinstance(node, Qcow2Node):
        for name in sorted(node.bitmaps_found_in_use):
            lines.append(
                f"Note: bitmap '{name}' is in use: it was not saved after its last change, "
                "so pynbd treats it as fully dirty (check -r all stores it back that way)"
            )
    return "\n".join(lines) + "\n"


async def cmd_info(args: argparse.Namespace) -> int:
    async def work(image: Image) -> int:
        layers = image.chain() if args.backing_chain else [image.node]
        infos = []
        names = [args.filename] + [node_filename(layer) for layer in layers[1:]]
        for layer, name in zip(layers, names, strict=True):
            infos.append(image_info(layer, name))
        if args.output == "json":
            print(qemu_json(infos if args.backing_chain else infos[0]))
        else:
            print("\n".join(human_info(info, layer) for info, layer in zip(infos, layers, strict=True)), end="")
        return 0

    # qemu-img info reads no data (perm NONE) and opens the backing chain only with --backing-chain
    return await with_image(
        args.filename,
        args.fmt,
        work,
        read_only=True,
        perm=NONE,
        backing=args.backing_chain,
        force_share=args.force_share,
    )


# -- check ----------------------------------------------------------------------------------------


async def cmd_check(args: argparse.Namespace) -> int:
    try:
        fmt = args.fmt or probe_format(args.filename)
    except BlockError as exc:
        raise OpenError(args.filename, str(exc), err=exc.errno) from None
    read_only = args.repair is None
    if fmt != "qcow2":  # qemu-img opens the image (locks and all) before it finds it cannot check it
        image = await open_image(
            args.filename, fmt, read_only=read_only, force_share=args.force_share, user="qemu-img"
        )
        await image.close()
        print(f"{PROG}: This image format does not support checks", file=sys.stderr)
        return 63
    # The check reads (and a repair writes) the file itself, not through a qcow2 node that might
    # refuse a damaged image; meanwhile the file is held with what a qcow2 node takes on it.
    perm, shared = default_child_perm(Role.image(), IMG_READ, ALL, writable=not read_only)
    holder = await open_image(
        args.filename,
        "file",
        read_only=read_only,
        perm=perm,
        shared=shared,
        force_share=args.force_share,
        user="qemu-img",
    )
    try:
        result = await check_image(args.filename, args.repair)
    finally:
        await holder.close()
    for message in result.messages:
        print(message, file=sys.stderr)
    if result.failure or result.check_errors:
        print(f"{PROG}: {result.failure or 'Check failed'}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(qemu_json(result.to_json()))
    elif not args.quiet:
        if result.corruptions_fixed or result.leaks_fixed:
            print(
                "The following inconsistencies were found and repaired:\n\n"
                f"    {result.leaks_fixed} leaked clusters\n"
                f"    {result.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now..."
            )
        print(result.human(), end="")
    return result.exit_code


# -- map ------------------------------------------------------------------------------------------


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    filename: str = ""

    def joins(self, other: MapEntry) -> bool:
        if (self.depth, self.present, self.zero, self.data, self.filename) != (
            other.depth,
            other.present,
            other.zero,
            other.data,
            other.filename,
        ):
            return False
        if self.start + self.length != other.start:
            return False
        if (self.offset is None) != (other.offset is None):
            return False
        return self.offset is None or self.offset + self.length == other.offset

    def to_json(self) -> str:
        def b(v: bool) -> str:
            return "true" if v else "false"

        text = (
            f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth}, '
            f'"present": {b(self.present)}, "zero": {b(self.zero)}, "data": {b(self.data)}'
        )
        if self.offset is not None:
            text += f', "offset": {self.offset}'
        return text + "}"


async def map_layers(layers: list[BlockNode], names: list[str], depth: int, offset: int, length: int):
    """qemu-img map's walk: the first layer (from the top) that allocates a range describes it."""
    node = layers[depth]
    if isinstance(node, Qcow2Node):
        for guest, run, kind, host in await node.layer_map(offset, length):
            if kind == NORMAL:
                pos = guest
                for n, flags in await node.host_status(host, run):
                    yield MapEntry(pos, n, depth, True, flags != DATA, True, host + pos - guest, names[depth])
                    pos += n
            elif kind == COMPRESSED:
                yield MapEntry(guest, run, depth, True, False, True)
            elif kind == ZERO_ALLOC:
                yield MapEntry(guest, run, depth, True, True, False, host, names[depth])
            elif kind == ZERO_PLAIN:
                yield MapEntry(guest, run, depth, True, True, False)
            else:
                below = depth + 1 < len(layers)
                inside = min(run, max(0, layers[depth + 1].size - guest)) if below else 0
                if inside:
                    async for entry in map_layers(layers, names, depth + 1, guest, inside):
                        yield entry
                if run - inside:
                    yield MapEntry(guest + inside, run - inside, depth, False, True, False)
    else:
        pos = offset
        for run, flags in await node.block_status(offset, length):
            hole = flags == HOLE_ZERO
            yield MapEntry(pos, run, depth, True, hole, not hole, pos, names[depth])
            pos += run


def _hex(value: int) -> str:
    return "0" if value == 0 else f"{value:#x}"


async def cmd_map(args: argparse.Namespace) -> int:
    async def work(image: Image) -> int:
        node = image.node
        layers = image.chain()
        names = [args.filename] + [node_filename(layer) for layer in layers[1:]]
        start = parse_size(args.start_offset)
        end = node.size if args.max_length is None else min(node.size, start + parse_size(args.max_length))
        entries: list[MapEntry] = []
        if start < end:
            async for entry in map_layers(layers, names, 0, start, end - start):
                if entries and entries[-1].joins(entry):
                    entries[-1].length += entry.length
                else:
                    entries.append(entry)
        if args.output == "json":
            print("[" + ",\n".join(entry.to_json() for entry in entries) + "]")
        else:
            print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
            for entry in entries:
                if entry.data and entry.offset is not None:
                    print(f"{_hex(entry.start):<16}{_hex(entry.length):<16}{_hex(entry.offset):<16}{entry.filename}")
        return 0

    return await with_image(args.filename, args.fmt, work, read_only=True, force_share=args.force_share)


# -- bitmap ---------------------------------------------------------------------------------------


async def cmd_bitmap(args: argparse.Namespace) -> int:
    ops = args.ops or []
    if not ops:
        raise UsageError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    if args.granularity and not any(op == "add" for op, _ in ops):
        raise UsageError("granularity only supported with --add")
    if args.source_file and not any(op == "merge" for op, _ in ops):
        raise UsageError("-b/-F only supported with --merge")
    granularity = parse_size(args.granularity) if args.granularity else None

    async def work(image: Image) -> int:
        node = image.node
        if not isinstance(node, Qcow2Node):
            raise UsageError(f"Cannot store dirty bitmaps in {node.driver} format")
        for op, value in ops:
            if op == "add":
                node.add_bitmap(args.bitmap, granularity)
                continue
            target = node.dirty_bitmaps.get(args.bitmap)
            if target is None:
                raise UsageError(f"Dirty bitmap '{args.bitmap}' not found")
            if op == "remove":
                node.remove_bitmap(args.bitmap)
            elif op == "clear":
                target.bitmap.clear()
            elif op in ("enable", "disable"):
                target.enabled = op == "enable"
            elif op == "merge":
                target.bitmap.merge(await merge_source(node, value, args))
        return 0

    return await with_image(args.filename, args.fmt, work, read_only=False, backing=False)


async def merge_source(node: Qcow2Node, name: str, args: argparse.Namespace) -> DirtyBitmap:
    if not args.source_file:
        source = node.dirty_bitmaps.get(name)
        if source is None:
            raise UsageError(f"Dirty bitmap '{name}' not found")
        return source.bitmap
    other = await open_image(args.source_file, args.source_fmt, read_only=True, backing=False, user="qemu-img")
    try:
        source = other.node.dirty_bitmaps.get(name)
        if source is None:
            raise UsageError(f"Dirty bitmap '{name}' not found")
        if other.node.size != node.size:
            raise UsageError("Bitmaps are of different sizes")
        return source.bitmap.copy()
    finally:
        await other.close()


# -- compare --------------------------------------------------------------------------------------


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Byte index of the 512-byte sector where two buffers first differ (as qemu-img reports it)."""
    lo, hi = 0, len(a)
    while hi - lo > 512:  # bisect on sector boundaries: C-speed comparisons only
        mid = lo + ((hi - lo) // 2 // 512 or 1) * 512
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


async def all_zero(node: BlockNode, offset: int, length: int) -> int | None:
    """None if the range reads as zeroes, else the offset of the first sector that does not."""
    pos = offset
    for run, flags in await node.block_status(offset, length):
        if flags != HOLE_ZERO:
            for chunk_start in range(pos, pos + run, COPY_CHUNK):
                n = min(COPY_CHUNK, pos + run - chunk_start)
                buf = bytearray(n)
                await node.read_into(chunk_start, memoryview(buf))
                if buf.count(0) != n:
                    return chunk_start + first_difference(buf, bytes(n))
        pos += run
    return None


async def cmd_compare(args: argparse.Namespace) -> int:
    opened: list[Image] = []
    for filename, fmt in ((args.filename1, args.fmt1), (args.filename2, args.fmt2)):
        try:
            opened.append(
                await open_image(filename, fmt, read_only=True, force_share=args.force_share, user="qemu-img")
            )
        except OpenError as exc:
            for image in opened:
                await image.close()
            print(f"{PROG}: {exc.report()}", file=sys.stderr)
            return 2
    a, b = (image.node for image in opened)

    def say(text: str) -> None:
        if not args.quiet:
            print(text)

    try:
        if a.size != b.size:
            if args.strict:
                say("Strict mode: Image size mismatch!")
                return 1
            say("Warning: Image size mismatch!")
        common = min(a.size, b.size)
        mismatch = await compare_range(a, b, 0, common)
        if mismatch is None and a.size != b.size:
            longer = a if a.size > b.size else b
            mismatch = await all_zero(longer, common, longer.size - common)
        if mismatch is not None:
            say(f"Content mismatch at offset {mismatch}!")
            return 1
        say("Images are identical.")
        return 0
    finally:
        for image in opened:
            await image.close()


async def compare_range(a: BlockNode, b: BlockNode, offset: int, length: int) -> int | None:
    status_a = await a.block_status(offset, length)
    status_b = await b.block_status(offset, length)
    # walk both extent lists together; ranges that are zero in both need no reading
    ia = ib = 0
    pos, end = offset, offset + length
    left_a, left_b = status_a[0][0], status_b[0][0]
    while pos < end:
        run = min(left_a, left_b)
        if not (status_a[ia][1] == HOLE_ZERO and status_b[ib][1] == HOLE_ZERO):
            for chunk in range(pos, pos + run, COPY_CHUNK):
                n = min(COPY_CHUNK, pos + run - chunk)
                buf_a, buf_b = bytearray(n), bytearray(n)
                await a.read_into(chunk, memoryview(buf_a))
                await b.read_into(chunk, memoryview(buf_b))
                if buf_a != buf_b:
                    return chunk + first_difference(buf_a, buf_b)
        pos += run
        left_a -= run
        left_b -= run
        if not left_a and ia + 1 < len(status_a):
            ia += 1
            left_a = status_a[ia][0]
        if not left_b and ib + 1 < len(status_b):
            ib += 1
            left_b = status_b[ib][0]
    return None


# -- running copy jobs (convert, commit) -----------------------------------------------------------


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the command: its job was cancelled and its images closed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class Progress:
    """qemu-img's progress report (util/qemu-progress.c, min_skip 1%) for ``-p``:
    ``"    (12.34/100%)\r"`` on stdout at the start, whenever at least 1% more is done, and at
    100%, then a newline. The figure never goes back."""

    def __init__(self, shown: bool) -> None:
        self.shown = shown
        self.current = 0.0
        self.last: float | None = None

    def update(self, percent: float) -> None:
        self.current = min(100.0, max(self.current, percent))
        last = self.last
        if last is None or self.current > last + 1.0 or (self.current == 100.0 and last < 100.0):
            self.last = self.current
            if self.shown:
                sys.stdout.write(f"    ({self.current:3.2f}/100%)\r")
                sys.stdout.flush()

    def end(self) -> None:
        if self.shown:
            sys.stdout.write("\n")
            sys.stdout.flush()


PROGRESS_INTERVAL = 0.1  # seconds between looks at a running job's progress (a display rate)


class JobRunner:
    """Runs copy jobs in a one-shot daemon graph to their end, one after the other, as qemu-img's
    run_block_job does: a converge job is completed, without a pivot, as soon as it is READY.
    Progress is the jobs' bytes done, each job weighing its ``weight`` of ``total``. SIGINT and
    SIGTERM cancel the running job; the command then closes its images and raises
    :class:`Interrupted`."""

    def __init__(self, daemon: Daemon, progress: Progress, total: int) -> None:
        self.daemon = daemon
        self.progress = progress
        self.total = max(total, 1)
        self.done = 0
        self.interrupted: int | None = None
        self.job: CopyJob | None = None

    def __enter__(self) -> JobRunner:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._interrupt, signum)
        self._unsubscribe = self.daemon.subscribe(self._on_event)
        self.progress.update(0.0)
        return self

    def __exit__(self, *exc) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        self._unsubscribe()
        self.progress.end()  # also when the command fails, as qemu-img ends its progress line

    def _interrupt(self, signum: int) -> None:
        self.interrupted = signum
        job = self.job
        if job is not None and job.status in VERBS["cancel"]:
            job.cancel(force=True)

    def _on_event(self, event: str, data: dict) -> None:
        job = self.job
        if event == "BLOCK_JOB_READY" and job is not None and data.get("device") == job.id:
            job.complete()

    def _report(self, job: CopyJob, weight: int) -> None:
        fraction = min(1.0, job.current_progress / job.total_progress) if job.total_progress else 0.0
        self.progress.update(100.0 * (self.done + fraction * weight) / self.total)

    async def run(self, job: CopyJob, weight: int) -> None:
        """Run ``job`` to its end; raise if it failed (:class:`CopyError` if a copy did)."""
        if self.interrupted is not None:
            raise Interrupted(self.interrupted)
        with Transaction() as tran:
            job.install(tran)
        self.job = job
        self.daemon.jobs.start(job)
        try:
            while not job.concluded.is_set():
                self._report(job, weight)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(job.concluded.wait(), PROGRESS_INTERVAL)
        finally:
            self.job = None
        if self.interrupted is not None:
            raise Interrupted(self.interrupted)
        if job.copy_error is not None:
            raise job.copy_error
        if job.error is not None:
            raise BlockError(errno.EIO, f"Block job failed: {job.error}")
        self.done += weight
        self.progress.update(100.0 * self.done / self.total)


def copy_failure(exc: CopyError, offset: int) -> UsageError:
    """qemu-img convert's words for a failed read or write (``offset``: where the failing part
    starts in the target)."""
    verb = "reading" if exc.operation == "read" else "writing"
    return UsageError(f"error while {verb} at byte {offset + exc.offset}: {exc.reason}")


# -- convert --------------------------------------------------------------------------------------

SECTOR = 512


def round_up(size: int, unit: int = SECTOR) -> int:
    return (size + unit - 1) // unit * unit


async def refuse_locked_target(daemon: Daemon, filename: str, fmt: str) -> None:
    """Creating an image replaces the file: first make sure no other process uses it, as qemu's
    image creation does by taking the write lock (qemu-img's message if one does)."""
    if not os.path.exists(filename):
        return
    try:
        probe = await open_image(filename, "file", read_only=False, user="qemu-img", daemon=daemon)
    except OpenError as exc:
        text = f"{filename}: error while converting {fmt}: {exc.reason}"
        raise UsageError(f"{text}\n{exc.hint}" if exc.hint else text) from None
    await probe.close()


async def cmd_convert(args: argparse.Namespace) -> int:
    """Copy the sources, one after the other, into the target: each source is a converge copy job
    of a one-shot daemon graph into its window of the target (a ``raw`` node with ``offset`` and
    ``size``), completed without a pivot once READY. As qemu-img, each source takes its size
    rounded up to 512 bytes (the padding reads as zeroes); the copy skips or zeroes aligned 4 KiB
    blocks of zeroes (``-S 4k``)."""
    if len(args.files) < 2:
        raise UsageError("Must specify image file name")
    *sources, target_name = args.files
    if args.bitmaps and len(sources) > 1:
        raise UsageError("Copying bitmaps only possible with single source")
    speed = parse_size(args.rate) if args.rate else 0
    daemon = Daemon()
    try:
        opened = [
            await open_image(
                name,
                args.fmt,
                read_only=True,
                shared=CONVERT_SOURCE_SHARED,
                force_share=args.force_share,
                user="qemu-img",
                daemon=daemon,
            )
            for name in sources
        ]
        sizes = [image.node.size for image in opened]
        offsets = [sum(round_up(size) for size in sizes[:i]) for i in range(len(sizes))]
        total = sum(round_up(size) for size in sizes)
        if not args.no_create:
            await refuse_locked_target(daemon, target_name, args.out_fmt)
            if args.out_fmt == "qcow2":
                create_qcow2(target_name, total, qcow2_options(parse_options(args.options)))
            else:
                create_raw(target_name, total)
        # the tool's handle holds the write lock; the jobs write for it (a copy's target is not
        # consistent until the copy ends, so the handle does not ask for consistent reads)
        target = await open_image(
            target_name, args.out_fmt, read_only=False, perm=Perm.WRITE, backing=False, user="qemu-img", daemon=daemon
        )
        if target.node.size < total:
            raise UsageError("output file is smaller than input file")
        progress = Progress(args.progress and not args.quiet)
        with JobRunner(daemon, progress, total) as runner:
            for index, (image, offset, size) in enumerate(zip(opened, offsets, sizes, strict=True)):
                window = await open_node(
                    daemon, {"driver": "raw", "file": target.node.node_name, "offset": offset, "size": size}
                )
                job = CopyJob(
                    f"convert{index}",
                    daemon.graph,
                    image.node,
                    window,
                    CONVERGE,
                    "full",
                    pivot=False,
                    zero_detect=ZERO_DETECT,
                    target_is_zero=not args.no_create,
                    share_target_writes=True,
                    speed=speed,
                )
                try:
                    await runner.run(job, round_up(size))
                except CopyError as exc:
                    raise copy_failure(exc, offset) from None
                # the window had no user but the job: the job's end closed it, as the daemon closes
                # every node left unused (pynbd.daemon.blockdev.release_orphans)
                padding = round_up(size) - size
                if padding and args.no_create:  # what the source's padding reads as
                    await target.link.write_zeroes(offset + size, padding, may_trim=True)
        if args.bitmaps:
            await copy_bitmaps(opened[0].node, target.node)
        await target.link.flush()
    finally:
        await daemon.shutdown()
    return 0


async def copy_bitmaps(src: BlockNode, dst: BlockNode) -> None:
    if not isinstance(dst, Qcow2Node):
        raise UsageError("--bitmaps needs a qcow2 target")
    for bitmap in getattr(src, "persistent_bitmaps", list)():
        copy = dst.add_bitmap(bitmap.name, bitmap.granularity, bitmap.enabled)
        copy.bitmap.merge(bitmap.bitmap)


# -- commit ---------------------------------------------------------------------------------------


async def cmd_commit(args: argparse.Namespace) -> int:
    """Commit on the commit job, as qemu-img does: an active commit (a converge copy into the
    base, chain frozen, base reopened read-write) completed without a pivot once READY; then,
    without ``-b`` and ``-d``, the committed image is emptied."""
    speed = parse_size(args.rate) if args.rate else 0
    daemon = Daemon()
    try:
        image = await open_image(args.filename, args.fmt, read_only=False, user="qemu-img", daemon=daemon)
        layers = image.chain()
        if len(layers) < 2:
            raise UsageError(f"Image '{args.filename}' does not have a backing file")
        base_depth = 1
        if args.base:
            wanted = os.path.realpath(args.base)
            for depth, layer in enumerate(layers[1:], start=1):
                if os.path.realpath(node_filename(layer)) == wanted:
                    base_depth = depth
                    break
            else:
                raise UsageError(f"'{args.base}' is not in the backing chain of '{args.filename}'")
        top, base = image.node, layers[base_depth]
        pos = 0
        for run, depth in await top.allocation_depth(0, top.size):
            if 1 <= depth <= base_depth and pos + run > base.size:
                raise UsageError("the base image is smaller than the data to commit into it")
            pos += run
        job = MirrorJob("commit", daemon.graph, top, base, base=base, pivot=False, speed=speed)
        # the base, opened read-only as a backing file, is written by the job: read-write for it
        job.reopened = await set_read_only(daemon.graph, base, False)
        progress = Progress(args.progress and not args.quiet)
        with JobRunner(daemon, progress, top.size) as runner:
            await runner.run(job, top.size)
        if not args.base and not args.keep and isinstance(top, Qcow2Node):
            await top.make_empty()
    finally:
        await daemon.shutdown()
    if not args.quiet:
        print("Image committed.")
    return 0
