"""pynbd's job options beyond qemu, and cancelled jobs leaving the graph as it was."""

import os

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

MiB = 1 << 20
SIZE = 8 * MiB


def three_layers(workdir, kind):
    base, mid, top = (workdir / f"{kind}-{n}.qcow2" for n in ("base", "mid", "top"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(mid)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(base)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 2M 2M", str(mid)])
    return base, mid, top


def start_on(start_daemon, kind, top, mid=None):
    options = []
    if mid is not None:  # the middle layer writable and named, so a commit can punch it
        options += ["--blockdev", f"driver=file,node-name=mf,filename={mid},discard=unmap"]
        options += ["--blockdev", "driver=qcow2,node-name=mid,file=mf,discard=unmap"]
        options += ["--blockdev", f"driver=file,node-name=tf,filename={top}"]
        options += ["--blockdev", "driver=qcow2,node-name=top,file=tf,backing=mid"]
    else:
        options += ["--blockdev", f"driver=file,node-name=tf,filename={top}"]
        options += ["--blockdev", "driver=qcow2,node-name=top,file=tf"]
    daemon = start_daemon(kind, *options)
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "top"}, name="w", writable=True)
    return daemon


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = b"".join(h.pread(MiB, off) for off in range(0, SIZE, MiB))
    h.shutdown()
    return data


def test_commit_copies_only_what_the_layers_allocate_and_can_punch_them(start_daemon, workdir):
    base, mid, top = three_layers(workdir, "pynbd")
    daemon = start_on(start_daemon, "pynbd", top, mid)
    before = read_all(daemon.uri("w"))
    used_before = os.stat(mid).st_blocks
    base_node = next(
        n["node-name"] for n in daemon.ok("query-named-block-nodes") if n["image"]["filename"] == str(base)
    )
    daemon.ok(
        "block-commit",
        device="top",
        **{"top-node": "mid", "base-node": base_node, "job-id": "c", "x-discard-committed": True},
    )
    done = daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert "error" not in done and done["len"] == 2 * MiB  # mid's 2 MiB; nothing else was read
    assert read_all(daemon.uri("w")) == before
    assert daemon.stop() == 0
    assert os.stat(mid).st_blocks < used_before  # the committed clusters were given back
    run(["qemu-img", "check", str(mid)])
    run(["qemu-img", "check", str(base)])
    restored = workdir / "restored.raw"  # the files alone still read the same, through either chain
    for image in (top, mid):
        run(["qemu-img", "convert", "-O", "raw", str(image), str(restored)])
        assert restored.read_bytes()[: 4 * MiB] == before[: 4 * MiB]


def test_copy_on_read_copies_up_and_releases_what_it_only_copied(start_daemon, workdir):
    base, _, top = three_layers(workdir, "pynbd")
    daemon = start_daemon(
        "pynbd",
        "--blockdev",
        f"driver=file,node-name=tf,filename={top}",
        "--blockdev",
        "driver=qcow2,node-name=top,file=tf,discard=unmap",
    )
    daemon.ok("blockdev-add", driver="copy-on-read", file="top", **{"node-name": "cor", "x-track-copied": True})
    daemon.ok(
        "block-export-add",
        type="nbd",
        id="r",
        **{"node-name": "cor", "allocation-depth": True},
        name="r",
        writable=True,
    )
    h = nbd.NBD()
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(daemon.uri("r"))
    assert h.pread(65536, 2 * MiB) == b"\x22" * 65536  # read through: the whole cluster copied up into top
    h.pwrite(b"\x33" * 4096, 3 * MiB)  # a real write: never released
    depths = []
    h.block_status(SIZE, 0, lambda ctx, off, entries, err: depths.extend(entries))
    h.shutdown()
    assert depths[:6] == [MiB, 3, MiB, 0, 65536, 1]  # base, absent, the copied-up cluster in top
    assert daemon.ok("x-copy-on-read-release", **{"node-name": "cor"}) == {"released": 65536}
    h = nbd.NBD()
    h.connect_uri(daemon.uri("r"))
    assert h.pread(4096, 2 * MiB) == b"\x22" * 4096  # still the same bytes, now from the backing
    assert h.pread(4096, 3 * MiB) == b"\x33" * 4096
    h.shutdown()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("job", ["mirror", "commit", "stream"])
def test_paused_resumed_and_cancelled_jobs_leave_the_graph_as_it_was(kind, job, start_daemon, workdir):
    _, _, top = three_layers(workdir, kind)
    target = workdir / f"{kind}-target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_on(start_daemon, kind, top)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "t0"}, filename=str(target))
    before = daemon.ok("x-debug-query-block-graph")
    data = read_all(daemon.uri("w"))
    common = {"job-id": "j", "speed": 1}
    if job == "mirror":
        daemon.ok("blockdev-mirror", device="top", target="t0", sync="full", **common)
    elif job == "commit":
        daemon.ok("block-commit", device="top", **common)
    else:
        daemon.ok("block-stream", device="top", **common)
    for verb, status in (("block-job-pause", "paused"), ("block-job-resume", "running")):
        daemon.ok(verb, device="j")  # a job sleeping for its speed limit reacts at once
        while daemon.wait_event("JOB_STATUS_CHANGE")["data"]["status"] != status:
            pass
        assert daemon.ok("query-block-jobs")[0]["status"] == status
    daemon.ok("block-job-cancel", device="j", force=True)
    daemon.wait_event("BLOCK_JOB_CANCELLED")
    after = daemon.ok("x-debug-query-block-graph")
    names = lambda graph: sorted(n["name"] for n in graph["nodes"])  # noqa: E731
    assert names(after) == names(before)
    assert len(after["edges"]) == len(before["edges"])
    assert read_all(daemon.uri("w")) == data
