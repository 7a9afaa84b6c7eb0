"""Mirror, commit (intermediate and active), stream and snapshot: the same QMP scripts against
pynbd daemon and qemu-storage-daemon, compared by what an NBD client reads afterwards."""

import json
import os

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

MiB = 1 << 20
SIZE = 8 * MiB


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = b"".join(h.pread(MiB, off) for off in range(0, h.get_size(), MiB))
    h.shutdown()
    return data


def assert_image_reads(image, expected, workdir):
    """The image file alone, opened by qemu after the daemon is gone, shows ``expected``."""
    out = workdir / f"{image.stem}-converted.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(out)])
    assert out.read_bytes() == expected
    out.unlink()


def chain(workdir, kind):
    """base <- mid <- top, each layer writing its own pattern."""
    paths = [workdir / f"{kind}-{name}.qcow2" for name in ("base", "mid", "top")]
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(paths[0]), str(SIZE)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", paths[0].name, "-F", "qcow2", str(paths[1])])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", paths[1].name, "-F", "qcow2", str(paths[2])])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 3M", str(paths[0])])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 2M", str(paths[1])])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 2M", "-c", "write -z 6M 64k", str(paths[2])])
    return paths


def start_chain(start_daemon, kind, top_path):
    daemon = start_daemon(kind, "--blockdev", f"driver=file,node-name=tf,filename={top_path}")
    daemon.ok("blockdev-add", driver="qcow2", file="tf", **{"node-name": "top"})
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "top"}, name="w", writable=True)
    return daemon


def node_names(daemon):
    return {n["node-name"]: n for n in daemon.ok("query-named-block-nodes")}


def backing_of(daemon, name):
    graph = daemon.ok("x-debug-query-block-graph")
    ids = {n["id"]: n["name"] for n in graph["nodes"]}
    for edge in graph["edges"]:
        if ids[edge["parent"]] == name and edge["name"] == "backing":
            return ids[edge["child"]]
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_active_commit_pivots_to_the_base(kind, start_daemon, workdir):
    base, _, top = chain(workdir, kind)
    run(["qemu-img", "bitmap", "--add", str(base), "b0"])  # the base is reopened read-write and back
    daemon = start_chain(start_daemon, kind, top)
    before = read_all(daemon.uri("w"))
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    daemon.ok("block-commit", device="top", **{"job-id": "c"})
    daemon.wait_event("BLOCK_JOB_READY")
    writer.pwrite(b"\x44" * 65536, 5 * MiB)  # while ready: must reach the base too
    daemon.ok("block-job-complete", device="c")
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    writer.pwrite(b"\x55" * 4096, 7 * MiB)  # after the pivot the export writes the base
    writer.flush()
    writer.shutdown()
    expected = bytearray(before)
    expected[5 * MiB : 5 * MiB + 65536] = b"\x44" * 65536
    expected[7 * MiB : 7 * MiB + 4096] = b"\x55" * 4096
    assert read_all(daemon.uri("w")) == expected
    assert daemon.ok("query-block-exports")[0]["node-name"] != "top"
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(base)])
    info = json.loads(run(["qemu-img", "info", "--output=json", str(base)]).stdout)
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"]) for b in bitmaps] == [("b0", ["auto"])]  # stored, not left in use
    out = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x44 5M 64k", "-c", "read -P 0x33 2M 2M", str(base)])
    assert "Pattern verification failed" not in out.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_intermediate_commit_drops_the_middle_layer(kind, start_daemon, workdir):
    base, mid, top = chain(workdir, kind)
    daemon = start_chain(start_daemon, kind, top)
    before = read_all(daemon.uri("w"))
    mid_node = backing_of(daemon, "top")
    base_node = backing_of(daemon, mid_node)
    daemon.ok("block-commit", device="top", **{"top-node": mid_node, "base-node": base_node, "job-id": "c"})
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert backing_of(daemon, "top") == base_node
    assert read_all(daemon.uri("w")) == before
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(base)])
    info = json.loads(run(["qemu-img", "info", "--output=json", str(top)]).stdout)
    assert os.path.basename(info["backing-filename"]) == base.name  # the header names the new chain
    assert_image_reads(top, before, workdir)
    out = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x22 1M 2M", str(base)])  # mid's data is in base
    assert "Pattern verification failed" not in out.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_stream_pulls_the_chain_into_the_top(kind, start_daemon, workdir):
    base, mid, top = chain(workdir, kind)
    daemon = start_chain(start_daemon, kind, top)
    before = read_all(daemon.uri("w"))
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    daemon.ok("block-stream", device="top", **{"job-id": "s"})  # everything, no base left
    writer.pwrite(b"\x66" * 512, 1 * MiB)  # racing the copy-up of the same range
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    writer.flush()
    writer.shutdown()
    expected = bytearray(before)
    expected[MiB : MiB + 512] = b"\x66" * 512
    assert read_all(daemon.uri("w")) == expected
    assert backing_of(daemon, "top") is None
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(top)])
    assert "backing-filename" not in json.loads(run(["qemu-img", "info", "--output=json", str(top)]).stdout)
    assert_image_reads(top, expected, workdir)


@pytest.mark.parametrize("kind", KINDS)
def test_mirror_keeps_the_target_in_step_and_pivots(kind, start_daemon, workdir):
    source, target = workdir / f"{kind}-src.raw", workdir / f"{kind}-dst.raw"
    source.write_bytes(bytes(range(256)) * (SIZE // 256))
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon(
        kind,
        "--blockdev",
        f"driver=file,node-name=s0,filename={source}",
        "--blockdev",
        f"driver=file,node-name=t0,filename={target}",
    )
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "s0"}, name="w", writable=True)
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    daemon.ok("blockdev-mirror", device="s0", target="t0", sync="full", **{"job-id": "m"})
    writer.pwrite(b"\x77" * 4096, 3 * MiB)
    daemon.wait_event("BLOCK_JOB_READY")
    writer.pwrite(b"\x78" * 4096, 4 * MiB)
    daemon.ok("block-job-complete", device="m")
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    writer.pwrite(b"\x79" * 4096, 5 * MiB)  # after the pivot: only the target gets it
    writer.flush()
    writer.shutdown()
    assert daemon.ok("query-block-exports")[0]["node-name"] == "t0"
    src, dst = source.read_bytes(), target.read_bytes()
    assert dst[: 5 * MiB] == src[: 5 * MiB] and dst[5 * MiB : 5 * MiB + 4096] == b"\x79" * 4096
    assert src[5 * MiB : 5 * MiB + 4096] != b"\x79" * 4096


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_puts_an_overlay_under_the_export(kind, start_daemon, workdir):
    base, _, top = chain(workdir, kind)
    overlay = workdir / f"{kind}-overlay.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), str(SIZE)])
    daemon = start_chain(start_daemon, kind, top)
    before = read_all(daemon.uri("w"))
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "ov"},
        file={"driver": "file", "filename": str(overlay)},
        backing=None,
    )
    daemon.ok("blockdev-snapshot", node="top", overlay="ov")
    assert daemon.ok("query-block-exports")[0]["node-name"] == "ov"
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    writer.pwrite(b"\x88" * 4096, 0)
    writer.flush()
    writer.shutdown()
    expected = bytearray(before)
    expected[:4096] = b"\x88" * 4096
    assert read_all(daemon.uri("w")) == expected
    daemon.fails("blockdev-snapshot", node="top", overlay="ov")  # already has a backing
    assert daemon.stop() == 0
    out = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 4096", str(top)])  # top itself unchanged
    assert "Pattern verification failed" not in out.stdout
    run(["qemu-img", "check", str(overlay)])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sync", ["top", "none"])
def test_mirror_sync_top_and_none_copy_only_their_part(kind, sync, start_daemon, workdir):
    base, _, top = chain(workdir, kind)
    target = workdir / f"{kind}-mirror-target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_chain(start_daemon, kind, top)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "t0"}, filename=str(target))
    writer = nbd.NBD()
    writer.connect_uri(daemon.uri("w"))
    daemon.ok("blockdev-mirror", device="top", target="t0", sync=sync, **{"job-id": "m"})
    daemon.wait_event("BLOCK_JOB_READY")
    writer.pwrite(b"\x9a" * 4096, 7 * MiB)  # while mirroring: reaches the target in every mode
    writer.flush()
    writer.shutdown()
    daemon.ok("block-job-cancel", device="m")  # after ready: complete without pivot
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED")["data"]
    copied = target.read_bytes()
    assert copied[7 * MiB : 7 * MiB + 4096] == b"\x9a" * 4096
    top_layer = copied[2 * MiB : 4 * MiB]  # written in top (0x33)
    assert top_layer == (b"\x33" * (2 * MiB) if sync == "top" else bytes(2 * MiB))
    assert copied[:MiB] == bytes(MiB)  # base data: not part of either
    assert daemon.ok("query-block-exports")[0]["node-name"] == "top"  # no pivot
