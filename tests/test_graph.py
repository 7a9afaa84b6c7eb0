"""The graph core: permissions computed as one transaction, frozen links, qemu-compatible locks."""

import subprocess

import pytest

from pynbd.graph.core import BlockGraph, FrozenLinkError, GraphError, GraphUser, PermissionConflict
from pynbd.graph.perms import ALL, Perm, Role
from pynbd.nodes.file import FileNode
from pynbd.nodes.memory import MemoryNode
from pynbd.nodes.raw import RawNode

WRITER = (Perm.CONSISTENT_READ | Perm.WRITE, ALL & ~Perm.RESIZE)
EXCLUSIVE_WRITER = (Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)


def snapshot(graph: BlockGraph, users=()):
    return graph.debug_graph(users)


def raw_over_memory(graph: BlockGraph, name="fmt"):
    disk = graph.add_node(MemoryNode(1 << 20, node_name=name + "-file"))
    fmt = graph.add_node(RawNode(node_name=name))
    graph.attach_child(fmt, "file", disk)
    return fmt, disk


def test_a_writer_that_does_not_share_write_excludes_a_second_writer():
    graph = BlockGraph()
    fmt, _ = raw_over_memory(graph)
    first, second = GraphUser("export-a"), GraphUser("export-b")
    graph.attach_user(first, fmt, *EXCLUSIVE_WRITER)
    before = snapshot(graph, [first, second])
    with pytest.raises(PermissionConflict) as exc:
        graph.attach_user(second, fmt, *WRITER)
    message = str(exc.value)
    assert "'write'" in message and "export-a" in message and "export-b" in message
    assert snapshot(graph, [first, second]) == before  # the failed attach left no trace
    assert fmt.parents == first.links


def test_shared_writers_coexist_and_permissions_flow_down():
    graph = BlockGraph()
    fmt, disk = raw_over_memory(graph)
    a, b = GraphUser("a"), GraphUser("b")
    graph.attach_user(a, fmt, *WRITER)
    graph.attach_user(b, fmt, *WRITER)
    link = fmt.children["file"]
    assert link.perm == Perm.CONSISTENT_READ | Perm.WRITE  # raw filters its file: perms pass through
    assert link.shared & Perm.WRITE
    assert disk.perm == link.perm


def test_read_only_node_refuses_writers():
    graph = BlockGraph()
    node = graph.add_node(MemoryNode(4096, node_name="ro"))
    node.read_only = True
    with pytest.raises(PermissionConflict, match="read-only"):
        graph.attach_user(GraphUser("w"), node, *WRITER)
    assert node.parents == []


def test_frozen_link_counter_blocks_changes_until_every_holder_unfreezes():
    graph = BlockGraph()
    base = graph.add_node(MemoryNode(4096, node_name="base"))
    other = graph.add_node(MemoryNode(4096, node_name="other"))
    top = graph.add_node(RawNode(node_name="top"))
    link = graph.attach_child(top, "file", base, Role.filtered())
    job1 = graph.freeze_chain(top, base, "job 'a'")
    job2 = graph.freeze_chain(top, base, "job 'b'")  # two jobs that need it unchanged share the link
    assert link.freeze_count == 2
    with pytest.raises(FrozenLinkError, match="frozen by job 'a' and job 'b'"):
        graph.replace_child(link, other)
    graph.unfreeze_links(job1, "job 'a'")
    with pytest.raises(FrozenLinkError):
        graph.detach(link)
    graph.unfreeze_links(job2, "job 'b'")
    graph.replace_child(link, other)
    assert top.child_node("file") is other and base.parents == []


def test_cycles_and_busy_nodes_are_refused():
    graph = BlockGraph()
    fmt, disk = raw_over_memory(graph)
    with pytest.raises(GraphError, match="cycle"):
        graph.attach_child(disk, "file", fmt, Role.image())
    with pytest.raises(GraphError, match="busy"):
        graph.remove_node(disk)
    graph.remove_node(fmt)
    assert disk.parents == [] and "fmt" not in graph.nodes


def test_inserting_a_filter_moves_every_user_at_once():
    graph = BlockGraph()
    disk = graph.add_node(MemoryNode(4096, node_name="disk"))
    users = [GraphUser(f"u{i}") for i in range(2)]
    for user in users:
        graph.attach_user(user, disk, *WRITER)
    filt = graph.add_node(RawNode(node_name="filter"))
    own = graph.attach_child(filt, "file", disk, Role.filtered())
    graph.replace_node(disk, filt, keep=[own])
    assert [link.node for user in users for link in user.links] == [filt, filt]
    assert disk.parents == [own]


def test_locks_keep_qemu_from_writing_an_image_pynbd_writes(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    graph = BlockGraph()
    protocol = graph.add_node(FileNode(str(image), node_name="proto"))
    fmt = graph.add_node(RawNode(node_name="fmt"))
    graph.attach_child(fmt, "file", protocol)  # raw is a filter: the export's perms pass through
    user = GraphUser("export")
    graph.attach_user(user, fmt, *EXCLUSIVE_WRITER)
    result = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "lock" in (result.stdout + result.stderr).lower()
    graph.detach(user.links[0])  # dropping the user drops the locks
    result = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_pynbd_cannot_write_exclusively_while_qemu_writes(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    # qemu-io in interactive mode keeps the image open (and locked) until stdin closes;
    # it takes "write" and shares everything, so only a user that unshares write must fail
    qemu = subprocess.Popen(["qemu-io", "-f", "raw", str(image)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        qemu.stdin.write(b"write 0 512\n")
        qemu.stdin.flush()
        assert b"wrote" in qemu.stdout.readline()  # it holds its locks now
        graph = BlockGraph()
        protocol = graph.add_node(FileNode(str(image), node_name="proto"))
        with pytest.raises(Exception, match="lock"):
            graph.attach_user(GraphUser("export"), protocol, *EXCLUSIVE_WRITER)
        assert protocol.parents == []
        graph.attach_user(GraphUser("sharing-export"), protocol, *WRITER)
    finally:
        qemu.stdin.close()
        qemu.wait(timeout=60)


def test_lock_transition_holds_the_union_until_it_commits(tmp_path):
    """During a change of permissions (a reopen) the file stays locked for both the old and the
    new rights; only at commit does it narrow, so no other process slips into the gap."""
    import os

    from pynbd.graph import locks

    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4096))
    ours, theirs = os.open(image, os.O_RDWR), os.open(image, os.O_RDWR)
    try:
        writer_alone = (Perm.CONSISTENT_READ | Perm.WRITE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)
        reader_sharing_all = (Perm.CONSISTENT_READ, ALL)
        locks.apply(ours, *writer_alone)
        locks.transition(ours, writer_alone, reader_sharing_all)  # prepare
        with pytest.raises(locks.LockConflict):
            locks.check(theirs, Perm.WRITE, ALL)  # write is still unshared in between
        locks.apply(ours, *reader_sharing_all)  # commit
        locks.check(theirs, Perm.WRITE, ALL)
        with pytest.raises(locks.LockConflict):  # and back: a writer now blocks our exclusive claim
            locks.apply(theirs, Perm.WRITE, ALL)
            locks.transition(ours, reader_sharing_all, writer_alone)
    finally:
        os.close(ours)
        os.close(theirs)
