"""blockdev-backup sync=bitmap with bitmap-mode never and always, and sync=top, against
qemu-storage-daemon: the same bytes in the target and the same bitmap afterwards."""

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import nbdinfo_map, run

MiB = 1 << 20
SIZE = 8 * MiB


def bitmap_count(daemon, node, name):
    nodes = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes")}
    return {b["name"]: b["count"] for b in nodes[node].get("dirty-bitmaps", [])}[name]


def setup(start_daemon, kind, workdir):
    disk, target = workdir / f"{kind}-disk.raw", workdir / f"{kind}-target.raw"
    disk.write_bytes(bytes(range(1, 256)) * (SIZE // 255) + bytes(SIZE % 255))
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon(
        kind,
        "--blockdev",
        f"driver=file,node-name=d0,filename={disk}",
        "--blockdev",
        f"driver=file,node-name=t0,filename={target}",
    )
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="b0", granularity=65536)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("w"))
    h.pwrite(b"\x01" * 4096, MiB)
    h.pwrite(b"\x02" * 4096, 5 * MiB)
    h.flush()
    return daemon, h, disk, target


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["never", "always", "on-success"])
def test_bitmap_modes_after_success(kind, mode, start_daemon, workdir):
    daemon, h, disk, target = setup(start_daemon, kind, workdir)
    daemon.ok(
        "blockdev-backup", device="d0", target="t0", sync="bitmap", bitmap="b0", **{"bitmap-mode": mode, "job-id": "j"}
    )
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    h.pwrite(b"\x03" * 4096, 7 * MiB)  # after the backup
    h.shutdown()
    copied = target.read_bytes()
    assert copied[MiB : MiB + 4096] == b"\x01" * 4096 and copied[5 * MiB : 5 * MiB + 4096] == b"\x02" * 4096
    assert copied[3 * MiB : 3 * MiB + 4096] == bytes(4096)  # clean: not copied
    expected = {"never": 3, "always": 1, "on-success": 1}[mode]  # dirty clusters left in b0
    assert bitmap_count(daemon, "d0", "b0") == expected * 65536


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["never", "always", "on-success"])
def test_bitmap_modes_after_cancel(kind, mode, start_daemon, workdir):
    daemon, h, disk, target = setup(start_daemon, kind, workdir)
    daemon.ok(
        "blockdev-backup",
        device="d0",
        target="t0",
        sync="bitmap",
        bitmap="b0",
        speed=1,  # crawls: cancelled before it copies much
        **{"bitmap-mode": mode, "job-id": "j"},
    )
    daemon.ok("block-job-cancel", device="j")
    daemon.wait_event("BLOCK_JOB_CANCELLED")
    h.shutdown()
    # never and on-success take the whole bitmap back; always keeps only what was not copied (the
    # first chunk goes before the speed limit bites, in qemu and here alike)
    assert bitmap_count(daemon, "d0", "b0") == (1 if mode == "always" else 2) * 65536


@pytest.mark.parametrize("kind", KINDS)
def test_sync_top_copies_only_the_top_layer(kind, start_daemon, workdir):
    base, top, target = (workdir / f"{kind}-{n}" for n in ("base.qcow2", "top.qcow2", "target.raw"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 64k", str(top)])
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon(
        kind,
        "--blockdev",
        f"driver=file,node-name=tf,filename={top}",
        "--blockdev",
        "driver=qcow2,node-name=top,file=tf",
        "--blockdev",
        f"driver=file,node-name=t0,filename={target}",
    )
    daemon.fails("blockdev-backup", device="top", target="t0", sync="top")  # no job-id: no default here
    daemon.ok("blockdev-backup", device="top", target="t0", sync="top", **{"job-id": "j"})
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    copied = target.read_bytes()
    assert copied[MiB : MiB + 65536] == b"\x22" * 65536
    assert copied[:MiB] == bytes(MiB)  # base data is not the top layer's


def dirty_extents(daemon, node, name):
    """The bitmap's dirty (offset, length) runs, read through an export with its qemu:dirty-bitmap context."""
    daemon.ok("block-export-add", type="nbd", id="map", **{"node-name": node}, name="map", bitmaps=[name])
    try:
        extents = nbdinfo_map(daemon.uri("map"), context=f"qemu:dirty-bitmap:{name}")
    finally:
        daemon.ok("block-export-del", id="map")
        daemon.wait_event("BLOCK_EXPORT_DELETED")
    return [(offset, length) for offset, length, flags in extents if flags & 1]


def backup_with_disabled_bitmap(start_daemon, kind, workdir, sync, mode, end):
    """b0 holds the writes at 1 MiB and 5 MiB and is disabled; a crawling backup from it runs while
    the guest writes at 7 MiB, then completes or is cancelled. Returns what b0 looks like then."""
    daemon, h, disk, target = setup(start_daemon, kind, workdir)
    daemon.ok("block-dirty-bitmap-disable", node="d0", name="b0")
    options = {"bitmap-mode": mode} if mode else {}
    job = {"job-id": "j", "device": "d0", "target": "t0", "sync": sync, "bitmap": "b0", "speed": 1, **options}
    daemon.ok("blockdev-backup", **job)
    h.pwrite(b"\x07" * 4096, 7 * MiB)  # during the job: a disabled bitmap must not record it
    h.flush()
    [info] = [b for b in bitmaps_of(daemon, "d0") if b.get("name") == "b0"]  # qemu also lists its job's anonymous ones
    assert info["busy"] and not info["recording"], info
    if end == "complete":
        daemon.ok("block-job-set-speed", device="j", speed=0)
        assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    else:
        for _ in range(10_000):  # the first chunk goes before the speed limit bites: let it land
            if daemon.ok("query-jobs")[0]["current-progress"]:
                break
        daemon.ok("block-job-cancel", device="j")
        daemon.wait_event("BLOCK_JOB_CANCELLED")
    h.pwrite(b"\x08" * 4096, 3 * MiB)  # after the job: still disabled
    h.shutdown()
    [info] = [b for b in bitmaps_of(daemon, "d0") if b.get("name") == "b0"]
    return {"info": info, "dirty": dirty_extents(daemon, "d0", "b0")}


def bitmaps_of(daemon, node):
    nodes = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes")}
    return nodes[node].get("dirty-bitmaps", [])


@pytest.mark.parametrize("end", ["complete", "cancel"])
@pytest.mark.parametrize(
    ("sync", "mode"), [("incremental", None), ("bitmap", "on-success"), ("bitmap", "never"), ("bitmap", "always")]
)
def test_a_disabled_bitmap_records_nothing_during_its_backup(sync, mode, end, start_daemon, workdir):
    """qemu's successor inherits the disabled state: the guest's write during the job is in the
    bitmap afterwards in no mode, whether the job completes or is cancelled."""
    seen = {kind: backup_with_disabled_bitmap(start_daemon, kind, workdir, sync, mode, end) for kind in KINDS}
    assert seen["pynbd"] == seen["qsd"]
    dirty, info = seen["pynbd"]["dirty"], seen["pynbd"]["info"]
    assert not info["recording"] and not info["busy"]
    assert info["count"] == sum(length for _, length in dirty)
    assert all(not (offset <= 7 * MiB < offset + length) for offset, length in dirty), dirty
    assert all(not (offset <= 3 * MiB < offset + length) for offset, length in dirty), dirty
    emptied = end == "complete" and mode != "never"  # the (empty) successor took the bitmap's place
    if emptied:
        assert dirty == []
    elif end == "cancel" and mode == "always":
        assert dirty == [(5 * MiB, 65536)]  # what was not copied (the first chunk at 1 MiB was)
    else:
        assert dirty == [(MiB, 65536), (5 * MiB, 65536)]  # taken back as it was
