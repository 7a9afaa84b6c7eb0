"""The slow-target overlay: a backup lands in a fast local qcow2 overlay whose backing is the
slow remote target, and an active commit drains the overlay into the target alongside. At the end
the slow target holds the disk as it was when the backup started, the overlay passes qemu-img
check, and the writer of the live disk was served throughout. Run against pynbd daemon and
qemu-storage-daemon with the same QMP script (docs/slow-target.md walks through it)."""

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

MiB = 1 << 20
SIZE = 16 * MiB


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = b"".join(h.pread(MiB, off) for off in range(0, SIZE, MiB))
    h.shutdown()
    return data


SCENARIOS = [(kind, "later") for kind in KINDS] + [("pynbd", "alongside")]


@pytest.mark.parametrize(("kind", "commit"), SCENARIOS)
def test_backup_through_a_fast_overlay_reaches_the_slow_target(kind, commit, start_daemon, start_nbdkit, workdir):
    """``later``: commit once the backup is done. ``alongside``: commit while the backup still
    writes the overlay; qemu 7.2 refuses that ("Need a root block node": the overlay is the
    backup's target), pynbd allows it because the commit's mirror filter simply takes the
    backup's place as the overlay's user."""
    disk, overlay = workdir / "disk.qcow2", workdir / "overlay.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 6M", "-c", "write -P 0x5b 10M 2M", str(disk)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), str(SIZE)])
    slow = start_nbdkit("--filter=delay", "memory", str(SIZE), "wdelay=5ms")
    daemon = start_daemon(
        kind,
        "--blockdev",
        f"driver=file,node-name=df,filename={disk}",
        "--blockdev",
        "driver=qcow2,node-name=disk,file=df",
    )
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "disk"}, name="w", writable=True)
    daemon.ok("blockdev-add", driver="nbd", **{"node-name": "slow"}, server={"type": "unix", "path": slow.socket_path})
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "fast"},
        file={"driver": "file", "filename": str(overlay)},
        backing="slow",
    )
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    at_start = read_all(daemon.uri("w"))
    daemon.ok("blockdev-backup", device="disk", target="fast", sync="full", **{"job-id": "bk"})
    if commit == "alongside":
        daemon.ok("block-commit", device="fast", **{"job-id": "cm"})
    # the guest keeps writing through the whole backup; every write must succeed
    for i in range(32):
        writer.pwrite(bytes([i]) * 65536, (i * 3 * 65536) % SIZE)
    writer.flush()
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "bk")["data"]
    if commit == "later":
        daemon.ok("block-commit", device="fast", **{"job-id": "cm"})
    daemon.wait_event("BLOCK_JOB_READY", "cm")
    daemon.ok("block-job-complete", device="cm")
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "cm")["data"]
    writer.pwrite(b"\xff" * 4096, 0)  # the disk is still served after both jobs
    writer.shutdown()
    assert read_all(slow.uri) == at_start
    graph = daemon.ok("x-debug-query-block-graph")
    assert "fast" in {n["name"] for n in graph["nodes"]}  # unused now: the caller may drop it
    daemon.ok("blockdev-del", **{"node-name": "fast"})
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(overlay)])
    run(["qemu-img", "check", str(disk)])
