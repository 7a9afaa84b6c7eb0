"""Giving back what copy-on-read copied up (``x-track-copied``, ``x-copy-on-read-release``).

A cluster of the top may be released only if the filter copied all of it up, nobody wrote it since
(through the filter or any other way into the top), and the top still has the same backing chain
beneath it, unwritten there since. Each test checks what NBD clients read back, what ``qemu-img
map`` shows in the top afterwards and that ``qemu-img check`` is clean; the copy-up itself is
compared with qemu-storage-daemon's copy-on-read filter.
"""

import json
import os
import random

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB
BASE_DATA = (0, 2 * MiB)  # the base holds 0x11 here, nothing elsewhere


def make_images(workdir, cluster_size: int, tag: str = ""):
    """A base with 0x11 over its first 2 MiB and an empty top (of ``cluster_size``) above it."""
    base, top = workdir / f"base{tag}.qcow2", workdir / f"top{tag}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 {BASE_DATA[0]} {BASE_DATA[1]}", str(base)])
    options = f"cluster_size={cluster_size}"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "-b", base.name, "-F", "qcow2", str(top)])
    return base, top


def start(start_daemon, base, top, kind="pynbd", track=True):
    """The daemon with ``top`` over ``base`` (read-only, as backing files are opened), a
    copy-on-read filter ``cor`` on the top exported writable as "r", and the top itself exported
    writable as "t": a way to write the top that bypasses the filter, and to read it back
    without copying anything up."""
    daemon = start_daemon(
        kind,
        "--blockdev", f"driver=file,node-name=bf,filename={base},read-only=on",
        "--blockdev", "driver=qcow2,node-name=base,file=bf,read-only=on",
        "--blockdev", f"driver=file,node-name=tf,filename={top},discard=unmap",
        "--blockdev", "driver=qcow2,node-name=top,file=tf,backing=base,discard=unmap",
    )  # fmt: skip
    options = {"node-name": "cor"}
    if track:
        options["x-track-copied"] = True
    daemon.ok("blockdev-add", driver="copy-on-read", file="top", **options)
    daemon.ok("block-export-add", type="nbd", id="r", **{"node-name": "cor"}, name="r", writable=True)
    daemon.ok("block-export-add", type="nbd", id="t", **{"node-name": "top"}, name="t", writable=True)
    return daemon


def connect(daemon, export: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(daemon.uri(export))
    return h


def read_top(daemon, length: int, offset: int) -> bytes:
    """Read the top past the filter: what the guest sees, without copying anything up again."""
    h = connect(daemon, "t")
    data = h.pread(length, offset)
    h.shutdown()
    return data


def release(daemon) -> int:
    return daemon.ok("x-copy-on-read-release", **{"node-name": "cor"})["released"]


def in_top(image) -> list[tuple[int, int]]:
    """(start, length) of what ``qemu-img map`` finds allocated in the top layer itself."""
    out = json.loads(run(["qemu-img", "map", "--output=json", str(image)]).stdout)
    ranges: list[tuple[int, int]] = []
    for extent in out:
        if extent["depth"] == 0 and extent["present"]:
            if ranges and sum(ranges[-1]) == extent["start"]:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + extent["length"])
            else:
                ranges.append((extent["start"], extent["length"]))
    return ranges


def finish(daemon, *images) -> None:
    """Stop the daemon and check the images it left behind."""
    assert daemon.stop() == 0, daemon.log()
    for image in images:
        run(["qemu-img", "check", str(image)])


# -- the three ways today's release lost data ----------------------------------------------------


def test_release_leaves_the_tops_own_clusters_beside_a_copied_up_one(start_daemon, workdir):
    """A 4 KiB-cluster top: releasing a copied-up cluster leaves its neighbours in the same
    64 KiB alone (the guest's own data, and a cluster the copy-up only partly covered)."""
    base, top = make_images(workdir, 4 * KiB)
    daemon = start(start_daemon, base, top)
    h = connect(daemon, "r")
    h.pwrite(b"\xaa" * 4 * KiB, 0)  # the guest's own cluster
    assert h.pread(4 * KiB, 4 * KiB) == b"\x11" * 4 * KiB  # copies up cluster 1, all of it
    assert h.pread(4 * KiB - 512, 8 * KiB + 512) == b"\x11" * (4 * KiB - 512)  # cluster 2, partly
    h.shutdown()
    released = release(daemon)
    assert read_top(daemon, 4 * KiB, 0) == b"\xaa" * 4 * KiB
    assert read_top(daemon, 64 * KiB, 4 * KiB) == b"\x11" * 64 * KiB
    assert released == 4 * KiB
    finish(daemon, top, base)
    assert in_top(top) == [(0, 4 * KiB), (8 * KiB, 4 * KiB)]  # cluster 1 went back to the base


def test_release_after_the_backing_link_is_dropped_releases_nothing(start_daemon, workdir):
    base, top = make_images(workdir, 64 * KiB)
    daemon = start(start_daemon, base, top)
    h = connect(daemon, "r")
    assert h.pread(128 * KiB, 0) == b"\x11" * 128 * KiB
    h.shutdown()
    daemon.ok("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "top", "file": "tf", "backing": None}])
    released = release(daemon)
    assert read_top(daemon, 128 * KiB, 0) == b"\x11" * 128 * KiB  # the top holds the only copy now
    assert read_top(daemon, 64 * KiB, 128 * KiB) == bytes(64 * KiB)  # no backing: the rest is zeroes
    assert released == 0
    finish(daemon, top, base)
    assert in_top(top) == [(0, 128 * KiB)]


def test_release_keeps_what_a_second_export_wrote_into_the_top(start_daemon, workdir):
    base, top = make_images(workdir, 4 * KiB)
    daemon = start(start_daemon, base, top)
    h = connect(daemon, "r")
    assert h.pread(64 * KiB, 0) == b"\x11" * 64 * KiB  # 16 clusters copied up
    direct = connect(daemon, "t")
    direct.pwrite(b"\xbb" * 4 * KiB, 8 * KiB)  # into the top, past the filter
    direct.pwrite(b"\xbc" * 512, 20 * KiB + 512)  # part of a cluster is enough to keep it
    direct.trim(4 * KiB, 32 * KiB)  # a discarded cluster reads as zeroes: that stays too
    direct.shutdown()
    h.shutdown()
    released = release(daemon)
    expected = bytearray(b"\x11" * 64 * KiB)
    expected[8 * KiB : 12 * KiB] = b"\xbb" * 4 * KiB
    expected[20 * KiB + 512 : 21 * KiB] = b"\xbc" * 512
    expected[32 * KiB : 36 * KiB] = bytes(4 * KiB)
    assert read_top(daemon, 64 * KiB, 0) == expected
    assert released == 64 * KiB - 12 * KiB
    finish(daemon, top, base)
    assert in_top(top) == [(8 * KiB, 4 * KiB), (20 * KiB, 4 * KiB), (32 * KiB, 4 * KiB)]


def test_release_keeps_clusters_whose_backing_was_written_since(start_daemon, workdir):
    """The base reopened read-write and written through an export of its own after the copy-up:
    the top's copy is what the guest saw, and releasing it would show the new base data."""
    base, top = make_images(workdir, 4 * KiB)
    daemon = start(start_daemon, base, top)
    h = connect(daemon, "r")
    assert h.pread(64 * KiB, 0) == b"\x11" * 64 * KiB
    h.shutdown()
    daemon.ok(
        "blockdev-reopen",
        options=[
            {"driver": "file", "node-name": "bf", "filename": str(base), "read-only": False},
            {"driver": "qcow2", "node-name": "base", "file": "bf", "read-only": False},
        ],
    )
    daemon.ok("block-export-add", type="nbd", id="b", **{"node-name": "base"}, name="b", writable=True)
    below = connect(daemon, "b")
    below.pwrite(b"\xcc" * 4 * KiB, 0)
    below.shutdown()
    released = release(daemon)
    assert read_top(daemon, 64 * KiB, 0) == b"\x11" * 64 * KiB
    assert released == 60 * KiB
    finish(daemon, top, base)
    assert in_top(top) == [(0, 4 * KiB)]


# -- what is released, and what is not ------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB])
def test_release_gives_back_every_cluster_only_copied_up(start_daemon, workdir, cluster_size):
    base, top = make_images(workdir, cluster_size)
    daemon = start(start_daemon, base, top)
    h = connect(daemon, "r")
    assert h.pread(MiB, 0) == b"\x11" * MiB
    assert h.pread(64 * KiB, 3 * MiB) == bytes(64 * KiB)  # nothing anywhere: nothing copied up
    h.shutdown()
    grown = os.stat(top).st_blocks * 512
    assert grown >= MiB
    assert release(daemon) == MiB
    assert release(daemon) == 0  # given back once
    assert read_top(daemon, MiB, 0) == b"\x11" * MiB  # from the base again
    finish(daemon, top, base)
    assert in_top(top) == []
    assert os.stat(top).st_blocks * 512 < grown - MiB * 3 // 4  # the file's clusters were punched


def test_release_with_nothing_copied_up_releases_nothing(start_daemon, workdir):
    base, top = make_images(workdir, 64 * KiB)
    daemon = start(start_daemon, base, top)
    assert release(daemon) == 0
    h = connect(daemon, "r")
    h.pwrite(b"\xdd" * 64 * KiB, 0)  # the top's own data, unallocated-anywhere reads: no copy-up
    assert h.pread(64 * KiB, 0) == b"\xdd" * 64 * KiB
    assert h.pread(64 * KiB, 3 * MiB) == bytes(64 * KiB)
    h.shutdown()
    assert release(daemon) == 0
    finish(daemon, top, base)
    assert in_top(top) == [(0, 64 * KiB)]


def test_a_write_through_the_filter_after_copy_up_keeps_its_cluster(start_daemon, workdir):
    base, top = make_images(workdir, 4 * KiB)
    daemon = start(start_daemon, base, top)
    h = connect(daemon, "r")
    assert h.pread(64 * KiB, 0) == b"\x11" * 64 * KiB
    h.pwrite(b"\xdd" * 4 * KiB, 16 * KiB)
    h.zero(512, 40 * KiB)  # zeroes are a write too
    h.shutdown()
    assert release(daemon) == 64 * KiB - 8 * KiB
    expected = bytearray(b"\x11" * 64 * KiB)
    expected[16 * KiB : 20 * KiB] = b"\xdd" * 4 * KiB
    expected[40 * KiB : 40 * KiB + 512] = bytes(512)
    assert read_top(daemon, 64 * KiB, 0) == expected
    finish(daemon, top, base)
    assert in_top(top) == [(16 * KiB, 4 * KiB), (40 * KiB, 4 * KiB)]


def test_release_refuses_what_it_cannot_do(start_daemon, workdir):
    base, top = make_images(workdir, 64 * KiB)
    raw = workdir / "raw.img"
    raw.write_bytes(bytes(MiB))
    daemon = start(start_daemon, base, top, track=False)
    assert "x-track-copied" in daemon.fails("x-copy-on-read-release", **{"node-name": "cor"})
    assert "not a copy-on-read filter" in daemon.fails("x-copy-on-read-release", **{"node-name": "top"})
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "raw"}, file={"driver": "file", "filename": str(raw)})
    options = {"node-name": "c2", "x-track-copied": True}
    error = daemon.fails("blockdev-add", driver="copy-on-read", file="raw", **options)
    assert "cannot give clusters back" in error
    finish(daemon, top, base)


def test_tracking_bitmaps_are_not_user_bitmaps(start_daemon, workdir):
    """The bitmaps that notice writes for the filter are internal: not listed, no name taken."""
    base, top = make_images(workdir, 64 * KiB)
    daemon = start(start_daemon, base, top)
    h = connect(daemon, "r")
    assert h.pread(64 * KiB, 0) == b"\x11" * 64 * KiB
    h.shutdown()
    for node in daemon.ok("query-named-block-nodes"):
        assert "dirty-bitmaps" not in node, node
    daemon.ok("block-dirty-bitmap-add", node="top", name="b0")
    assert release(daemon) == 64 * KiB
    (info,) = [n for n in daemon.ok("query-named-block-nodes") if n["node-name"] == "top"]
    assert [b["name"] for b in info["dirty-bitmaps"]] == ["b0"]
    finish(daemon, top, base)


# -- the copy-up itself, against qemu --------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB])
def test_copy_up_reads_and_allocates_as_qemu_does(start_daemon, workdir, cluster_size):
    """The same reads through copy-on-read give the same bytes and the same clusters in the top
    in pynbd (with tracking on) and qemu-storage-daemon."""
    reads = [(0, 64 * KiB), (4 * KiB + 512, 200 * KiB), (MiB - 4 * KiB, 12 * KiB), (2 * MiB + 4 * KiB, 4 * KiB)]
    results = {}
    for kind in KINDS:
        base, top = make_images(workdir, cluster_size, tag=f"-{kind}")
        daemon = start(start_daemon, base, top, kind=kind, track=kind == "pynbd")
        h = connect(daemon, "r")
        data = [h.pread(length, offset) for offset, length in reads]
        h.shutdown()
        finish(daemon, top, base)
        results[kind] = data, in_top(top)
    assert results["pynbd"] == results["qsd"]


def wait_all(*handles: nbd.NBD) -> None:
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)


def test_release_while_reads_and_writes_are_in_flight_keeps_every_write(start_daemon, workdir):
    """Releases sent while copy-up reads (through the filter) and writes past it (a second
    export of the top) are in flight: the release waits for them (it drains the top), and no
    write is ever given back. The reads and writes of one round touch different clusters, so the
    bytes expected are known whatever order the daemon runs them in."""
    cluster, clusters = 4 * KiB, 256  # the base's first MiB
    base, top = make_images(workdir, cluster)
    daemon = start(start_daemon, base, top)
    reader, writer = connect(daemon, "r"), connect(daemon, "t")
    expected = bytearray(b"\x11" * clusters * cluster)
    written: set[int] = set()
    rng = random.Random(11)
    released = 0
    for round_ in range(20):
        chosen = rng.sample(range(clusters), 48)
        reads = []
        for index in chosen[:32]:  # whole clusters, and parts of clusters (not releasable)
            start_, length = index * cluster, cluster
            if rng.random() < 0.3:
                start_, length = start_ + 512, cluster - 1024
            buf = nbd.Buffer(length)
            reader.aio_pread(buf, start_)
            reads.append((start_, length, buf))
        for index in chosen[32:]:
            length = rng.choice([512, cluster])
            at = index * cluster + rng.choice([0, cluster - length])
            data = bytes([0x20 + round_]) * length
            writer.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), at)
            expected[at : at + length] = data
            written.add(index)
        released += release(daemon)  # while (some of) those are in flight
        wait_all(reader, writer)
        for start_, length, buf in reads:
            assert buf.to_bytearray() == expected[start_ : start_ + length]
    released += release(daemon)
    assert released > 0
    reader.shutdown()
    writer.shutdown()
    assert read_top(daemon, clusters * cluster, 0) == expected
    finish(daemon, top, base)
    kept = {start_ // cluster + n for start_, length in in_top(top) for n in range(length // cluster)}
    assert written <= kept  # every cluster anyone wrote is still the top's own
