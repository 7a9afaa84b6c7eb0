"""SIGTERM, SIGINT and quit: the daemon stops serving, flushes and closes every node, and exits 0.

Whatever an NBD client wrote and had acknowledged is in the image afterwards, a qcow2 image is
consistent for qemu-img check, and a remote NBD server sees a clean disconnect.
"""

from __future__ import annotations

import random
import signal

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run, start_activated

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def write_acknowledged(uri: str, size: int, seed: int) -> bytearray:
    """Write 64 KiB blocks with many requests in flight; return once every one is acknowledged."""
    rng = random.Random(seed)
    expected = bytearray(size)
    h = nbd.NBD()
    h.connect_uri(uri)
    cookies = []
    for offset in range(0, size, 65536):
        if rng.random() < 0.7:
            data = rng.randbytes(65536)
            expected[offset : offset + 65536] = data
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset))
        while h.aio_in_flight() >= 32:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie)  # raises if the server answered with an error
    return expected  # the client is still connected when the daemon is told to stop


def stop_with(daemon, how: str) -> int:
    if how == "quit":
        daemon.ok("quit")
    else:
        daemon.proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
    return daemon.proc.wait(30)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "quit"])
@pytest.mark.parametrize("kind", KINDS)
def test_acknowledged_writes_are_in_the_raw_file(kind, how, start_daemon, workdir):
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file={"driver": "file", "filename": str(image)})
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, writable=True)
    expected = write_acknowledged(daemon.uri("r0"), 8 * MiB, seed=1)
    assert stop_with(daemon, how) == 0
    assert image.read_bytes() == expected


@pytest.mark.parametrize("kind", KINDS)
def test_a_qcow2_image_is_consistent_after_sigterm(kind, start_daemon, workdir):
    image = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(8 * MiB)])
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "q0"}, file={"driver": "file", "filename": str(image)})
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "q0"}, writable=True)
    expected = write_acknowledged(daemon.uri("q0"), 8 * MiB, seed=2)
    assert stop_with(daemon, "SIGTERM") == 0
    run(["qemu-img", "check", str(image)])
    flat = workdir / "flat.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(flat)])
    assert flat.read_bytes() == expected


@pytest.mark.parametrize("kind", KINDS)
def test_quit_exits_and_removes_the_pid_file(kind, start_daemon, workdir):
    pid_file = workdir / f"{kind}.pid"
    daemon = start_daemon(kind, "--pid-file" if kind == "pynbd" else "--pidfile", str(pid_file))
    assert int(pid_file.read_text()) == daemon.proc.pid  # written before QMP answers
    assert daemon.ok("quit") == {}
    if kind == "pynbd":  # qemu-storage-daemon 7.2 sends no event; qemu itself sends this one
        event = daemon.wait_event("SHUTDOWN", timeout=30)
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert daemon.proc.wait(30) == 0
    assert not pid_file.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_disconnects_from_a_remote_nbd_server(kind, start_daemon, workdir):
    """qemu-nbd without --persistent exits 0 once its only client disconnects properly."""
    image = workdir / "remote.raw"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    remote = start_activated(["qemu-nbd", "-f", "raw", str(image)], workdir)
    try:
        daemon = start_daemon(kind)
        server = {"type": "unix", "path": remote.socket_path}
        daemon.ok("blockdev-add", driver="nbd", **{"node-name": "n0"}, server=server)
        daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}, writable=True)
        expected = write_acknowledged(daemon.uri("n0"), 4 * MiB, seed=3)
        assert stop_with(daemon, "SIGTERM") == 0
        assert remote.proc.wait(30) == 0
        assert image.read_bytes() == expected
    finally:
        remote.stop()


def test_sigterm_with_clients_connected_and_exports_busy(start_daemon, workdir):
    """Neither an idle client nor one that has just written holds the daemon up."""
    image = workdir / "disk.raw"
    image.write_bytes(bytes(MiB))
    daemon = start_daemon("pynbd")
    daemon.ok("blockdev-add", driver="raw", **{"node-name": "r0"}, file={"driver": "file", "filename": str(image)})
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, writable=True)
    idle = nbd.NBD()
    idle.connect_uri(daemon.uri("r0"))
    busy = nbd.NBD()
    busy.connect_uri(daemon.uri("r0"))
    busy.pwrite(b"\x99" * 4096, 0)
    assert stop_with(daemon, "SIGTERM") == 0
    assert image.read_bytes()[:4096] == b"\x99" * 4096
    with pytest.raises(nbd.Error):
        idle.pread(512, 0)  # the server closed the connection


@pytest.mark.parametrize("how", ["quit", "SIGTERM"])
@pytest.mark.parametrize("kind", KINDS)
def test_stopping_cancels_a_ready_job_waiting_for_finalize(kind, how, start_daemon, workdir):
    """An active commit that is READY with auto-finalize off would wait forever for job-finalize
    if stopping merely "completed" it: stopping cancels every job outright, as qemu does."""
    base, top = workdir / "base.qcow2", workdir / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(MiB)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 1M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "top"}, file={"driver": "file", "filename": str(top)})
    daemon.ok("block-commit", **{"job-id": "c0", "device": "top", "auto-finalize": False})
    daemon.wait_event("BLOCK_JOB_READY", "c0")
    assert stop_with(daemon, how) == 0
    run(["qemu-img", "check", str(top)])
    run(["qemu-img", "check", str(base)])
