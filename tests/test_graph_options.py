"""Graph options that do what they say (issue 11): blockdev-mirror ``replaces``, blockdev-snapshot
reopening the old active layer read-only, blockdev-del taking a parent's inline children with it,
and ``iothread`` options refused rather than ignored.

Where qemu has the feature, the same QMP script runs against qemu-storage-daemon and pynbd daemon
and the records are compared as in test_daemon_differential: which commands fail (and here, where
pynbd uses qemu's words, the refusals themselves), the graph's edges with their permissions, which
nodes are read-only, what NBD clients read and the allocation they see, the image files (guest
bytes, ``qemu-img check``), plus ``qemu-img map`` of the images the jobs wrote and what other
processes may do with an image the daemon holds (qemu-img and qemu-io without ``-U``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run
from tests.test_backup_workflow import image_map
from tests.test_daemon_differential import MiB, Recorder, assert_same_view, graph_edges, make_raw, node_key

pytestmark = pytest.mark.timeout(180)
SIZE = 4 * MiB
#: qemu's words for a ``replaces`` node a copy of the source cannot stand in for
CANNOT_REPLACE = "because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data"


# -- what a scenario records ------------------------------------------------------------------------


def layout(path: Path) -> list[tuple]:
    """``qemu-img map`` of an image without the host offsets (which depend on the writer's cluster
    allocation order), adjacent equal extents merged."""
    merged: list[list] = []
    for e in image_map(path):
        kind = (e["depth"], e["present"], e["zero"], e["data"])
        if merged and merged[-1][2] == kind and merged[-1][0] + merged[-1][1] == e["start"]:
            merged[-1][1] += e["length"]
        else:
            merged.append([e["start"], e["length"], kind])
    return [(start, length, *kind) for start, length, kind in merged]


def check_verdict(path: Path) -> str:
    """What ``qemu-img check`` (without -U: it needs the daemon to have let go of writing) says."""
    result = run(["qemu-img", "check", str(path)], check=False)
    if result.returncode == 0:
        return "clean"
    return "locked" if "lock" in result.stderr else f"rc={result.returncode}: {result.stdout}{result.stderr}"


def graph_state(r: Recorder) -> dict:
    """The graph as a client sees it: edges with permissions, which nodes are read-only, which
    node each export uses (implicit nodes named after what they are, as the differential tests do)."""
    nodes = r.daemon.ok("query-named-block-nodes")
    names = {n["node-name"]: node_key(n) for n in nodes}
    return r.norm(
        {
            "edges": sorted(graph_edges(r.daemon.ok("x-debug-query-block-graph"), names)),
            "read-only": sorted((names[n["node-name"]], n["ro"]) for n in nodes),
            "exports": sorted((e["id"], names.get(e["node-name"])) for e in r.daemon.ok("query-block-exports")),
        }
    )


def refusal(r: Recorder, command: str, **args) -> None:
    """Run a command that must fail in both daemons; its message is part of the record."""
    reply = r.daemon.cmd(command, **args)
    assert "error" in reply, f"{r.daemon.kind}: {command} {args} was accepted"
    r.log.append((command, r.norm(args), "refused", reply["error"]["class"], r.norm(reply["error"]["desc"])))


def holds_open(r: Recorder, path: Path) -> bool:
    """Whether the daemon process still has ``path`` open (a node left behind keeps its file)."""
    fds = Path(f"/proc/{r.daemon.proc.pid}/fd")
    return any(os.path.realpath(fd) == str(path) for fd in fds.iterdir())


def node_names(r: Recorder) -> list[str]:
    return sorted(node_key(n) for n in r.daemon.ok("query-named-block-nodes"))


# -- blockdev-mirror replaces ------------------------------------------------------------------------


def replaces_setup(r: Recorder) -> None:
    """disk.raw under a raw node ``disk`` under a copy-on-read filter ``cor``, exported writable
    as ``disk``; an unrelated node ``other``; the mirror target ``tgt`` (qcow2, on tgt.img so
    that the record's file list leaves it to the scenario, which knows when it is determinate)."""
    make_raw(r.dir / "disk.raw")
    make_raw(r.dir / "other.raw", SIZE, {0: b"\x0f" * 4096})
    run(["qemu-img", "create", "-q", "-f", "qcow2", r.path("tgt.img"), str(SIZE)])
    r.qmp("blockdev-add", driver="file", **{"node-name": "sf"}, filename=r.path("disk.raw"))
    r.qmp("blockdev-add", driver="raw", **{"node-name": "disk"}, file="sf")
    r.qmp("blockdev-add", driver="copy-on-read", **{"node-name": "cor"}, file="disk")
    r.qmp("blockdev-add", driver="raw", **{"node-name": "other"},
          file={"driver": "file", "filename": r.path("other.raw")})  # fmt: skip
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "tgt"},
          file={"driver": "file", "filename": r.path("tgt.img")})  # fmt: skip
    r.export("cor", "disk", writable=True)


def mirror_args(replaces: str, **more) -> dict:
    args = {"job-id": "m", "auto-dismiss": False, "device": "cor", "target": "tgt", "sync": "full"}
    return {**args, "replaces": replaces, **more}


def record_target(r: Recorder) -> None:
    """The target's image once the daemon has closed it: map, check, guest bytes."""
    target = r.dir / "tgt.img"
    flat = r.dir / "tgt.flat"
    run(["qemu-img", "convert", "-O", "raw", str(target), str(flat)])
    guest = hashlib.sha256(flat.read_bytes()).hexdigest()
    flat.unlink()
    r.log.append(("target", layout(target), check_verdict(target), guest))


def mirror_replaces(ending: str):
    """A scenario: ``replaces`` refused for every node a copy of ``cor`` cannot stand in for, then
    accepted for ``disk`` (below ``cor`` through the filter only); the job then ends by
    ``ending``: ``complete`` (the pivot replaces ``disk``, so ``cor`` stays in the export's path,
    now above the target), ``cancel-ready`` (a point-in-time copy, no pivot) or ``cancel-running``
    (cancelled before READY: nothing changes)."""

    def scenario(r: Recorder) -> None:
        replaces_setup(r)
        before = graph_state(r)
        for wrong in ("other", "tgt", "sf", "nosuch"):  # unrelated, the target, under a format, absent
            refusal(r, "blockdev-mirror", **mirror_args(wrong))
        # a target that shows the source's node through a filter of its own is the source itself
        r.qmp("blockdev-add", driver="copy-on-read", **{"node-name": "cor2"}, file="disk")
        refusal(r, "blockdev-mirror", **{**mirror_args("disk"), "target": "cor2"})
        r.qmp("blockdev-del", **{"node-name": "cor2"})
        assert graph_state(r) == before, f"{r.daemon.kind}: a refused mirror changed the graph"
        if ending == "cancel-running":
            r.qmp("blockdev-mirror", **mirror_args("disk", speed=1))  # crawls: never READY
            r.qmp("block-job-cancel", device="m")
            # (not r.wait_job: qemu's query-jobs says "Operation canceled" for a cancelled job)
            r.daemon.wait_event("JOB_STATUS_CHANGE", "m", status="concluded")
            r.qmp("job-dismiss", id="m")
            assert graph_state(r) == before, f"{r.daemon.kind}: a cancelled mirror left the graph changed"
            r.client("disk", lambda h: (h.pwrite(b"\x66" * 4096, 0), h.flush()))  # the source, as before
            r.qmp("blockdev-del", **{"node-name": "tgt"})  # free again; what it holds depends on timing
            return
        r.qmp("blockdev-mirror", **mirror_args("disk"))
        r.daemon.wait_event("BLOCK_JOB_READY", "m")
        r.client("disk", lambda h: (h.pwrite(b"\x44" * 65536, 2 * MiB), h.flush()))  # reaches both sides
        r.qmp("block-job-complete" if ending == "complete" else "block-job-cancel", device="m")
        r.wait_job("m")
        after = graph_state(r)
        r.log.append(("graph after", after))
        if ending == "complete":
            assert ["disk", "cor"] in after["exports"], f"{r.daemon.kind}: the filter left the export's path"
            assert any(e[:3] == ["cor", "tgt", "file"] for e in after["edges"]), f"{r.daemon.kind}: cor not above tgt"
        else:
            assert after == before, f"{r.daemon.kind}: a mirror cancelled when READY pivoted"
        r.client("disk", lambda h: (h.pwrite(b"\x55" * 4096, 3 * MiB + 8192), h.flush()))  # one side only
        r.log.append(("view", r.observe_export("disk", True)))
        # let go of the target, so that its image can be checked and mapped without -U
        r.qmp("block-export-del", id="disk")
        r.exports.clear()
        r.qmp("blockdev-del", **{"node-name": "cor"})
        r.qmp("blockdev-del", **{"node-name": "tgt"})
        record_target(r)

    scenario.__name__ = f"mirror_replaces_{ending}"
    return scenario


@pytest.mark.parametrize("ending", ["complete", "cancel-ready", "cancel-running"])
def test_mirror_replaces_the_node_below_a_filter_as_qemu_does(ending, start_daemon, workdir):
    assert_same_view(mirror_replaces(ending), start_daemon, workdir)


def test_a_replaces_node_that_is_no_longer_below_the_source_fails_the_job_and_keeps_the_graph(start_daemon, workdir):
    """qemu checks again at the pivot: here the filter was re-pointed while the job ran (pynbd's
    copy-on-read can be reopened onto another file; qemu's cannot, so pynbd only), and ``disk``
    was then deleted. The job fails with qemu's words and nothing is replaced."""
    source, other, target = (workdir / name for name in ("s.raw", "o.raw", "t.raw"))
    make_raw(source, SIZE)
    make_raw(other, SIZE, {0: b"\x0f" * 65536})
    with open(target, "wb") as f:
        f.truncate(SIZE)
    daemon = start_daemon("pynbd")
    daemon.ok("blockdev-add", driver="file", **{"node-name": "sf"}, filename=str(source))
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "disk"}, file="sf")
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "other"}, file={"driver": "file", "filename": str(other)})
    daemon.ok("blockdev-add", driver="copy-on-read", **{"node-name": "cor"}, file="disk")
    daemon.ok("blockdev-add", driver="file", **{"node-name": "tf"}, filename=str(target))
    daemon.ok("block-export-add", type="nbd", id="e", **{"node-name": "cor"}, writable=True)
    daemon.ok("blockdev-mirror", **{"job-id": "m", "auto-dismiss": False}, device="cor", target="tf", sync="full",
              replaces="disk")  # fmt: skip
    daemon.wait_event("BLOCK_JOB_READY", "m")
    daemon.ok("blockdev-reopen", options=[{"driver": "copy-on-read", "node-name": "cor", "file": "other"}])
    daemon.ok("blockdev-del", **{"node-name": "disk"})
    daemon.ok("block-job-complete", device="m")
    error = daemon.wait_event("BLOCK_JOB_COMPLETED", "m")["data"]["error"]
    assert error.startswith("Can no longer replace 'disk' by 'tf'"), error
    daemon.ok("job-dismiss", id="m")
    assert [e["node-name"] for e in daemon.ok("query-block-exports")] == ["cor"]
    h = nbd.NBD()
    h.connect_uri(daemon.uri("cor"))
    assert h.pread(65536, 0) == b"\x0f" * 65536  # the export reads what cor now filters
    h.shutdown()
    daemon.ok("blockdev-del", **{"node-name": "tf"})  # the target was never put in use
    assert daemon.stop() == 0


# -- blockdev-snapshot ---------------------------------------------------------------------------


def snapshot_setup(r: Recorder, file_inline: bool) -> None:
    """top.qcow2 (data at 0 and 1M) as node ``top`` exported writable as ``disk``, its file node
    ``tf`` added on its own or inline; an empty overlay ``ov``."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", r.path("top.qcow2"), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x12 1M 64k", r.path("top.qcow2")])
    run(["qemu-img", "create", "-q", "-f", "qcow2", r.path("ov.qcow2"), str(SIZE)])
    file = {"driver": "file", "filename": r.path("top.qcow2"), "node-name": "tf"}
    if file_inline:
        r.qmp("blockdev-add", driver="qcow2", **{"node-name": "top"}, file=file)
    else:
        r.qmp("blockdev-add", **file)
        r.qmp("blockdev-add", driver="qcow2", **{"node-name": "top"}, file="tf")
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "ov"}, backing=None,
          file={"driver": "file", "filename": r.path("ov.qcow2")})  # fmt: skip
    r.export("top", "disk", writable=True)


def others_may(r: Recorder, image: str) -> None:
    """What other processes may do with the image now: check it and read its header (both need
    the daemon to have given up its write lock), or write it (never while the daemon holds it)."""
    path = r.dir / image
    info = run(["qemu-img", "info", str(path)], check=False).returncode == 0
    write = run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(path)], check=False).returncode == 0
    r.log.append(("others", image, check_verdict(path), info, write))


def snapshot_then_commit_back(file_inline: bool):
    """The procedure of the issue: a temporary snapshot, a check of the old layer (read-only now),
    and an active commit back into it (read-write again for the job and after the pivot)."""

    def scenario(r: Recorder) -> None:
        snapshot_setup(r, file_inline)
        others_may(r, "top.qcow2")  # the daemon writes it: locked
        r.qmp("blockdev-snapshot", node="top", overlay="ov")
        r.log.append(("after snapshot", graph_state(r)))
        others_may(r, "top.qcow2")  # read-only now: a check works, a writer is still kept out
        r.client("disk", lambda h: (h.pwrite(b"\x22" * 65536, 2 * MiB), h.flush()))  # into the overlay
        r.qmp("block-commit", device="ov", **{"job-id": "c", "auto-dismiss": False})
        r.daemon.wait_event("BLOCK_JOB_READY", "c")
        named = [(name, ro) for name, ro in graph_state(r)["read-only"] if not name.startswith("#mirror_top")]
        r.log.append(("during commit", named))  # (not the job's filter: qemu names it by its json:{...})
        r.client("disk", lambda h: (h.pwrite(b"\x33" * 4096, 3 * MiB), h.flush()))  # reaches both
        r.qmp("block-job-complete", device="c")
        r.wait_job("c")
        r.log.append(("after commit", graph_state(r)))
        others_may(r, "top.qcow2")  # the active layer again: locked
        r.client("disk", lambda h: (h.pwrite(b"\x44" * 4096, 3 * MiB + 4096), h.flush()))
        r.qmp("blockdev-del", **{"node-name": "ov"})  # nobody uses the overlay any more

    scenario.__name__ = f"snapshot_then_commit_back_{'inline' if file_inline else 'separate'}_file"
    return scenario


@pytest.mark.parametrize("file_inline", [False, True], ids=["separate-file-node", "inline-file-node"])
def test_snapshot_reopens_the_old_layer_read_only_and_commit_back_writes_it(file_inline, start_daemon, workdir):
    assert_same_view(snapshot_then_commit_back(file_inline), start_daemon, workdir)


def snapshot_in_a_failing_transaction(r: Recorder) -> None:
    snapshot_setup(r, file_inline=False)
    snapshot = {"type": "blockdev-snapshot", "data": {"node": "top", "overlay": "ov"}}
    r.qmp("transaction", actions=[snapshot, {"type": "abort", "data": {}}])
    r.log.append(("after the failed transaction", graph_state(r)))
    others_may(r, "top.qcow2")  # still written by the daemon: locked
    r.client("disk", lambda h: (h.pwrite(b"\x55" * 4096, 0), h.flush()))  # into top itself
    r.qmp("blockdev-snapshot", node="top", overlay="ov")  # the overlay was left free
    r.log.append(("after snapshot", graph_state(r)))


def test_a_snapshot_in_a_failing_transaction_leaves_the_layer_read_write(start_daemon, workdir):
    assert_same_view(snapshot_in_a_failing_transaction, start_daemon, workdir)


# -- blockdev-del and inline children -----------------------------------------------------------------


def inline_children(r: Recorder) -> None:
    """An inline child with a node-name belongs to its parent: blockdev-del of the parent closes
    it (its file, its name) unless another parent still uses it."""
    image = r.dir / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64k", str(image)])
    inline_file = {"driver": "file", "node-name": "a-file", "filename": str(image)}

    def state(label: str) -> None:
        r.log.append((label, node_names(r), holds_open(r, image)))

    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "q"}, file=inline_file)
    state("added")
    refusal(r, "blockdev-del", **{"node-name": "a-file"})  # not the monitor's: its parent's
    r.qmp("blockdev-del", **{"node-name": "q"})
    state("parent deleted")  # the inline child went too, file closed
    others_may(r, "a.qcow2")
    r.qmp("blockdev-add", driver="file", **{"node-name": "a-file"}, filename=str(image))  # the name is free
    r.qmp("blockdev-del", **{"node-name": "a-file"})
    # the inline child also used by a second parent stays while that parent uses it
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "q"}, file=inline_file)
    r.qmp("blockdev-add", driver="raw", **{"node-name": "r2"}, file="a-file", **{"read-only": True})
    r.qmp("blockdev-del", **{"node-name": "q"})
    state("first parent deleted")
    refusal(r, "blockdev-del", **{"node-name": "a-file"})  # still not the monitor's
    r.export("r2", "raw-view")
    r.log.append(("view", r.observe_export("raw-view", True)))
    r.qmp("block-export-del", id="raw-view")
    r.exports.clear()
    r.qmp("blockdev-del", **{"node-name": "r2"})
    state("second parent deleted")  # now it goes
    # inline children of inline children, all named
    inner = {"driver": "qcow2", "node-name": "mid", "file": inline_file}
    r.qmp("blockdev-add", driver="raw", **{"node-name": "r3"}, file=inner)
    state("nested added")
    r.qmp("blockdev-del", **{"node-name": "r3"})
    state("nested deleted")
    others_may(r, "a.qcow2")


def test_blockdev_del_takes_inline_children_unless_another_parent_uses_them(start_daemon, workdir):
    assert_same_view(inline_children, start_daemon, workdir)


def nodes_nobody_uses_go(r: Recorder) -> None:
    """The same rule wherever a node loses its last user: the export of an inline child whose
    parent is gone, a mirror's pivot replacing an inline node, a stream dropping the backing
    files it opened from the header. Each goes, and its file is closed."""
    image = r.dir / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)])
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "q"}, **{"read-only": True},
          file={"driver": "file", "node-name": "a-file", "filename": str(image)})  # fmt: skip
    r.export("a-file", "a-file")
    r.qmp("blockdev-del", **{"node-name": "q"})
    r.log.append(("parent deleted, child exported", node_names(r), holds_open(r, image)))
    r.qmp("block-export-del", id="a-file")
    r.exports.clear()
    r.log.append(("export deleted", node_names(r), holds_open(r, image)))

    make_raw(r.dir / "disk.raw")
    with open(r.dir / "t.raw", "wb") as f:
        f.truncate(SIZE)
    disk = {"driver": "raw", "node-name": "disk", "file": {"driver": "file", "filename": r.path("disk.raw")}}
    r.qmp("blockdev-add", driver="copy-on-read", **{"node-name": "cor"}, file=disk)
    r.qmp("blockdev-add", driver="file", **{"node-name": "t0"}, filename=r.path("t.raw"))
    r.export("cor", "disk", writable=True)
    r.qmp("blockdev-mirror", **{"job-id": "m", "auto-dismiss": False}, device="cor", target="t0", sync="full",
          replaces="disk")  # fmt: skip
    r.daemon.wait_event("BLOCK_JOB_READY", "m")
    r.qmp("block-job-complete", device="m")
    r.wait_job("m")
    r.log.append(("inline node replaced", node_names(r), holds_open(r, r.dir / "disk.raw")))
    r.qmp("block-export-del", id="disk")  # (how the copy allocated the target differs: not compared here)
    r.exports.clear()

    run(["qemu-img", "create", "-q", "-f", "qcow2", r.path("base.qcow2"), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x0b 0 64k", r.path("base.qcow2")])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", r.path("top.qcow2")])
    top_file = {"driver": "file", "filename": r.path("top.qcow2")}
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "top"}, file=top_file)
    r.qmp("block-stream", device="top", **{"job-id": "s", "auto-dismiss": False})
    r.wait_job("s")
    r.log.append(("backing streamed away", node_names(r), holds_open(r, r.dir / "base.qcow2")))
    r.export("top")


def test_a_node_nobody_uses_any_more_goes_unless_the_monitor_owns_it(start_daemon, workdir):
    assert_same_view(nodes_nobody_uses_go, start_daemon, workdir)


# -- iothreads ---------------------------------------------------------------------------------------


def test_iothread_options_are_refused_until_pynbd_has_iothreads(start_daemon, workdir):
    """qemu-storage-daemon runs exports in iothreads; pynbd has none, so it refuses the options
    with the reason instead of accepting them and running the export in its main loop anyway."""
    make_raw(workdir / "disk.raw", SIZE)
    for kind in KINDS:
        daemon = start_daemon(kind, "--blockdev", f"driver=file,node-name=f0,filename={workdir / 'disk.raw'}")
        export = {"type": "nbd", "id": "e", "node-name": "f0"}
        if kind == "qsd":  # the reference: both options exist and work there
            daemon.ok("object-add", **{"qom-type": "iothread", "id": "io0"})
            daemon.ok("block-export-add", **export, iothread="io0", **{"fixed-iothread": True})
            assert daemon.stop() == 0
            continue
        message = daemon.fails("object-add", **{"qom-type": "iothread", "id": "io0"})
        assert "iothread" in message and "not supported" in message, message
        for option in ({"iothread": "io0"}, {"iothread": "io0", "fixed-iothread": True}, {"fixed-iothread": True}):
            message = daemon.fails("block-export-add", **export, **option)
            assert "iothread" in message and "not supported" in message, message
        assert daemon.ok("query-block-exports") == []  # nothing half made: the id and name are free
        daemon.ok("block-export-add", **export, **{"fixed-iothread": False})  # the default: nothing asked
        assert daemon.stop() == 0


def test_an_iothread_on_the_command_line_stops_the_daemon_with_the_reason(workdir):
    from tests.peers import PYNBD

    result = run([PYNBD, "daemon", "--object", "iothread,id=io0"], check=False, timeout=60)
    assert result.returncode != 0
    assert "iothread" in result.stderr and "not supported" in result.stderr, result.stderr
