"""Several QMP monitors on one daemon: commands run one at a time across all of them, as under
qemu's big lock, so a command on one monitor never sees another's half-done.

The races send a command on each of two monitors before reading either reply, and check that the
end state is one of the two a serial order gives; qemu-storage-daemon runs the same script.
"""

from __future__ import annotations

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

MiB = 1 << 20
ROUNDS = 40
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def qcow2_image(workdir):
    path = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(4 * MiB)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 1M 64k", str(path)])
    return path


def node_names(daemon) -> set[str]:
    return {n["node-name"] for n in daemon.ok("query-named-block-nodes")}


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_monitor_on_its_own_socket_runs_commands(kind, start_daemon):
    daemon = start_daemon(kind, monitors=2)
    other = daemon.monitor()
    try:
        assert "return" in other.cmd("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=MiB)
        assert "n0" in node_names(daemon)  # seen from the first monitor
        assert "return" in other.cmd("query-version")
    finally:
        other.close()


@pytest.mark.parametrize("kind", KINDS)
def test_blockdev_del_racing_block_export_add_never_exports_a_closed_node(kind, start_daemon, qcow2_image):
    """blockdev-del of a qcow2 node (which awaits the image's close) on one monitor, block-export-add
    of that node on another, both sent before either reply is read: either the export exists on an
    open node (and the delete was refused), or the node is gone and the export was refused."""
    daemon = start_daemon(kind, "--blockdev", f"driver=file,node-name=qf,filename={qcow2_image}", monitors=3)
    deleter, exporter = daemon.monitor(1), daemon.monitor(2)
    outcomes = {"exported": 0, "deleted": 0}
    try:
        for round_ in range(ROUNDS):
            daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "q"}, file="qf")
            sends = [
                lambda: deleter.send_command("blockdev-del", **{"node-name": "q"}),
                lambda: exporter.send_command(
                    "block-export-add", type="nbd", id="e", **{"node-name": "q"}, name="e", writable=True
                ),
            ]
            for send in sends if round_ % 2 else reversed(sends):  # each goes first in turn
                send()
            deleted, exported = deleter.recv(), exporter.recv()
            assert ("return" in deleted) != ("return" in exported), (deleted, exported)
            exports = daemon.ok("query-block-exports")
            if "return" in exported:
                outcomes["exported"] += 1
                assert "busy" in deleted["error"]["desc"] or "in use" in deleted["error"]["desc"], deleted
                assert exports == [{"type": "nbd", "id": "e", "node-name": "q", "shutting-down": False}]
                assert "q" in node_names(daemon)
                h = nbd.NBD()
                h.connect_uri(daemon.uri("e"))
                try:  # the node is open: it reads its image and takes writes
                    assert h.pread(65536, MiB) == b"\x5c" * 65536
                    h.pwrite(b"\x6d" * 4096, 2 * MiB)
                    h.flush()
                    assert h.pread(4096, 2 * MiB) == b"\x6d" * 4096
                finally:
                    h.shutdown()
                daemon.ok("block-export-del", id="e")
                daemon.wait_event("BLOCK_EXPORT_DELETED")
                daemon.ok("blockdev-del", **{"node-name": "q"})
            else:
                outcomes["deleted"] += 1
                assert "Cannot find" in exported["error"]["desc"], exported
                assert exports == []
                assert "q" not in node_names(daemon)
    finally:
        deleter.close()
        exporter.close()
    assert daemon.stop() == 0
    check = run(["qemu-img", "check", str(qcow2_image)], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert sum(outcomes.values()) == ROUNDS
