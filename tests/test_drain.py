"""Requests in flight across graph changes: the scenarios of issue 10, pynbd beside qemu-storage-daemon.

A *gated remote* (nbdkit's eval plugin over a plain file) holds the next write it receives until the
test releases it, and tells the test when the write has arrived: so a guest write is provably inside
the daemon's graph (past the export, the filters, the nbd node) while the test sends a QMP command.
No timers: the test and the remote meet at two named pipes.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import nbdkit_server, run

MiB = 1 << 20
SIZE = 4 * MiB
WAIT = 60  # seconds any thread of a test may take before the test fails instead of hanging

EVAL_SCRIPTS = {
    "get_size": "echo {size}",
    "can_write": "exit 0",
    "can_flush": "exit 0",
    "flush": "exit 0",
    "thread_model": "echo parallel",
    "pread": "dd if={disk} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
    "pwrite": (
        # bounded, so a held write never outlives a failed test by long
        "if [ -e {armed} ]; then rm -f {armed}; timeout 120 sh -c 'echo arrived > {arrived}'; "
        "timeout 120 sh -c 'read x < {release}'; fi; "
        "dd of={disk} seek=$4 oflag=seek_bytes conv=notrunc status=none"
    ),
}


class GatedRemote:
    """An NBD server whose next write, once armed, waits for :meth:`release`."""

    def __init__(self, workdir: Path, size: int = SIZE) -> None:
        self.disk = workdir / "remote.img"
        self.disk.write_bytes(b"\x11" * size)
        self.armed = workdir / "armed"
        self.arrived = workdir / "arrived.fifo"
        self.release_fifo = workdir / "release.fifo"
        for fifo in (self.arrived, self.release_fifo):
            os.mkfifo(fifo)
        paths = {"disk": self.disk, "armed": self.armed, "arrived": self.arrived, "release": self.release_fifo}
        scripts = [f"{name}={script.format(size=size, **paths)}" for name, script in EVAL_SCRIPTS.items()]
        self.server = nbdkit_server(workdir, "eval", *scripts)

    def arm(self) -> None:
        self.armed.touch()

    def wait_arrived(self) -> None:
        with open(self.arrived) as fifo:  # returns once the held write has written its line
            assert fifo.read() == "arrived\n"

    def release(self) -> None:
        with open(self.release_fifo, "w") as fifo:
            fifo.write("go\n")

    def stop(self) -> None:
        """Stop nbdkit, first letting go of a write still held (its script would outlive nbdkit)."""
        self.armed.unlink(missing_ok=True)
        for fifo, mode in ((self.arrived, os.O_RDONLY), (self.release_fifo, os.O_WRONLY)):
            try:
                fd = os.open(fifo, mode | os.O_NONBLOCK)  # ENXIO: nobody waits on a write end
            except OSError:
                continue
            try:
                if mode == os.O_WRONLY:
                    os.write(fd, b"go\n")
            finally:
                os.close(fd)
        self.server.stop()


@pytest.fixture
def gated_remote(workdir):
    remotes: list[GatedRemote] = []

    def start(size: int = SIZE) -> GatedRemote:
        remotes.append(GatedRemote(workdir, size))
        return remotes[-1]

    yield start
    for remote in remotes:
        remote.stop()


def in_thread(function, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run ``function`` in a thread; its result (or exception) lands in the returned list."""
    result: list = []

    def run_it() -> None:
        try:
            result.append(function(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the test to raise
            result.append(exc)

    thread = threading.Thread(target=run_it, daemon=True)
    thread.start()
    return thread, result


def joined(thread: threading.Thread, result: list):
    thread.join(WAIT)
    assert not thread.is_alive(), "a request or command never finished"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def write_through(uri: str, data: bytes, offset: int) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
    finally:
        h.shutdown()


def read_through(uri: str, length: int, offset: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return h.pread(length, offset)
    finally:
        h.shutdown()


def daemon_with_remote(start_daemon, kind, remote: GatedRemote, workdir: Path):
    """A daemon exporting the remote (writable) as "d", with a local qcow2 node "tgt" beside it."""
    target = workdir / f"{kind}-target.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(SIZE)])
    daemon = start_daemon(kind)
    daemon.ok(
        "blockdev-add",
        driver="nbd",
        **{"node-name": "src"},
        server={"type": "unix", "path": remote.server.socket_path},
    )
    daemon.ok("blockdev-add", driver="file", **{"node-name": "tf"}, filename=str(target))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "tgt"}, file="tf")
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "src"}, name="d", writable=True)
    return daemon, target


def assert_target_file_holds(target: Path, pattern: int, offset: int, length: int) -> None:
    out = run(["qemu-io", "-f", "qcow2", "-c", f"read -P {pattern:#x} {offset} {length}", str(target)])
    assert "Pattern verification failed" not in out.stdout, out.stdout
    run(["qemu-img", "check", str(target)])


@pytest.mark.parametrize("kind", KINDS)
def test_write_in_flight_at_mirror_complete_survives_the_pivot(kind, start_daemon, gated_remote, workdir):
    remote = gated_remote()
    daemon, target = daemon_with_remote(start_daemon, kind, remote, workdir)
    uri = daemon.uri("d")
    daemon.ok("blockdev-mirror", **{"job-id": "m"}, device="src", target="tgt", sync="full")
    daemon.wait_event("BLOCK_JOB_READY", "m")
    remote.arm()
    writer = in_thread(write_through, uri, b"\xab" * 65536, MiB)
    remote.wait_arrived()  # the write is inside the daemon, held at the remote
    # qemu-storage-daemon answers block-job-complete only once the write is through: send it
    # from a thread, then let the write go on
    completing = in_thread(daemon.cmd, "block-job-complete", device="m")
    remote.release()
    joined(*writer)  # acknowledged
    assert "return" in joined(*completing)
    event = daemon.wait_event("BLOCK_JOB_COMPLETED", "m")
    assert "error" not in event["data"]
    assert daemon.ok("query-block-exports")[0]["node-name"] == "tgt"
    assert read_through(uri, 65536, MiB) == b"\xab" * 65536
    assert daemon.stop() == 0
    assert_target_file_holds(target, 0xAB, MiB, 65536)
    assert_target_file_holds(target, 0x11, 0, MiB)


@pytest.mark.parametrize("kind", KINDS)
def test_write_in_flight_when_mirror_starts_survives_the_pivot(kind, start_daemon, gated_remote, workdir):
    """The filter goes in above a node with a guest write in flight: the write is not lost."""
    remote = gated_remote()
    daemon, target = daemon_with_remote(start_daemon, kind, remote, workdir)
    uri = daemon.uri("d")
    remote.arm()
    writer = in_thread(write_through, uri, b"\xab" * 65536, 2 * MiB)
    remote.wait_arrived()
    mirror_args = {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}
    starting = in_thread(daemon.cmd, "blockdev-mirror", **mirror_args)
    remote.release()
    joined(*writer)
    assert "return" in joined(*starting)
    daemon.wait_event("BLOCK_JOB_READY", "m")
    daemon.ok("block-job-complete", device="m")
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "m")["data"]
    assert read_through(uri, 65536, 2 * MiB) == b"\xab" * 65536
    assert daemon.stop() == 0
    assert_target_file_holds(target, 0xAB, 2 * MiB, 65536)


@pytest.mark.parametrize("kind", KINDS)
def test_blockdev_del_waits_for_requests_in_flight(kind, start_daemon, gated_remote, workdir):
    """A graph change never cuts a request in flight: reopen/removal waits for it to finish."""
    remote = gated_remote()
    daemon, _ = daemon_with_remote(start_daemon, kind, remote, workdir)
    remote.arm()
    writer = in_thread(write_through, daemon.uri("d"), b"\xcd" * 4096, 0)
    remote.wait_arrived()
    # the export's node is busy, so this fails at once; tgt is unrelated, so its removal runs
    # (drained) while the write is held, and must neither cut nor lose the write
    removing = in_thread(daemon.cmd, "blockdev-del", **{"node-name": "tgt"})
    remote.release()
    assert "return" in joined(*removing)
    joined(*writer)
    assert read_through(daemon.uri("d"), 4096, 0) == b"\xcd" * 4096
    assert remote.disk.read_bytes()[:4096] == b"\xcd" * 4096


class RandomWriter:
    """Writes 4 KiB blocks at random offsets at queue depth 1 until stopped; keeps a model."""

    def __init__(self, uri: str, size: int, seed: int) -> None:
        self.uri, self.size = uri, size
        self.rng = random.Random(seed)
        self.model: dict[int, bytes] = {}
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> int:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        try:
            while not self.stop.is_set():
                offset = self.rng.randrange(self.size // 4096) * 4096
                data = self.rng.randbytes(4096)
                h.pwrite(data, offset)
                self.model[offset] = data
                self.writes += 1
            h.flush()
        finally:
            h.shutdown()
        return self.writes

    def expected(self, initial: bytes) -> bytes:
        image = bytearray(initial)
        for offset, data in self.model.items():
            image[offset : offset + len(data)] = data
        return bytes(image)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("job", ["mirror", "active-commit"])
def test_mirror_reaches_ready_under_a_steady_random_writer(kind, job, start_daemon, workdir):
    size = 32 * MiB
    base = workdir / f"{kind}-base.qcow2"
    top = workdir / f"{kind}-top.qcow2"
    target = workdir / f"{kind}-target.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)])
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "topf"}, filename=str(top))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "top"}, file="topf")
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "top"}, name="d", writable=True)
    writer = RandomWriter(daemon.uri("d"), size, seed=7)
    writing = in_thread(writer.run)
    if job == "mirror":
        daemon.ok("blockdev-add", driver="file", **{"node-name": "tf"}, filename=str(target))
        daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "tgt"}, file="tf")
        daemon.ok("blockdev-mirror", **{"job-id": "j"}, device="top", target="tgt", sync="full")
    else:
        daemon.ok("block-commit", **{"job-id": "j"}, device="top")
    daemon.wait_event("BLOCK_JOB_READY", "j", timeout=WAIT)
    daemon.ok("block-job-complete", device="j")  # while the writer still writes
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "j", timeout=WAIT)["data"]
    writer.stop.set()
    assert joined(*writing) > 0
    expected = writer.expected(b"\x5a" * size)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("d"))
    assert b"".join(h.pread(4 * MiB, off) for off in range(0, size, 4 * MiB)) == expected
    h.shutdown()
    assert daemon.stop() == 0
    image = target if job == "mirror" else base
    run(["qemu-img", "check", str(image)])
    out = workdir / f"{kind}-out.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(out)])
    assert out.read_bytes() == expected
