"""pynbd daemon driven over QMP with qemu.qmp, next to qemu-storage-daemon running the same script."""

import pytest

from tests.daemons import KINDS
from tests.peers import run

MiB = 1 << 20


@pytest.fixture
def image(workdir):
    path = workdir / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\xab" * 65536)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_export_added_over_qmp_serves_the_file(kind, start_daemon, image):
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "f0"}, filename=str(image))
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file="f0")
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, name="disk", writable=True)
    assert daemon.ok("query-block-exports") == [{"type": "nbd", "id": "e0", "node-name": "r0", "shutting-down": False}]
    out = run(["nbdinfo", "--map", daemon.uri("disk")]).stdout.split("\n")
    assert out[1].split()[:3] == [str(MiB), "65536", "0"]
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4096", daemon.uri("disk")])
    assert image.read_bytes()[:4096] == b"\x5a" * 4096


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_leave_the_graph_unchanged(kind, start_daemon, image):
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "f0"}, filename=str(image))
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file="f0")
    before = daemon.ok("x-debug-query-block-graph")
    daemon.fails("blockdev-add", driver="file", **{"node-name": "f0"}, filename=str(image))  # duplicate
    daemon.fails("blockdev-add", driver="raw", **{"node-name": "r1"}, file="nonexistent")
    daemon.fails("blockdev-add", driver="file", **{"node-name": "x"})  # filename missing
    daemon.fails("blockdev-add", driver="file", **{"node-name": "x"}, filename=42)  # ill-typed
    daemon.fails("blockdev-add", driver="no-such-driver", **{"node-name": "x"})
    daemon.fails("blockdev-del", **{"node-name": "f0"})  # in use by r0
    daemon.fails("blockdev-del", **{"node-name": "nope"})
    daemon.fails("block-export-del", id="nope")
    daemon.fails("transaction", actions=[{"type": "abort", "data": {}}])
    assert daemon.cmd("no-such-command")["error"]["class"] == "CommandNotFound"
    assert daemon.ok("x-debug-query-block-graph") == before


@pytest.mark.parametrize("kind", KINDS)
def test_exports_come_and_go_while_others_serve(kind, start_daemon, image):
    import nbd

    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=MiB, **{"read-zeroes": True})
    daemon.ok("blockdev-add", driver="file", **{"node-name": "f0"}, filename=str(image))
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "f0"})
    h = nbd.NBD()
    h.connect_uri(daemon.uri("f0"))
    daemon.ok("block-export-add", type="nbd", id="e1", **{"node-name": "n0"})
    assert run(["nbdinfo", "--size", daemon.uri("n0")]).stdout.strip() == str(MiB)
    daemon.ok("block-export-del", id="e1")
    assert h.pread(65536, MiB) == b"\xab" * 65536  # the first export's client never noticed
    h.shutdown()
    assert daemon.wait_event("BLOCK_EXPORT_DELETED", timeout=30)["data"] == {"id": "e1"}


def test_blockdev_create_refuses_qcow2_options_it_cannot_honour(start_daemon, workdir):
    """An image asked to be encrypted (or to keep its data elsewhere) must not come out plain."""
    (workdir / "new.qcow2").write_bytes(b"")
    daemon = start_daemon("pynbd")
    daemon.ok("blockdev-add", driver="file", **{"node-name": "f"}, filename=str(workdir / "new.qcow2"))
    for job_id, extra in (("enc", {"encrypt": {"format": "luks", "key-secret": "s0"}}), ("df", {"data-file": "f"})):
        daemon.ok(
            "blockdev-create", **{"job-id": job_id}, options={"driver": "qcow2", "file": "f", "size": MiB, **extra}
        )
        daemon.wait_event("JOB_STATUS_CHANGE", job_id, timeout=30, status="concluded")
        [job] = daemon.ok("query-jobs")
        assert "not supported" in job["error"]
        daemon.ok("job-dismiss", id=job_id)
    assert (workdir / "new.qcow2").read_bytes() == b""
