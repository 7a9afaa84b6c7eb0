"""Dirty bitmap commands and transactions, against qemu-storage-daemon running the same script."""

import nbd
import pytest

from tests.daemons import KINDS

MiB = 1 << 20


def bitmaps_of(daemon, node_name):
    nodes = daemon.ok("query-named-block-nodes")
    node = next(n for n in nodes if n["node-name"] == node_name)
    return {b["name"]: b for b in node.get("dirty-bitmaps", [])}


def dirty_map(uri, context):
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    extents = []

    def callback(ctx, offset, entries, err):
        if ctx == context:
            extents.extend(zip(entries[0::2], entries[1::2], strict=True))

    h.block_status(h.get_size(), 0, callback)
    h.shutdown()
    return extents


@pytest.fixture
def disk(workdir):
    path = workdir / "disk.raw"
    path.write_bytes(bytes(4 * MiB))
    return path


def start_with_disk(start_daemon, kind, disk):
    daemon = start_daemon(kind, "--blockdev", f"driver=file,node-name=f0,filename={disk}")
    daemon.ok("blockdev-add", driver="raw", file="f0", **{"node-name": "d0"})
    return daemon


@pytest.mark.parametrize("kind", KINDS)
def test_writes_mark_enabled_bitmaps_and_a_disabled_copy_is_exported(kind, start_daemon, disk):
    daemon = start_with_disk(start_daemon, kind, disk)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="b0", granularity=65536)
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("w"))
    h.pwrite(b"x" * 100, MiB + 10)
    h.zero(4096, 3 * MiB)
    h.flush()
    assert bitmaps_of(daemon, "d0")["b0"]["count"] == 2 * 65536
    # checkpoint: freeze a copy in one transaction and export it
    daemon.ok(
        "transaction",
        actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "frozen", "disabled": True}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "d0", "target": "frozen", "bitmaps": ["b0"]}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b0"}},
        ],
    )
    h.pwrite(b"y" * 10, 0)  # after the checkpoint: only b0 sees it
    h.shutdown()
    daemon.ok("block-export-add", type="nbd", id="r", **{"node-name": "d0"}, name="r", bitmaps=["frozen"])
    assert dirty_map(daemon.uri("r"), "qemu:dirty-bitmap:frozen") == [
        (MiB, 0),
        (65536, 1),
        (2 * MiB - 65536, 0),
        (65536, 1),
        (MiB - 65536, 0),
    ]
    info = bitmaps_of(daemon, "d0")
    assert info["frozen"]["busy"] and not info["frozen"]["recording"]
    assert info["b0"]["count"] == 65536 and info["b0"]["recording"]
    daemon.fails("block-dirty-bitmap-clear", node="d0", name="frozen")  # busy while exported
    # an enabled bitmap cannot be exported read-only from a node that is still written
    daemon.fails("block-export-add", type="nbd", id="r2", **{"node-name": "d0"}, name="r2", bitmaps=["b0"])


@pytest.mark.parametrize("kind", KINDS)
def test_failed_transaction_leaves_bitmaps_as_they_were(kind, start_daemon, disk):
    daemon = start_with_disk(start_daemon, kind, disk)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="b0")
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("w"))
    h.pwrite(b"x" * 512, 0)
    h.shutdown()
    before = bitmaps_of(daemon, "d0")
    daemon.fails(
        "transaction",
        actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b0"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "d0", "name": "b0"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b0"}},  # duplicate: fails
        ],
    )
    assert bitmaps_of(daemon, "d0") == before


@pytest.mark.parametrize("kind", KINDS)
def test_bitmap_argument_errors(kind, start_daemon, disk):
    daemon = start_with_disk(start_daemon, kind, disk)
    daemon.fails("block-dirty-bitmap-add", node="d0", name="")
    daemon.fails("block-dirty-bitmap-add", node="d0", name="g", granularity=1000)
    daemon.fails("block-dirty-bitmap-add", node="nope", name="b")
    daemon.fails("block-dirty-bitmap-add", node="d0", name="p", persistent=True)  # raw cannot store bitmaps
    daemon.fails("block-dirty-bitmap-remove", node="d0", name="missing")
    daemon.fails("block-dirty-bitmap-merge", node="d0", target="missing", bitmaps=[])
    daemon.ok("block-dirty-bitmap-add", node="d0", name="b", granularity=512)
    assert bitmaps_of(daemon, "d0")["b"]["granularity"] == 512


def test_copy_primitive_makes_a_frozen_copy_in_one_action(start_daemon, disk):
    daemon = start_with_disk(start_daemon, "pynbd", disk)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="b0", granularity=4096)
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("w"))
    h.pwrite(b"x" * 4096, 8192)
    daemon.ok(
        "transaction",
        actions=[
            {"type": "block-dirty-bitmap-copy", "data": {"node": "d0", "name": "c", "source": "b0", "disabled": True}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b0"}},
        ],
    )
    h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    info = bitmaps_of(daemon, "d0")
    assert info["c"] == {
        "name": "c",
        "recording": False,
        "persistent": False,
        "busy": False,
        "granularity": 4096,
        "count": 4096,
    }
    assert info["b0"]["count"] == 4096
    daemon.ok("block-export-add", type="nbd", id="r", **{"node-name": "d0"}, name="r", bitmaps=["c"])
    assert dirty_map(daemon.uri("r"), "qemu:dirty-bitmap:c") == [(8192, 0), (4096, 1), (4 * MiB - 12288, 0)]
