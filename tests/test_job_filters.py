"""A job's filter belongs to the job: nobody else may freeze its links, so the job's clean-up can
always take it out and leave the graph as it found it (issue 10.7)."""

from __future__ import annotations

from tests.peers import run
from tests.test_daemon_blockjobs import backing_of

MiB = 1 << 20
SIZE = 4 * MiB


def test_a_stream_through_a_mirror_filter_is_refused_and_the_mirror_ends_cleanly(start_daemon, workdir):
    base, overlay, target = (workdir / f"{name}.qcow2" for name in ("base", "ov", "tgt"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 1M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(overlay)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(SIZE)])
    daemon = start_daemon("pynbd")
    daemon.ok("blockdev-add", driver="file", **{"node-name": "bf"}, filename=str(base))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "base"}, file="bf")
    daemon.ok("blockdev-add", driver="file", **{"node-name": "of"}, filename=str(overlay))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "ov"}, file="of", backing="base")
    daemon.ok("blockdev-add", driver="file", **{"node-name": "tf"}, filename=str(target))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "tgt"}, file="tf")
    before = daemon.ok("x-debug-query-block-graph")
    daemon.ok("blockdev-mirror", **{"job-id": "m"}, device="base", target="tgt", sync="full")
    daemon.wait_event("BLOCK_JOB_READY", "m")
    assert backing_of(daemon, "ov") not in ("base", None)  # the overlay now reads through the filter
    refusal = daemon.fails("block-stream", **{"job-id": "s"}, device="ov")
    assert "filter of job 'm'" in refusal
    daemon.ok("block-job-cancel", device="m")  # ready: completes without a pivot
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "m")["data"]
    assert daemon.ok("query-jobs") == []
    assert daemon.ok("x-debug-query-block-graph") == before
    assert backing_of(daemon, "ov") == "base"
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(overlay)])
    out = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x42 0 1M", str(target)])
    assert "Pattern verification failed" not in out.stdout
