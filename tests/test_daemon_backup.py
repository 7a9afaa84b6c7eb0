"""Backup jobs and fleecing through the daemon, against qemu-storage-daemon where qemu has the same."""

import hashlib
import os

import nbd
import pytest

from tests.daemons import KINDS

MiB = 1 << 20
SIZE = 8 * MiB


def pattern_image(path, seed=1):
    data = bytearray(SIZE)
    for i in range(0, SIZE, 128 * 1024):
        data[i : i + 65536] = bytes([(i // 65536 + seed) % 251 + 1]) * 65536
    path.write_bytes(data)
    return bytes(data)


def blank(path):
    with open(path, "wb") as f:
        f.truncate(SIZE)


@pytest.fixture
def setup(workdir):
    disk, target = workdir / "disk.raw", workdir / "target.raw"
    original = pattern_image(disk)
    blank(target)
    return disk, target, original


def start(start_daemon, kind, disk, target):
    daemon = start_daemon(
        kind,
        "--blockdev",
        f"driver=file,node-name=f0,filename={disk}",
        "--blockdev",
        "driver=raw,node-name=d0,file=f0",
        "--blockdev",
        f"driver=file,node-name=t0,filename={target}",
    )
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
    return daemon


@pytest.mark.parametrize("kind", KINDS)
def test_full_backup_is_the_disk_at_job_start_while_the_writer_goes_on(kind, start_daemon, setup):
    disk, target, original = setup
    daemon = start(start_daemon, kind, disk, target)
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    daemon.ok("blockdev-backup", device="d0", target="t0", sync="full", speed=4 * MiB, **{"job-id": "b0"})
    # the writer keeps writing while the (rate-limited) job runs; every write is copied first
    for i in range(0, SIZE, MiB):
        writer.pwrite(b"\xee" * 4096, i + 4096)
    daemon.wait_event("BLOCK_JOB_COMPLETED")
    writer.flush()
    writer.shutdown()
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(original).digest()
    assert disk.read_bytes()[4096:8192] == b"\xee" * 4096
    assert daemon.ok("query-jobs") == []


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_backup_copies_only_the_dirty_clusters(kind, start_daemon, setup):
    disk, target, original = setup
    daemon = start(start_daemon, kind, disk, target)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="b0", granularity=65536)
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    writer.pwrite(b"\x11" * 100, 3 * MiB)
    writer.flush()
    daemon.ok("blockdev-backup", device="d0", target="t0", sync="incremental", bitmap="b0", **{"job-id": "i0"})
    completed = daemon.wait_event("BLOCK_JOB_COMPLETED")
    assert completed["data"]["len"] == 65536 and "error" not in completed["data"]
    writer.shutdown()
    copied = target.read_bytes()
    expected = bytearray(SIZE)
    expected[3 * MiB : 3 * MiB + 65536] = disk.read_bytes()[3 * MiB : 3 * MiB + 65536]
    assert copied == bytes(expected)
    nodes = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes")}
    assert nodes["d0"]["dirty-bitmaps"][0]["count"] == 0  # on-success: the bitmap restarts


@pytest.mark.parametrize("kind", KINDS)
def test_cancelled_backup_leaves_the_graph_and_bitmap_as_before(kind, start_daemon, setup):
    disk, target, _ = setup
    daemon = start(start_daemon, kind, disk, target)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="b0")
    daemon.ok("blockdev-backup", device="d0", target="t0", sync="none", **{"job-id": "f"})
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    writer.pwrite(b"\x22" * 512, 0)
    writer.flush()
    daemon.ok("block-job-cancel", device="f")
    assert daemon.wait_event("BLOCK_JOB_CANCELLED")["data"]["device"] == "f"
    writer.pwrite(b"\x33" * 512, MiB)  # no filter any more: no copy
    writer.shutdown()
    bitmaps = {n["node-name"]: n.get("dirty-bitmaps") for n in daemon.ok("query-named-block-nodes")}
    assert bitmaps["d0"][0]["count"] == 2 * 65536
    target_bytes = target.read_bytes()
    assert target_bytes[MiB : MiB + 512] == bytes(512)
    graph = daemon.ok("x-debug-query-block-graph")
    assert sorted(n["name"] for n in graph["nodes"] if n["type"] == "block-driver") == ["d0", "f0", "t0"]


@pytest.mark.parametrize("kind", KINDS)
def test_backup_argument_errors(kind, start_daemon, setup):
    disk, target, _ = setup
    daemon = start(start_daemon, kind, disk, target)
    job = {"job-id": "j"}
    daemon.fails("blockdev-backup", device="d0", target="t0", sync="incremental", **job)  # no bitmap
    daemon.fails("blockdev-backup", device="d0", target="t0", sync="bitmap", bitmap="nope", **job)
    daemon.fails("blockdev-backup", device="d0", target="nope", sync="full", **job)
    daemon.fails("blockdev-backup", device="d0", target="t0", sync="sideways", **job)
    daemon.fails("blockdev-backup", device="d0", target="t0", sync="full")  # no job-id: no default here
    daemon.fails("block-job-cancel", device="nope")
    assert daemon.ok("query-block-jobs") == []


def test_fleecing_new_way_inserted_atomically_with_the_checkpoint(start_daemon, setup, workdir):
    """pynbd only: qemu 7.2 cannot insert copy-before-write under a live export in a transaction."""
    disk, target, original = setup
    daemon = start(start_daemon, "pynbd", disk, target)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="c0")
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    writer.pwrite(b"\x44" * 4096, 2 * MiB)
    writer.flush()
    before = disk.read_bytes()
    # discard=unmap: pass TRIMs on (blockdev-add's default, as in qemu, is to drop them)
    daemon.ok(
        "blockdev-add", driver="copy-before-write", file="d0", target="t0", discard="unmap", **{"node-name": "cbw"}
    )
    daemon.ok(
        "transaction",
        actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "c1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "d0", "name": "c0"}},
            {"type": "blockdev-insert-filter", "data": {"filter": "cbw"}},
        ],
    )
    daemon.ok("blockdev-add", driver="snapshot-access", file="cbw", discard="unmap", **{"node-name": "snap"})
    # writable only so that the reader may TRIM what it has read (writes are refused by snapshot-access)
    daemon.ok(
        "block-export-add",
        type="nbd",
        id="f",
        **{"node-name": "snap"},
        name="fleece",
        writable=True,
        bitmaps=[{"node": "d0", "name": "c0"}],
    )
    # the guest keeps writing through its old export, which now goes through the filter
    for i in range(0, SIZE, MiB // 2):
        writer.pwrite(os.urandom(4096), i)
    reader = nbd.NBD()
    reader.add_meta_context("qemu:dirty-bitmap:c0")
    reader.connect_uri(daemon.uri("fleece"))
    snapshot = b"".join(reader.pread(MiB, off) for off in range(0, SIZE, MiB))
    assert snapshot == before
    dirty = []
    reader.block_status(SIZE, 0, lambda ctx, off, entries, err: dirty.extend(entries))
    assert dirty == [2 * MiB, 0, 65536, 1, SIZE - 2 * MiB - 65536, 0]
    with pytest.raises(nbd.Error):
        reader.pwrite(b"x" * 512, 0)
    reader.trim(MiB, 0)  # done with the first MiB: copies there are released
    with pytest.raises(nbd.Error):
        reader.pread(4096, 0)
    reader.shutdown()
    writer.shutdown()
    daemon.ok("block-export-del", id="f")
    daemon.ok("blockdev-del", **{"node-name": "snap"})
    daemon.ok("blockdev-remove-filter", filter="cbw")
    daemon.ok("blockdev-del", **{"node-name": "cbw"})
    nodes = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes")}
    assert {b["name"]: b["count"] for b in nodes["d0"]["dirty-bitmaps"]} == {"c0": 65536, "c1": 16 * 65536}


def test_a_failed_transaction_leaves_an_inserted_filters_fleecing_point_alone(start_daemon, setup, workdir):
    """pynbd only. Re-inserting (or removing) an inserted copy-before-write filter in a transaction
    that then fails changes nothing: the filter keeps what it copied, so the snapshot still reads
    the disk as it was when the filter went in, and it keeps copying."""
    disk, target, original = setup
    daemon = start(start_daemon, "pynbd", disk, target)
    daemon.ok("blockdev-add", driver="copy-before-write", file="d0", target="t0", **{"node-name": "cbw"})
    daemon.ok("blockdev-insert-filter", filter="cbw")
    daemon.ok("blockdev-add", driver="snapshot-access", file="cbw", **{"node-name": "snap"})
    daemon.ok("block-export-add", type="nbd", id="f", **{"node-name": "snap"}, name="fleece")
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    reader = nbd.NBD()
    reader.connect_uri(daemon.uri("fleece"))
    try:
        writer.pwrite(b"\x01" * 65536, 0)  # copied to the target first
        for change in ("blockdev-insert-filter", "blockdev-remove-filter"):
            error = daemon.fails(
                "transaction", actions=[{"type": change, "data": {"filter": "cbw"}}, {"type": "abort", "data": {}}]
            )
            assert "Abort action" in error
        writer.pwrite(b"\x02" * 65536, 4 * MiB)  # still goes through the filter, still copied
        writer.flush()
        assert reader.pread(SIZE, 0) == original
        assert disk.read_bytes()[:65536] == b"\x01" * 65536
    finally:
        reader.shutdown()
        writer.shutdown()
