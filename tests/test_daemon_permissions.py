"""Permission, lock, cycle and removal rules of the block graph, driven over QMP.

Each script runs against qemu-storage-daemon and pynbd daemon: both must accept and refuse the same
commands, and after a refusal ``x-debug-query-block-graph`` must be exactly what it was before.
"""

from __future__ import annotations

import hashlib
import subprocess

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def qcow2(path, size: str = "1M") -> str:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    return str(path)


def unchanged_after(daemon, *attempts: tuple[str, dict]) -> list[str]:
    """Run commands that must all fail; the graph afterwards must equal the graph before."""
    before = daemon.ok("x-debug-query-block-graph")
    errors = [daemon.fails(command, **args) for command, args in attempts]
    assert daemon.ok("x-debug-query-block-graph") == before
    return errors


def graph_edges(daemon) -> set[tuple]:
    """Edges by node names (exports show as one anonymous root user, as qemu shows them)."""
    graph = daemon.ok("x-debug-query-block-graph")
    names = {n["id"]: n["name"] if n["type"] == "block-driver" else "<user>" for n in graph["nodes"]}
    return {
        (
            names[e["parent"]],
            names[e["child"]],
            "root" if names[e["parent"]] == "<user>" else e["name"],
            tuple(sorted(e["perm"])),
            tuple(sorted(e["shared-perm"])),
        )
        for e in graph["edges"]
    }


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_format_node_cannot_write_under_the_first(kind, start_daemon, workdir):
    image = qcow2(workdir / "disk.qcow2")
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "qf"}, filename=image)
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file="qf")
    [second] = unchanged_after(daemon, ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "qf"}))
    assert "q0" in second and "q1" in second and "write" in second  # names both users and the permission
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r1"}, file="qf")  # takes nothing yet: allowed
    writable, readable = unchanged_after(
        daemon,
        ("block-export-add", {"type": "nbd", "id": "w", "node-name": "r1", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "r", "node-name": "r1"}),  # q0 resizes; exports unshare that
    )
    assert "write" in writable and "resize" in readable
    # the refused node must not have disturbed q0's file: q0 still serves and writes
    daemon.ok("block-export-add", type="nbd", id="q0", **{"node-name": "q0"}, writable=True)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", daemon.uri("q0")])
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x61 0 64k", daemon.uri("q0")])
    edges = graph_edges(daemon)
    assert ("q0", "qf", "file", ("consistent-read", "resize", "write"), ("consistent-read", "write-unchanged")) in edges
    assert ("r1", "qf", "file", (), ("consistent-read", "resize", "write", "write-unchanged")) in edges


@pytest.mark.parametrize("kind", KINDS)
def test_permission_edges_match_qemu(kind, start_daemon, workdir):
    """The perm/shared of every edge for a typical graph, written out as qemu 7.2 computes them."""
    raw = workdir / "disk.raw"
    raw.write_bytes(bytes(MiB))
    top = qcow2(workdir / "top.qcow2")
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file={"driver": "file", "filename": str(raw)})
    daemon.ok("blockdev-add", driver="file", **{"node-name": "tf"}, filename=top)
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file="tf", backing="r0")
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True)
    daemon.ok("block-export-add", type="nbd", id="e1", **{"node-name": "r0"}, name="base")
    edges = {(p if not p.startswith("#") else "#", c if not c.startswith("#") else "#", *rest) for p, c, *rest in
             graph_edges(daemon)}  # fmt: skip
    cr, w, wu, rs = "consistent-read", "write", "write-unchanged", "resize"
    assert edges == {
        ("<user>", "q0", "root", (cr, w), (cr, w, wu)),
        ("<user>", "r0", "root", (cr,), (cr, w, wu)),
        ("q0", "tf", "file", (cr, rs, w), (cr, wu)),
        ("q0", "r0", "backing", (cr,), (cr, rs, w, wu)),  # COW child: read only, shares write as q0 does
        ("r0", "#", "file", (cr,), (cr, w, wu)),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_transaction_leaves_no_trace(kind, start_daemon, workdir):
    raw = workdir / "disk.raw"
    raw.write_bytes(bytes(MiB))
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "f0"}, filename=str(raw))
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file="f0")
    daemon.ok("block-dirty-bitmap-add", node="r0", name="keep")
    nodes_before = daemon.ok("query-named-block-nodes")
    add = {"type": "block-dirty-bitmap-add", "data": {"node": "r0", "name": "new"}}
    unchanged_after(
        daemon,
        ("transaction", {"actions": [add, {"type": "abort", "data": {}}]}),
        ("transaction", {"actions": [add, {"type": "block-dirty-bitmap-add", "data": {"node": "r0", "name": "keep"}}]}),
        ("transaction", {"actions": [add, {"type": "block-dirty-bitmap-add", "data": {"node": "nope", "name": "x"}}]}),
        ("transaction", {"actions": [add, {"type": "no-such-action", "data": {}}]}),
        ("transaction", {"actions": [add, {"type": "block-dirty-bitmap-remove", "data": {"node": "r0", "name": "x"}}]}),
    )
    assert daemon.ok("query-named-block-nodes") == nodes_before  # "new" was never added
    daemon.ok("transaction", actions=[add])
    [r0] = [n for n in daemon.ok("query-named-block-nodes") if n["node-name"] == "r0"]
    assert sorted(b["name"] for b in r0["dirty-bitmaps"]) == ["keep", "new"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_daemon_keeps_other_processes_from_writing_its_image(kind, start_daemon, workdir):
    image = qcow2(workdir / "disk.qcow2")
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "qf"}, filename=image)
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file="qf")  # writes: takes and unshares write
    write = run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", image], check=False)
    assert write.returncode != 0 and 'Failed to get "write" lock' in write.stderr
    info = run(["qemu-img", "info", image], check=False)
    assert info.returncode != 0 and "lock" in info.stderr
    run(["qemu-img", "info", "-U", image])  # sharing readers (-U) are fine
    daemon.ok("blockdev-del", **{"node-name": "q0"})  # the file node stays, but nobody holds write now
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 4k", image])
    daemon.ok("blockdev-del", **{"node-name": "qf"})


def test_pynbd_will_not_open_an_image_qemu_holds(start_daemon, workdir):
    image = qcow2(workdir / "disk.qcow2")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 64k", image])
    qsd = start_daemon("qsd", "--blockdev", f"driver=file,node-name=qf,filename={image}",
                       "--blockdev", "driver=qcow2,node-name=q0,file=qf")  # fmt: skip
    assert qsd.ok("query-named-block-nodes")
    before = digest(image)
    pynbd = start_daemon("pynbd")
    pynbd.ok("blockdev-add", driver="file", **{"node-name": "qf"}, filename=image)  # opening alone locks nothing
    errors = unchanged_after(
        pynbd,
        ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "qf"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": "qf", "read-only": True}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": {"driver": "file", "filename": image}}),
    )
    assert all("lock" in error for error in errors), errors
    assert [n["node-name"] for n in pynbd.ok("query-named-block-nodes")] == ["qf"]
    assert digest(image) == before  # nothing was written into qemu's image
    qsd.stop()
    pynbd.ok("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file="qf")  # now it may
    pynbd.ok("block-export-add", type="nbd", id="e", **{"node-name": "q0"})
    run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x44 0 64k", pynbd.uri("q0")])


def test_a_refused_read_write_open_writes_nothing(start_daemon, workdir):
    """A read-write qcow2 open writes (bitmaps marked in use); refused for a lock, it must not have
    written a byte. qemu-storage-daemon holds the image read-only here, so it marks nothing itself
    and any write by pynbd would show."""
    image = qcow2(workdir / "disk.qcow2")
    run(["qemu-img", "bitmap", "--add", image, "b0"])
    qsd = start_daemon("qsd", "--blockdev", f"driver=file,node-name=qf,filename={image},read-only=on",
                       "--blockdev", "driver=qcow2,node-name=q0,file=qf,read-only=on")  # fmt: skip
    assert qsd.ok("query-named-block-nodes")
    before = digest(image)
    pynbd = start_daemon("pynbd")
    error = pynbd.fails(
        "blockdev-add", driver="qcow2", **{"node-name": "q0"}, file={"driver": "file", "filename": image}
    )
    assert "lock" in error
    assert digest(image) == before


@pytest.mark.parametrize("kind", KINDS)
def test_cycles_are_refused(kind, start_daemon, workdir):
    daemon = start_daemon(kind)
    for name in ("a", "b"):
        path = qcow2(workdir / f"{name}.qcow2")
        daemon.ok("blockdev-add", driver="file", **{"node-name": f"{name}f"}, filename=path)
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "a"}, file="af", backing=None)
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "b"}, file="bf", backing="a")

    def reopen_a(**changes) -> tuple[str, dict]:
        return "blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "a", "file": "af", **changes}]}

    errors = unchanged_after(
        daemon,
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "r"}),  # itself: does not exist yet
        ("blockdev-snapshot", {"node": "b", "overlay": "a"}),  # a over b over a
        reopen_a(backing="b"),
        reopen_a(backing="a"),
        ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "a", "file": "b"}]}),
    )
    assert "cycle" in errors[2] and "cycle" in errors[3]
    command, args = reopen_a(backing=None)
    daemon.ok(command, **args)  # a legal reopen still works afterwards


@pytest.mark.parametrize("kind", KINDS)
def test_nodes_in_use_cannot_be_deleted(kind, start_daemon, workdir):
    raw = workdir / "disk.raw"
    raw.write_bytes(b"\x5a" * MiB)
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "f0"}, filename=str(raw))
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file="f0")
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r1"}, file={"driver": "file", "filename": str(raw)})
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "r0"})
    implicit = next(n["node-name"] for n in daemon.ok("query-named-block-nodes") if n["node-name"].startswith("#"))
    busy_export, busy_parent, not_owned = unchanged_after(
        daemon,
        ("blockdev-del", {"node-name": "r0"}),  # exported
        ("blockdev-del", {"node-name": "f0"}),  # r0's file
        ("blockdev-del", {"node-name": implicit}),  # created implicitly for r1: not the monitor's to delete
    )
    assert "busy" in busy_export or "in use" in busy_export
    assert "in use" in busy_parent or "busy" in busy_parent
    assert "owned" in not_owned
    h = nbd.NBD()
    h.connect_uri(daemon.uri("r0"))
    assert h.pread(4096, 0) == b"\x5a" * 4096  # the export never noticed
    h.shutdown()
    daemon.ok("block-export-del", id="e0")
    daemon.ok("blockdev-del", **{"node-name": "r0"})
    daemon.ok("blockdev-del", **{"node-name": "f0"})
    daemon.ok("blockdev-del", **{"node-name": "r1"})  # takes its implicit file node with it
    assert daemon.ok("query-named-block-nodes") == []


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_node_names_are_refused(kind, start_daemon):
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=MiB)
    errors = unchanged_after(
        daemon,
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "nope"}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "nope"}),
        ("blockdev-del", {"node-name": "nope"}),
        ("block-dirty-bitmap-add", {"node": "nope", "name": "b"}),
        ("blockdev-snapshot", {"node": "n0", "overlay": "nope"}),
        ("block-export-del", {"id": "nope"}),
    )
    assert all("nope" in error for error in errors), errors


def test_qemu_img_sees_the_lock_on_a_raw_export(start_daemon, workdir):
    """A writable export of a raw file holds the write lock against exclusive writers (qemu-img
    convert -n to the image wants write and does not share it... qemu-img commit too); a plain
    raw user that shares write can still open it, as with qemu."""
    raw = workdir / "disk.raw"
    raw.write_bytes(bytes(MiB))
    daemon = start_daemon("pynbd")
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file={"driver": "file", "filename": str(raw)})
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, writable=True)
    resize = subprocess.run(["qemu-img", "resize", "-f", "raw", str(raw), "2M"], capture_output=True, text=True)
    assert resize.returncode != 0 and "lock" in resize.stderr  # the export unshares resize
    assert raw.stat().st_size == MiB
