"""blockdev-backup sync=bitmap with bitmap-mode never and always, and sync=top, against
qemu-storage-daemon: the same bytes in the target and the same bitmap afterwards."""

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

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
