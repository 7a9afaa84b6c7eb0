"""``x-blockdev-copy``: one copy job with a mode. ``point-in-time`` must give exactly the bytes
blockdev-backup gives, ``converge`` exactly what blockdev-mirror gives (with and without a pivot),
each compared with the same scenario run through blockdev-backup/-mirror on pynbd and on
qemu-storage-daemon, with guest writes during the job."""

from __future__ import annotations

import hashlib

import nbd
import pytest

from tests.peers import run

MiB = 1 << 20
SIZE = 4 * MiB
CLUSTER = 65536


def pattern(seed: int = 1) -> bytes:
    data = bytearray(SIZE)
    for i in range(0, SIZE, 128 * 1024):
        data[i : i + CLUSTER] = bytes([(i // CLUSTER + seed) % 251 + 1]) * CLUSTER
    return bytes(data)


def blank(path) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)


class Setup:
    """A raw disk ``d0`` (exported writable as ``w``) and a blank raw target ``t0`` in one daemon."""

    def __init__(self, start_daemon, workdir, kind: str, name: str, target_options: dict | None = None) -> None:
        self.disk, self.target = workdir / f"{name}-disk.raw", workdir / f"{name}-target.raw"
        self.original = pattern()
        self.disk.write_bytes(self.original)
        blank(self.target)
        self.daemon = start_daemon(kind, "--blockdev", f"driver=file,node-name=d0,filename={self.disk}")
        options = target_options or {"driver": "file", "filename": str(self.target)}
        self.daemon.ok("blockdev-add", **{"node-name": "t0"}, **options)
        self.daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
        self.writer = nbd.NBD()
        self.writer.connect_uri(self.daemon.uri("w"))

    def write(self, byte: int, offset: int, length: int = 4096) -> None:
        self.writer.pwrite(bytes([byte]) * length, offset)
        self.writer.flush()

    def job_status(self, job: str) -> str:
        return {j["id"]: j["status"] for j in self.daemon.ok("query-jobs")}[job]

    def job_type(self, job: str) -> str:
        return {j["id"]: j["type"] for j in self.daemon.ok("query-jobs")}[job]

    def export_node(self) -> str:
        return self.daemon.ok("query-block-exports")[0]["node-name"]

    def close(self) -> None:
        self.writer.shutdown()
        assert self.daemon.stop() == 0


def node_names(daemon) -> set[str]:
    return {n["node-name"] for n in daemon.ok("query-named-block-nodes")}


def bitmap_count(daemon, node: str, name: str) -> int:
    nodes = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes")}
    return {b["name"]: b["count"] for b in nodes[node].get("dirty-bitmaps", [])}[name]


def start_point_in_time(s: Setup, how: str, **args) -> None:
    if how == "x-blockdev-copy":
        s.daemon.ok("x-blockdev-copy", mode="point-in-time", device="d0", target="t0", **args)
    else:
        s.daemon.ok("blockdev-backup", device="d0", target="t0", **args)


def start_converge(s: Setup, how: str, **args) -> None:
    if how == "x-blockdev-copy":
        s.daemon.ok("x-blockdev-copy", mode="converge", device="d0", target="t0", **args)
    else:
        s.daemon.ok("blockdev-mirror", device="d0", target="t0", **args)


# -- point-in-time is blockdev-backup ---------------------------------------------------------------

POINT_IN_TIME_RUNS = [("pynbd", "x-blockdev-copy"), ("pynbd", "blockdev-backup"), ("qsd", "blockdev-backup")]


def point_in_time_run(start_daemon, workdir, kind: str, how: str) -> tuple[bytes, bytes]:
    """A full copy that crawls (speed 1: one chunk, then it waits) while the guest writes all over
    the disk; then it runs at full speed. Returns the target's and the disk's bytes."""
    s = Setup(start_daemon, workdir, kind, f"{kind}-{how}")
    start_point_in_time(s, how, sync="full", speed=1, **{"job-id": "j"})
    for offset in range(0, SIZE, MiB // 2):
        s.write(0xEE, offset + 4096)
    assert s.job_status("j") == "running"  # so every write above came while the job ran
    assert s.job_type("j") == ("copy" if how == "x-blockdev-copy" else "backup")
    s.daemon.ok("block-job-set-speed", device="j", speed=0)
    assert "error" not in s.daemon.wait_event("BLOCK_JOB_COMPLETED", "j")["data"]
    assert s.daemon.ok("query-jobs") == []
    assert "t0" in node_names(s.daemon) and s.export_node() == "d0"
    s.close()
    return s.target.read_bytes(), s.disk.read_bytes()


def test_point_in_time_gives_the_bytes_blockdev_backup_gives(start_daemon, workdir):
    results = {run_: point_in_time_run(start_daemon, workdir, *run_) for run_ in POINT_IN_TIME_RUNS}
    original = pattern()
    written = bytearray(original)
    for offset in range(0, SIZE, MiB // 2):
        written[offset + 4096 : offset + 8192] = b"\xee" * 4096
    for run_, (target, disk) in results.items():
        assert target == original, f"{run_}: the target is not the disk as it was at the start"
        assert disk == written, f"{run_}: the guest's writes did not all reach the disk"


# -- converge is blockdev-mirror --------------------------------------------------------------------

PIVOT_RUNS = [
    ("pynbd", "x-blockdev-copy", "complete", {}),
    ("pynbd", "blockdev-mirror", "complete", {}),
    ("qsd", "blockdev-mirror", "complete", {}),
]
NO_PIVOT_RUNS = [
    ("pynbd", "x-blockdev-copy", "complete", {"pivot": False}),
    ("pynbd", "x-blockdev-copy", "cancel", {}),
    ("pynbd", "blockdev-mirror", "cancel", {}),
    ("qsd", "blockdev-mirror", "cancel", {}),
]


def converge_run(start_daemon, workdir, kind: str, how: str, end: str, extra: dict) -> tuple[bytes, bytes, str]:
    """Guest writes during the first pass (the job crawls), after READY, and after the end.
    Returns the target's and the disk's bytes and the node the export uses at the end."""
    s = Setup(start_daemon, workdir, kind, f"{kind}-{how}-{end}-{len(extra)}")
    start_converge(s, how, sync="full", speed=1, **{"job-id": "j"}, **extra)
    s.write(0x71, 3 * MiB)
    s.write(0x72, 4096)  # in the first chunk, copied already: dirty again
    assert s.job_status("j") == "running"
    assert s.job_type("j") == ("copy" if how == "x-blockdev-copy" else "mirror")
    s.daemon.ok("block-job-set-speed", device="j", speed=0)
    s.daemon.wait_event("BLOCK_JOB_READY", "j")
    s.write(0x73, 2 * MiB)  # in step: reaches the target too
    if end == "complete":
        s.daemon.ok("block-job-complete", device="j")
    else:
        s.daemon.ok("block-job-cancel", device="j")  # after READY: complete without a pivot
    completed = s.daemon.wait_event("BLOCK_JOB_COMPLETED", "j")["data"]
    assert "error" not in completed and completed["type"] == ("copy" if how == "x-blockdev-copy" else "mirror")
    s.write(0x74, MiB)  # after the end: only the node the export now uses gets it
    export = s.export_node()
    s.close()
    return s.target.read_bytes(), s.disk.read_bytes(), export


def converge_expected() -> bytes:
    data = bytearray(pattern())
    for byte, offset in ((0x71, 3 * MiB), (0x72, 4096), (0x73, 2 * MiB)):
        data[offset : offset + 4096] = bytes([byte]) * 4096
    return bytes(data)


def with_last_write(data: bytes) -> bytes:
    return data[:MiB] + b"\x74" * 4096 + data[MiB + 4096 :]


def test_converge_with_pivot_gives_what_blockdev_mirror_gives(start_daemon, workdir):
    at_completion = converge_expected()
    for run_ in PIVOT_RUNS:
        target, disk, export = converge_run(start_daemon, workdir, *run_)
        assert export == "t0", run_
        assert target == with_last_write(at_completion), f"{run_[:3]}: target"
        assert disk == at_completion, f"{run_[:3]}: the source got a write after the pivot"


def test_converge_without_pivot_gives_what_a_cancelled_ready_mirror_gives(start_daemon, workdir):
    at_completion = converge_expected()
    for run_ in NO_PIVOT_RUNS:
        target, disk, export = converge_run(start_daemon, workdir, *run_)
        assert export == "d0", run_
        assert target == at_completion, f"{run_[:3]}: target"
        assert disk == with_last_write(at_completion), f"{run_[:3]}: disk"


# -- bitmaps ----------------------------------------------------------------------------------------


def bitmap_setup(start_daemon, workdir, kind: str, name: str) -> Setup:
    s = Setup(start_daemon, workdir, kind, name)
    s.daemon.ok("block-dirty-bitmap-add", node="d0", name="b0", granularity=CLUSTER)
    s.write(0x01, MiB)
    s.write(0x02, 3 * MiB)
    return s


@pytest.mark.parametrize(("kind", "how"), POINT_IN_TIME_RUNS)
def test_point_in_time_incremental_is_blockdev_backup_incremental(kind, how, start_daemon, workdir):
    """The bitmap's two clusters are copied as they were at the start (the second one is
    overwritten while the job crawls, the first one after it was copied), and the bitmap then
    holds the writes made during the job; qemu-storage-daemon's blockdev-backup gives the same."""
    s = bitmap_setup(start_daemon, workdir, kind, f"inc-{kind}-{how}")
    before = s.disk.read_bytes()
    start_point_in_time(s, how, sync="incremental", bitmap="b0", speed=1, **{"job-id": "j"})
    s.write(0x03, 3 * MiB)  # not copied yet: copy-before-write saves the 0x02 data first
    s.write(0x04, MiB)  # copied already
    s.write(0x05, 2 * MiB)  # clean cluster
    assert s.job_status("j") == "running"
    s.daemon.ok("block-job-set-speed", device="j", speed=0)
    completed = s.daemon.wait_event("BLOCK_JOB_COMPLETED", "j")["data"]
    assert "error" not in completed and completed["len"] == 2 * CLUSTER
    assert bitmap_count(s.daemon, "d0", "b0") == 3 * CLUSTER  # the writes made during the job
    s.close()
    expected = bytearray(SIZE)
    for offset in (MiB, 3 * MiB):
        expected[offset : offset + CLUSTER] = before[offset : offset + CLUSTER]
    assert s.target.read_bytes() == expected


def test_converge_sync_bitmap_copies_the_bitmap_and_what_guests_write(start_daemon, workdir):
    """sync=bitmap in converge mode (qemu 7.2's mirror has no bitmap mode; the mode proposed for
    qemu, with bitmap-mode never): the bitmap's clusters are the first pass, what guests write
    during the job is copied too, and the bitmap keeps both."""
    s = bitmap_setup(start_daemon, workdir, "pynbd", "conv-bitmap")
    s.daemon.ok(
        "x-blockdev-copy",
        mode="converge",
        device="d0",
        target="t0",
        sync="bitmap",
        bitmap="b0",
        speed=1,
        **{"bitmap-mode": "never", "job-id": "j", "pivot": False},
    )
    s.write(0x05, 2 * MiB)
    s.daemon.ok("block-job-set-speed", device="j", speed=0)
    s.daemon.wait_event("BLOCK_JOB_READY", "j")
    s.write(0x06, 2 * MiB + 8192)
    s.daemon.ok("block-job-complete", device="j")
    assert "error" not in s.daemon.wait_event("BLOCK_JOB_COMPLETED", "j")["data"]
    assert bitmap_count(s.daemon, "d0", "b0") == 3 * CLUSTER
    s.close()
    disk, target = s.disk.read_bytes(), s.target.read_bytes()
    expected = bytearray(SIZE)
    for offset in (MiB, 2 * MiB, 3 * MiB):
        expected[offset : offset + CLUSTER] = disk[offset : offset + CLUSTER]
    assert target == expected


# -- error policies ---------------------------------------------------------------------------------


def blkdebug_target(target) -> dict:
    """qcow2 over blkdebug: the first data write of the copy fails once with EIO."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(SIZE)])
    return {
        "driver": "qcow2",
        "file": {
            "driver": "blkdebug",
            "image": {"driver": "file", "filename": str(target)},
            "inject-error": [{"event": "write_aio", "errno": 5, "once": True}],
        },
    }


@pytest.mark.parametrize("mode", ["point-in-time", "converge"])
@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
def test_target_write_errors_follow_the_policy(mode, policy, start_daemon, workdir):
    target = workdir / f"err-{mode}-{policy}.qcow2"
    s = Setup(start_daemon, workdir, "pynbd", f"err-{mode}-{policy}", blkdebug_target(target))
    args = {"job-id": "j", "on-target-error": policy} | ({"pivot": False} if mode == "converge" else {})
    s.daemon.ok("x-blockdev-copy", mode=mode, device="d0", target="t0", sync="full", **args)
    seen = []
    if policy == "stop":
        seen = s.daemon.events_until("BLOCK_JOB_ERROR", "j")
        while s.daemon.ok("query-block-jobs")[0]["status"] != "paused":
            s.daemon.events_until("JOB_STATUS_CHANGE", "j")
        assert s.daemon.ok("query-block-jobs")[0]["io-status"] == "failed"
        s.daemon.ok("block-job-resume", device="j")
    if mode == "converge" and policy != "report":
        s.daemon.wait_event("BLOCK_JOB_READY", "j")
        s.daemon.ok("block-job-complete", device="j")
    done = seen + s.daemon.events_until("BLOCK_JOB_COMPLETED", "j")
    errors = [e["data"] for e in done if e["event"] == "BLOCK_JOB_ERROR"]
    completed = done[-1]["data"]
    assert errors == [{"device": "j", "operation": "write", "action": policy}]
    assert s.daemon.ok("query-jobs") == [] and s.export_node() == "d0"
    s.close()
    run(["qemu-img", "check", str(target)])
    same = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(s.disk), str(target)], check=False)
    if policy == "report":
        assert "error" in completed
    elif policy == "ignore" and mode == "point-in-time":
        assert "error" not in completed
        assert same.returncode == 1  # as blockdev-backup: the chunk whose write failed is skipped
    else:
        # stop: retried after the resume; converge ignore: the range stays dirty and a later pass
        # copies it again (qemu's mirror marks a failed write's range dirty again too)
        assert "error" not in completed
        assert same.returncode == 0, same.stdout


def test_a_source_read_error_fails_the_job_under_report(start_daemon, workdir):
    disk = workdir / "bad-source.raw"
    disk.write_bytes(pattern())
    target = workdir / "bad-source-target.raw"
    blank(target)
    daemon = start_daemon(
        "pynbd",
        "--blockdev",
        f"driver=file,node-name=t0,filename={target}",
    )
    daemon.ok(
        "blockdev-add",
        driver="blkdebug",
        **{"node-name": "d0"},
        image={"driver": "file", "filename": str(disk)},
        **{"inject-error": [{"event": "read_aio", "errno": 5, "once": True}]},
    )
    graph = daemon.ok("x-debug-query-block-graph")
    daemon.ok("x-blockdev-copy", mode="converge", device="d0", target="t0", sync="full", **{"job-id": "j"})
    done = daemon.events_until("BLOCK_JOB_COMPLETED", "j")
    assert [e["data"] for e in done if e["event"] == "BLOCK_JOB_ERROR"] == [
        {"device": "j", "operation": "read", "action": "report"}
    ]
    assert "error" in done[-1]["data"]
    assert daemon.ok("query-jobs") == []
    assert daemon.ok("x-debug-query-block-graph") == graph  # the filter and the job's links are gone
    assert daemon.stop() == 0
    assert disk.read_bytes() == pattern()


# -- refusals ---------------------------------------------------------------------------------------

REFUSALS = [
    ({"mode": "point-in-time", "sync": "full", "granularity": 65536}, "'granularity' is not accepted in mode"),
    ({"mode": "point-in-time", "sync": "full", "copy-mode": "write-blocking"}, "'copy-mode' is not accepted"),
    ({"mode": "point-in-time", "sync": "full", "pivot": False}, "'pivot' is not accepted in mode"),
    ({"mode": "converge", "sync": "incremental", "bitmap": "b0"}, "'incremental' is not accepted in mode"),
    ({"mode": "converge", "sync": "full", "bitmap": "b0", "bitmap-mode": "never"}, "cannot be used with sync"),
    ({"mode": "converge", "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "always"}, "'always' is not accepted"),
    ({"mode": "converge", "sync": "bitmap", "bitmap": "b0"}, "Bitmap sync mode must be given"),
    ({"mode": "converge", "sync": "full", "granularity": 1000}, "expecting a power of two"),
    ({"mode": "point-in-time", "sync": "bitmap"}, "must provide a valid bitmap name"),
    ({"mode": "point-in-time", "sync": "full", "compress": True}, "Parameter 'compress' is unexpected"),
    ({"mode": "point-in-time", "sync": "full", "replaces": "d0"}, "Parameter 'replaces' is unexpected"),
    ({"mode": "sideways", "sync": "full"}, "Parameter 'mode' does not accept value 'sideways'"),
    ({"sync": "full"}, "Parameter 'mode' is missing"),
    ({"mode": "converge", "sync": "full", "target": "d0"}, "Can't copy a node into itself"),
    ({"mode": "converge", "sync": "full", "target": "small"}, "different sizes"),
    ({"mode": "point-in-time", "sync": "full", "target": "small"}, "must have the same size"),
    ({"mode": "converge", "sync": "full", "target": "busy"}, "is busy"),
    ({"mode": "converge", "sync": "full", "job-id": ""}, "Invalid job ID"),
]


def test_options_a_mode_has_no_use_for_are_refused_and_change_nothing(start_daemon, workdir):
    s = Setup(start_daemon, workdir, "pynbd", "refusals")
    small, busy = workdir / "small.raw", workdir / "busy.raw"
    small.write_bytes(bytes(MiB))
    blank(busy)
    s.daemon.ok("blockdev-add", driver="file", **{"node-name": "small"}, filename=str(small))
    s.daemon.ok("blockdev-add", driver="file", **{"node-name": "busy"}, filename=str(busy))
    s.daemon.ok("block-export-add", type="nbd", id="b", **{"node-name": "busy"}, name="b")
    s.daemon.ok("block-dirty-bitmap-add", node="d0", name="b0")
    graph = s.daemon.ok("x-debug-query-block-graph")
    for args, message in REFUSALS:
        full = {"device": "d0", "target": "t0", "job-id": "j"} | args
        error = s.daemon.fails("x-blockdev-copy", **full)
        assert message in error, (args, error)
        assert s.daemon.ok("query-jobs") == []
        assert s.daemon.ok("x-debug-query-block-graph") == graph, args
        bitmaps = {n["node-name"]: n for n in s.daemon.ok("query-named-block-nodes")}["d0"]["dirty-bitmaps"]
        assert [b["busy"] for b in bitmaps] == [False], args
    s.close()


# -- cancel -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["point-in-time", "converge"])
def test_a_cancel_midway_leaves_the_source_untouched_and_the_graph_clean(mode, start_daemon, workdir):
    s = Setup(start_daemon, workdir, "pynbd", f"cancel-{mode}")
    s.daemon.ok("block-dirty-bitmap-add", node="d0", name="b0")
    s.write(0x01, MiB)
    s.write(0x01, 3 * MiB)  # two chunks: the job crawls after the first
    graph = s.daemon.ok("x-debug-query-block-graph")
    extra = {"bitmap": "b0", "bitmap-mode": "never", "sync": "bitmap"}
    s.daemon.ok(
        "x-blockdev-copy",
        mode=mode,
        device="d0",
        target="t0",
        speed=1,
        **{"job-id": "j", "filter-node-name": "f"},
        **extra,
    )
    assert "f" in node_names(s.daemon)
    s.write(0x02, 2 * MiB)
    s.daemon.ok("block-job-cancel", device="j", force=True)
    s.daemon.wait_event("BLOCK_JOB_CANCELLED", "j")
    assert s.daemon.ok("query-jobs") == []
    assert s.daemon.ok("x-debug-query-block-graph") == graph  # filter gone, links as before
    assert bitmap_count(s.daemon, "d0", "b0") == 3 * CLUSTER  # never: the bitmap and the write
    s.write(0x03, MiB // 2)  # the export still writes the disk itself
    s.close()
    expected = bytearray(pattern())
    for byte, offset in ((0x01, MiB), (0x01, 3 * MiB), (0x02, 2 * MiB), (0x03, MiB // 2)):
        expected[offset : offset + 4096] = bytes([byte]) * 4096
    assert s.disk.read_bytes() == expected


# -- transactions -----------------------------------------------------------------------------------


def test_a_point_in_time_copy_starts_atomically_with_a_new_bitmap(start_daemon, workdir):
    s = Setup(start_daemon, workdir, "pynbd", "transaction")
    copy = {"mode": "point-in-time", "device": "d0", "target": "t0", "sync": "full", "job-id": "j", "speed": 1}
    s.daemon.ok(
        "transaction",
        actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "since"}},
            {"type": "x-blockdev-copy", "data": copy},
        ],
    )
    s.write(0x09, 2 * MiB)
    s.daemon.ok("block-job-set-speed", device="j", speed=0)
    assert "error" not in s.daemon.wait_event("BLOCK_JOB_COMPLETED", "j")["data"]
    assert bitmap_count(s.daemon, "d0", "since") == CLUSTER  # exactly what changed since the copy
    # a transaction that fails after the copy was prepared leaves no job and no filter behind
    graph = s.daemon.ok("x-debug-query-block-graph")
    s.daemon.fails(
        "transaction",
        actions=[
            {"type": "x-blockdev-copy", "data": copy | {"job-id": "k"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "since"}},  # exists: fails
        ],
    )
    assert s.daemon.ok("query-jobs") == []
    assert s.daemon.ok("x-debug-query-block-graph") == graph
    s.close()
    assert hashlib.sha256(s.target.read_bytes()).digest() == hashlib.sha256(pattern()).digest()
