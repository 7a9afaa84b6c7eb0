"""``block-commit x-discard-committed`` (a pynbd extension): as a commit copies data into the base,
the layers above it give their clusters back, so the data shows through from the base and their
files shrink; during an active commit, guest writes over ranges no layer above the base allocates
go to the base alone. The same commits without the option run against qemu-storage-daemon too,
compared by what NBD clients read. Effects are checked with qemu's tools after the daemon is gone:
``qemu-img map`` (which layer holds what), ``qemu-img check``, the files' allocated blocks."""

import json
import os
import signal

import nbd
import pytest

from tests.peers import run

MiB = 1 << 20
K64 = 64 << 10
SIZE = 8 * MiB

#: what each layer writes, bottom up: (pattern or None for write-zeroes, offset, length)
LAYOUT = {
    "base": [(0x11, 0, 8 * MiB)],
    "mid": [(0x22, 1 * MiB, 2 * MiB), (0x23, 6 * MiB, 1 * MiB)],
    "upper": [(0x33, 2 * MiB, 2 * MiB), (None, 6 * MiB + K64, K64)],
    "top": [(0x44, 4 * MiB, 1 * MiB), (0x45, 7 * MiB, 1 * MiB)],
}


def make_chain(workdir, kind, names):
    """qcow2 images ``names`` (bottom up), each backed by the one before; returns their paths and
    the bytes the last one reads."""
    paths, view = [], bytearray(SIZE)
    for name in names:
        path = workdir / f"{kind}-{name}.qcow2"
        backing = ["-b", paths[-1].name, "-F", "qcow2"] if paths else []
        run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(path), str(SIZE)])
        commands = []
        for pattern, offset, length in LAYOUT[name]:
            if pattern is None:
                commands += ["-c", f"write -z {offset} {length}"]
                view[offset : offset + length] = bytes(length)
            else:
                commands += ["-c", f"write -P {pattern:#x} {offset} {length}"]
                view[offset : offset + length] = bytes([pattern]) * length
        run(["qemu-io", "-f", "qcow2", *commands, str(path)])
        paths.append(path)
    return paths, bytes(view)


def start_on(start_daemon, kind, top_path):
    """The top image opened as a user would, its backing chain from its header (read-only), and
    exported writable with allocation depths."""
    daemon = start_daemon(
        kind, "--blockdev", f"driver=qcow2,node-name=top,discard=unmap,file.driver=file,file.filename={top_path}"
    )
    export = {"node-name": "top", "allocation-depth": True}
    daemon.ok("block-export-add", type="nbd", id="w", name="w", writable=True, **export)
    return daemon


def qcow2_node(daemon, path):
    """The name and read-only flag of the qcow2 node that opened ``path``."""
    for node in daemon.ok("query-named-block-nodes"):
        if node["drv"] == "qcow2" and node["image"]["filename"] == str(path):
            return node["node-name"], node["ro"]
    raise AssertionError(f"no qcow2 node for {path}")


def connect(daemon):
    h = nbd.NBD()
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(daemon.uri("w"))
    return h


def read_all(h):
    return b"".join(h.pread(MiB, offset) for offset in range(0, SIZE, MiB))


def depths(h, offset, length):
    """qemu:allocation-depth over the range, as (offset, length, depth)."""
    out = []

    def callback(context, start, entries, err):
        at = start
        for i in range(0, len(entries), 2):
            out.append((at, entries[i], entries[i + 1]))
            at += entries[i]

    h.block_status(length, offset, callback)
    return out


def image_map(path):
    return json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout)


def holds_nothing(path, depth_of_base):
    """Whether every extent of the image's map comes from its base (at ``depth_of_base``): no
    layer above it allocates anything."""
    found = image_map(path)
    return all(extent["depth"] == depth_of_base for extent in found), found


def image_reads(path, workdir):
    out = workdir / f"{path.stem}-view.raw"
    run(["qemu-img", "convert", "-O", "raw", str(path), str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


def check_clean(*paths):
    for path in paths:
        run(["qemu-img", "check", str(path)])


def used(path):
    return os.stat(path).st_blocks


def commit_args(punch, **args):
    return {"job-id": "c", **args, **({"x-discard-committed": True} if punch else {})}


PUNCH_OR_NOT = [("pynbd", True), ("pynbd", False), ("qsd", False)]


# -- whole commits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "punch"), PUNCH_OR_NOT)
def test_intermediate_commit_of_read_only_layers(kind, punch, start_daemon, workdir):
    """base <- mid <- upper <- top, commit upper and mid into base: with hole punching the two
    layers, opened read-only from the header, are reopened read-write for the job, end up holding
    nothing (their data shows through from the base) and read-only again."""
    (base, mid, upper, top), expected = make_chain(workdir, kind, ["base", "mid", "upper", "top"])
    daemon = start_on(start_daemon, kind, top)
    h = connect(daemon)
    assert read_all(h) == expected
    before = {path: used(path) for path in (mid, upper)}
    (upper_node, upper_ro), (mid_node, _), (base_node, _) = (qcow2_node(daemon, p) for p in (upper, mid, base))
    assert upper_ro
    daemon.ok("block-commit", device="top", **commit_args(punch, **{"top-node": upper_node, "base-node": base_node}))
    done = daemon.wait_event("BLOCK_JOB_COMPLETED", "c")["data"]
    assert "error" not in done
    assert read_all(h) == expected
    h.shutdown()
    # the committed layers left the chain and nothing else uses them: closed, as qemu closes them
    # (their files are no longer locked, so qemu-img below may open them)
    open_files = {node["image"]["filename"] for node in daemon.ok("query-named-block-nodes")}
    assert str(upper) not in open_files and str(mid) not in open_files
    assert daemon.stop() == 0
    check_clean(base, mid, upper, top)
    assert image_reads(top, workdir) == expected
    top_map = image_map(top)  # its own data, and the rest from the base now
    assert {e["depth"] for e in top_map if e["data"]} == {0, 1}
    assert image_reads(base, workdir) == image_reads(upper, workdir)  # the base holds upper's view
    empty_upper, upper_map = holds_nothing(upper, 2)
    empty_mid, mid_map = holds_nothing(mid, 1)
    if punch:
        assert empty_upper and empty_mid, (upper_map, mid_map)
        assert used(upper) < before[upper] and used(mid) < before[mid]
        assert image_reads(mid, workdir) == image_reads(base, workdir)  # a dropped layer shows the base
    else:  # unchanged: the layers keep what they had
        assert not empty_upper and not empty_mid
        assert used(upper) >= before[upper] and used(mid) >= before[mid]


@pytest.mark.parametrize(("kind", "punch"), PUNCH_OR_NOT)
def test_active_commit(kind, punch, start_daemon, workdir):
    """base <- mid <- top, an active commit of top (and mid) into base under an NBD client."""
    (base, mid, top), expected = make_chain(workdir, kind, ["base", "mid", "top"])
    daemon = start_on(start_daemon, kind, top)
    h = connect(daemon)
    assert read_all(h) == expected
    before = {path: used(path) for path in (mid, top)}
    daemon.ok("block-commit", device="top", **commit_args(punch))
    daemon.wait_event("BLOCK_JOB_READY", "c")
    h.pwrite(b"\x99" * 8192, 3 * MiB)  # while ready: mid allocates it, so it goes to top (and base)
    daemon.ok("block-job-complete", device="c")
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "c")["data"]
    expected = expected[: 3 * MiB] + b"\x99" * 8192 + expected[3 * MiB + 8192 :]
    assert read_all(h) == expected  # now from the base
    h.shutdown()
    if kind == "pynbd":
        assert qcow2_node(daemon, mid)[1], "mid is read-only again"
    assert daemon.stop() == 0
    check_clean(base, mid, top)
    assert image_reads(base, workdir) == expected
    assert image_reads(top, workdir) == expected  # the old top still reads the same, through its chain
    empty_top, top_map = holds_nothing(top, 2)
    empty_mid, mid_map = holds_nothing(mid, 1)
    if punch:
        assert empty_top and empty_mid, (top_map, mid_map)
        assert used(top) < before[top] and used(mid) < before[mid]
    else:
        assert not empty_top and not empty_mid
        assert used(top) >= before[top]


# -- guest writes while a hole-punching active commit runs ------------------------------------------


def throttled_punching_commit(start_daemon, workdir):
    """base <- mid <- top and an active commit with hole punching at 1 byte/s: its first chunk
    (mid's [1M, 2M)) goes at once, as in qemu, and every other one waits for the speed limit, so
    mid's [6M, 7M) and top's [7M, 8M) stay where they are while the test writes. Returns the
    graph as it was before the job too."""
    (base, mid, top), expected = make_chain(workdir, "pynbd", ["base", "mid", "top"])
    daemon = start_on(start_daemon, "pynbd", top)
    h = connect(daemon)
    graph = daemon.ok("x-debug-query-block-graph")
    daemon.ok("block-commit", device="top", **commit_args(True, speed=1))
    return daemon, h, (base, mid, top), bytearray(expected), graph


#: guest writes during the job over ranges only the base holds, and over mid's and top's
SKIPPED = [(5 * MiB, b"\x55" * K64), (5 * MiB + K64 + 512, b"\x56" * 1000)]
ZEROED = (3 * MiB, 2 * K64)
NOT_SKIPPED = [(6 * MiB + 4096, b"\x57" * 4096), (7 * MiB, b"\x58" * 4096)]


def guest_writes(h, expected, flags=0):
    for offset, data in [*SKIPPED, *NOT_SKIPPED]:
        h.pwrite(data, offset, flags)
        expected[offset : offset + len(data)] = data
    offset, length = ZEROED  # write-zeroes over base-only data: the base alone too
    h.zero(length, offset, flags)
    expected[offset : offset + length] = bytes(length)


def graph_names(graph):
    return sorted(n["name"] for n in graph["nodes"]), len(graph["edges"])


def test_writes_nothing_above_the_base_allocates_go_to_the_base_alone(start_daemon, workdir):
    daemon, h, (base, mid, top), expected, _ = throttled_punching_commit(start_daemon, workdir)
    guest_writes(h, expected)
    assert read_all(h) == expected
    for offset, length in [*((offset, len(data)) for offset, data in SKIPPED), ZEROED]:
        assert {depth for _, _, depth in depths(h, offset, length)} == {3}, "top left unallocated there"
    for offset, data in NOT_SKIPPED:
        assert depths(h, offset, len(data))[0][2] == 1, "written into the top"
    h.flush()
    daemon.ok("block-job-set-speed", device="c", speed=0)
    daemon.wait_event("BLOCK_JOB_READY", "c")
    guest_writes(h, expected)  # while ready: write-blocking for the top's ranges, base only elsewhere
    daemon.ok("block-job-complete", device="c")
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "c")["data"]
    assert read_all(h) == expected
    h.shutdown()
    assert daemon.stop() == 0
    check_clean(base, mid, top)
    assert image_reads(base, workdir) == expected
    assert holds_nothing(top, 2)[0] and holds_nothing(mid, 1)[0]


def test_cancelled_punching_commit_leaves_every_layer_readable_and_clean(start_daemon, workdir):
    """Cancelled midway: what was committed shows through from the base, the rest stays in the
    layers, the writes the job sent to the base alone are seen through the top, mid is read-only
    again and the graph is as it was."""
    daemon, h, (base, mid, top), expected, graph = throttled_punching_commit(start_daemon, workdir)
    guest_writes(h, expected)
    daemon.ok("block-job-cancel", device="c", force=True)
    daemon.wait_event("BLOCK_JOB_CANCELLED", "c")
    assert read_all(h) == expected
    h.shutdown()
    assert qcow2_node(daemon, mid)[1], "mid is read-only again"
    assert graph_names(daemon.ok("x-debug-query-block-graph")) == graph_names(graph)
    assert daemon.stop() == 0
    check_clean(base, mid, top)
    assert image_reads(top, workdir) == expected
    top_map = image_map(top)

    def depth_at(offset):
        return next(e["depth"] for e in top_map if e["start"] <= offset < e["start"] + e["length"])

    assert [depth_at(offset) for offset, _ in SKIPPED] == [2, 2], "the skipped writes are in the base only"
    assert depth_at(6 * MiB + 4096) == 0 and depth_at(7 * MiB + MiB // 2) == 0, "not committed: still in top"
    assert depth_at(6 * MiB + MiB // 2) == 1, "mid's range was never copied: mid keeps it"


@pytest.mark.parametrize("phase", ["running", "ready"])
def test_sigkill_during_a_punching_commit_loses_no_durable_write(phase, start_daemon, workdir):
    """FUA writes, some of them sent to the base alone, then SIGKILL: every image passes
    qemu-img check (leaks allowed) and the top's chain reads every write. When ready, everything
    was committed and dropped from the layers, but the top's metadata not yet flushed: a write to
    the base alone over what the top held must make the top's drop durable before its answer."""
    daemon, h, (base, mid, top), expected, _ = throttled_punching_commit(start_daemon, workdir)
    if phase == "ready":
        daemon.ok("block-job-set-speed", device="c", speed=0)
        daemon.wait_event("BLOCK_JOB_READY", "c")
        for offset in (1 * MiB, 4 * MiB + K64, 7 * MiB + 4096):  # mid's, top's, top's
            assert {depth for _, _, depth in depths(h, offset, K64)} == {3}, "dropped from the layers"
            h.pwrite(b"\x5a" * K64, offset, nbd.CMD_FLAG_FUA)
            expected[offset : offset + K64] = b"\x5a" * K64
            assert {depth for _, _, depth in depths(h, offset, K64)} == {3}, "written to the base alone"
    guest_writes(h, expected, nbd.CMD_FLAG_FUA)
    assert read_all(h) == expected
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    del h
    for path in (base, mid, top):
        result = run(["qemu-img", "check", str(path)], check=False)
        assert result.returncode in (0, 3), result.stdout + result.stderr  # 3: leaked clusters only
    assert image_reads(top, workdir) == expected


def test_refused_on_a_layer_that_cannot_unallocate(start_daemon, workdir):
    """A layer with subclusters (extended L2 entries) is only ever read: refused, nothing changed."""
    (base,), _ = make_chain(workdir, "pynbd", ["base"])
    mid = workdir / "pynbd-mid.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", base.name, "-F", "qcow2", str(mid)])
    top = workdir / "pynbd-top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top)])
    daemon = start_on(start_daemon, "pynbd", top)
    mid_node, _ = qcow2_node(daemon, mid)
    error = daemon.fails("block-commit", device="top", **commit_args(True))
    assert f"node '{mid_node}'" in error and "cannot unallocate" in error
    assert daemon.ok("query-jobs") == [] and qcow2_node(daemon, mid)[1] and qcow2_node(daemon, base)[1]
    daemon.ok("block-commit", device="top", **commit_args(False))  # without the option it goes
    daemon.wait_event("BLOCK_JOB_READY", "c")
    assert daemon.stop() == 0
