"""Old-way fleecing (qcow2 overlay + blockdev-backup sync=none) with a checkpoint bitmap, the
same QMP script against pynbd daemon and qemu-storage-daemon: same data, same extents."""

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

MiB = 1 << 20
SIZE = 16 * MiB


def contexts_map(uri, context):
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    extents = []
    offset = 0
    while offset < SIZE:
        got = []
        h.block_status(SIZE - offset, offset, lambda ctx, off, entries, err, got=got: got.extend(entries))
        extents.extend(zip(got[0::2], got[1::2], strict=True))
        offset += sum(got[0::2])
    h.shutdown()
    return extents


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = b"".join(h.pread(MiB, off) for off in range(0, SIZE, MiB))
    h.shutdown()
    return data


@pytest.fixture
def images(workdir):
    disk, fleece = workdir / "disk.qcow2", workdir / "fleece.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 4M", "-c", "write -P 0x62 8M 1M", str(disk)])
    return disk, fleece


def scenario(start_daemon, kind, disk, fleece):
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(fleece), str(SIZE)])
    daemon = start_daemon(
        kind,
        "--blockdev",
        f"driver=file,node-name=f0,filename={disk}",
        "--blockdev",
        "driver=qcow2,node-name=d0,file=f0",
    )
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="c0", granularity=65536)
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    writer.pwrite(b"\x71" * 65536, 12 * MiB)  # changed since checkpoint c0
    writer.flush()
    at_fleecing = read_all(daemon.uri("w"))
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "tmp"},
        file={"driver": "file", "filename": str(fleece)},
        backing="d0",
    )
    daemon.ok(
        "transaction",
        actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "frozen", "disabled": True}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": "d0", "target": "frozen", "bitmaps": ["c0"]}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "c0"}},
            {"type": "blockdev-backup", "data": {"device": "d0", "target": "tmp", "sync": "none", "job-id": "fl"}},
        ],
    )
    daemon.ok(
        "block-export-add",
        type="nbd",
        id="f",
        **{"node-name": "tmp"},
        name="fleece",
        bitmaps=[{"node": "d0", "name": "frozen"}],
        **{"allocation-depth": True},
    )
    # the guest goes on writing; the fleecing export must not see any of it
    for offset in (0, 2 * MiB + 4096, 9 * MiB, 12 * MiB, 15 * MiB):
        writer.pwrite(b"\x99" * 8192, offset)
    writer.flush()
    seen = {
        "data": read_all(daemon.uri("fleece")),
        "alloc": contexts_map(daemon.uri("fleece"), "base:allocation"),
        "depth": contexts_map(daemon.uri("fleece"), "qemu:allocation-depth"),
        "dirty": contexts_map(daemon.uri("fleece"), "qemu:dirty-bitmap:frozen"),
    }
    writer.shutdown()
    daemon.ok("block-export-del", id="f")
    daemon.ok("block-job-cancel", device="fl")
    daemon.wait_event("BLOCK_JOB_CANCELLED")
    daemon.ok("blockdev-del", **{"node-name": "tmp"})
    nodes = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes")}
    seen["bitmaps"] = sorted((b["name"], b["count"]) for b in nodes["d0"]["dirty-bitmaps"])
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(disk)])  # clean: no errors, no leaks
    return at_fleecing, seen


def test_old_way_fleecing_matches_qemu_storage_daemon(start_daemon, workdir, images):
    disk, fleece = images
    results = {}
    for kind in KINDS:
        copy = workdir / f"{kind}-disk.qcow2"
        copy.write_bytes(disk.read_bytes())
        at_fleecing, seen = scenario(start_daemon, kind, copy, workdir / f"{kind}-fleece.qcow2")
        assert seen["data"] == at_fleecing, f"{kind}: the fleecing export is not the point-in-time view"
        results[kind] = seen
    expected_dirty = [(12 * MiB, 0), (65536, 1), (SIZE - 12 * MiB - 65536, 0)]
    assert results["pynbd"]["dirty"] == results["qsd"]["dirty"] == expected_dirty
    assert results["pynbd"]["depth"] == results["qsd"]["depth"]
    assert results["pynbd"]["alloc"] == results["qsd"]["alloc"]
    assert results["pynbd"]["bitmaps"] == results["qsd"]["bitmaps"]
