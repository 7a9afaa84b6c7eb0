"""The ``nbd`` driver: a remote NBD export (nbdkit, qemu-nbd) as a node of the daemon's graph.

Most tests run the same QMP script against qemu-storage-daemon and pynbd daemon and check what
a client of the re-export sees against the remote itself: bytes, base:allocation extents and
errno values must be what nbdinfo/libnbd see on the remote directly.
"""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import time
from pathlib import Path

import nbd
import pytest

from pynbd.client.uri import NBDURI
from pynbd.nodes.base import BlockError
from pynbd.nodes.nbd import NBDNode
from tests.daemons import KINDS
from tests.peers import run, start_activated

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)
PIECES = {0: b"\x11" * 65536, MiB: bytes(range(256)) * 32, 3 * MiB + 4096: b"\x77" * 4096}


def sparse_image(path: Path, size: int = 4 * MiB, pieces: dict[int, bytes] = PIECES) -> bytes:
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
            content[offset : offset + len(data)] = data
    return bytes(content)


def extent_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    """nbdinfo --map as merged (offset, length, type)."""
    merged: list[tuple[int, int, int]] = []
    for e in json.loads(run(["nbdinfo", "--json", f"--map={context}", uri]).stdout):
        if merged and merged[-1][2] == e["type"] and sum(merged[-1][:2]) == e["offset"]:
            merged[-1] = (merged[-1][0], merged[-1][1] + e["length"], e["type"])
        else:
            merged.append((e["offset"], e["length"], e["type"]))
    return merged


def read_all(uri: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        return b"".join(h.pread(min(MiB, size - off), off) for off in range(0, size, MiB))
    finally:
        h.shutdown()


def unix(path: str | None) -> dict:
    return {"type": "unix", "path": path}


def add_nbd(daemon, name: str, server: dict, **options) -> dict:
    return daemon.cmd("blockdev-add", driver="nbd", **{"node-name": name}, server=server, **options)


def export(daemon, node: str, name: str, writable: bool = False, **extra) -> None:
    daemon.ok("block-export-add", type="nbd", id=name, **{"node-name": node}, name=name, writable=writable, **extra)


@pytest.mark.parametrize("kind", KINDS)
def test_reexport_of_nbdkit_file_shows_its_bytes_and_extents(kind, start_nbdkit, start_daemon, workdir):
    content = sparse_image(workdir / "remote.raw")
    remote = start_nbdkit("file", str(workdir / "remote.raw"))
    daemon = start_daemon(kind)
    assert "return" in add_nbd(daemon, "remote", unix(remote.socket_path))
    export(daemon, "remote", "re", **{"allocation-depth": True})
    uri = daemon.uri("re")
    assert read_all(uri) == content
    assert extent_map(uri) == extent_map(remote.uri)
    assert extent_map(uri, "qemu:allocation-depth") == [(0, 4 * MiB, 1)]  # all "local", as qemu says
    [info] = daemon.ok("query-named-block-nodes")
    assert (info["drv"], info["ro"], info["image"]["virtual-size"]) == ("nbd", False, 4 * MiB)
    assert info["file"] == f"nbd+unix://?socket={remote.socket_path}"


@pytest.mark.parametrize("kind", KINDS)
def test_writes_zeroes_and_trims_reach_the_remote(kind, start_nbdkit, start_daemon):
    remote = start_nbdkit("memory", str(4 * MiB))
    daemon = start_daemon(kind)
    # qemu ignores TRIM unless the node is opened with discard=unmap; pynbd always passes it on
    assert "return" in add_nbd(daemon, "mem", unix(remote.socket_path), discard="unmap")
    export(daemon, "mem", "mem", writable=True)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("mem"))
    h.pwrite(b"\xaa" * (2 * MiB), 0)
    h.pwrite(b"\xbb" * 4096, 3 * MiB, nbd.CMD_FLAG_FUA)
    h.zero(MiB, 0)  # may punch a hole: nbdkit memory then reports hole,zero
    h.zero(65536, MiB, nbd.CMD_FLAG_NO_HOLE)
    h.trim(512 * 1024, MiB + 512 * 1024)
    h.flush()
    h.shutdown()
    expected = bytearray(4 * MiB)
    expected[MiB + 65536 : MiB + 512 * 1024] = b"\xaa" * (512 * 1024 - 65536)
    expected[3 * MiB : 3 * MiB + 4096] = b"\xbb" * 4096
    assert read_all(remote.uri) == bytes(expected)  # read from nbdkit directly
    assert extent_map(daemon.uri("mem")) == extent_map(remote.uri)
    start, length, kind_ = extent_map(remote.uri)[0]
    assert (start, kind_) == (0, 3) and length >= MiB  # the zeroed MiB is a hole on the remote


@pytest.mark.parametrize("kind", KINDS)
def test_qemu_nbd_remote_through_a_daemon_export(kind, start_qemu_nbd, start_daemon, workdir):
    image = workdir / "disk.raw"
    sparse_image(image)
    remote = start_qemu_nbd("-e", "4", "-f", "raw", str(image), export="disk")
    daemon = start_daemon(kind)
    assert "return" in add_nbd(daemon, "q", unix(remote.socket_path), export="disk")
    export(daemon, "q", "q", writable=True)
    uri = daemon.uri("q")
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri])
    assert extent_map(uri) == extent_map(remote.uri)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 2M 64k", "-c", "flush", uri])
    assert image.read_bytes()[2 * MiB : 2 * MiB + 65536] == b"\x5c" * 65536


@pytest.mark.parametrize("kind", KINDS)
def test_unreachable_server_fails_blockdev_add_cleanly(kind, start_daemon, workdir):
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=MiB)
    before = daemon.ok("x-debug-query-block-graph")
    missing = str(workdir / "nobody-listens.sock")
    assert missing in daemon.fails("blockdev-add", driver="nbd", **{"node-name": "x"}, server=unix(missing))
    closed = daemon.fails(
        "blockdev-add", driver="nbd", **{"node-name": "x"}, server={"type": "inet", "host": "127.0.0.1", "port": "1"}
    )
    assert "Connection refused" in closed
    daemon.fails("blockdev-add", driver="nbd", **{"node-name": "x"}, server={"type": "inet", "host": "127.0.0.1"})
    daemon.fails("blockdev-add", driver="nbd", **{"node-name": "x"})  # server missing
    daemon.fails("blockdev-add", driver="nbd", **{"node-name": "x"}, server={"type": "inet", "port": 10809})
    assert daemon.ok("x-debug-query-block-graph") == before
    assert [n["node-name"] for n in daemon.ok("query-named-block-nodes")] == ["n0"]


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_export_and_read_only_remote(kind, start_qemu_nbd, start_daemon, workdir):
    image = workdir / "disk.raw"
    content = sparse_image(image)
    remote = start_qemu_nbd("-e", "8", "-r", "-f", "raw", str(image), export="disk")
    server = unix(remote.socket_path)
    daemon = start_daemon(kind)
    assert "not available" in daemon.fails(
        "blockdev-add", driver="nbd", **{"node-name": "x"}, server=server, export="nope"
    )
    assert "error" in add_nbd(daemon, "rw", server, export="disk")  # a read-only export cannot be opened rw
    assert "return" in add_nbd(daemon, "auto", server, export="disk", **{"auto-read-only": True})
    assert "return" in add_nbd(daemon, "ro", server, export="disk", **{"read-only": True})
    assert {n["node-name"]: n["ro"] for n in daemon.ok("query-named-block-nodes")} == {"auto": True, "ro": True}
    daemon.fails("block-export-add", type="nbd", id="w", **{"node-name": "auto"}, writable=True)
    export(daemon, "auto", "auto")
    assert read_all(daemon.uri("auto")) == content


@pytest.mark.parametrize("kind", KINDS)
def test_remote_errors_reach_the_client_with_their_errno(kind, start_nbdkit, start_daemon):
    full = start_nbdkit("--filter=error", "memory", str(MiB), "error-pwrite=ENOSPC", "error-pwrite-rate=1")
    bad = start_nbdkit("--filter=error", "pattern", str(MiB), "error-pread=EIO", "error-pread-rate=1")
    daemon = start_daemon(kind)
    assert "return" in add_nbd(daemon, "full", unix(full.socket_path))
    assert "return" in add_nbd(daemon, "bad", unix(bad.socket_path), **{"read-only": True})
    export(daemon, "full", "full", writable=True)
    export(daemon, "bad", "bad")
    h = nbd.NBD()
    h.connect_uri(daemon.uri("full"))
    with pytest.raises(nbd.Error) as write_error:
        h.pwrite(b"x" * 4096, 0)
    assert write_error.value.errnum == errno.ENOSPC
    h.flush()  # the connection and the daemon are fine
    h.shutdown()
    h = nbd.NBD()
    h.connect_uri(daemon.uri("bad"))
    with pytest.raises(nbd.Error) as read_error:
        h.pread(4096, 0)
    if kind == "pynbd":  # qemu-storage-daemon 7.2 drops its client instead (libnbd then says ENOTCONN)
        assert read_error.value.errnum == errno.EIO
        assert h.aio_is_ready()  # the connection is still usable
        h.shutdown()


def test_lost_connection_fails_requests_not_the_daemon(start_nbdkit, start_daemon):
    remote = start_nbdkit("memory", str(MiB))
    daemon = start_daemon("pynbd")
    assert "return" in add_nbd(daemon, "m", unix(remote.socket_path))
    export(daemon, "m", "m", writable=True)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("m"))
    h.pwrite(b"\x01" * 4096, 0)
    remote.stop(signal.SIGKILL)
    with pytest.raises(nbd.Error) as exc:
        h.pread(4096, 0)
    assert exc.value.errnum == errno.EIO
    h.shutdown()
    daemon.ok("block-export-del", id="m")
    daemon.ok("blockdev-del", **{"node-name": "m"})
    assert daemon.ok("query-named-block-nodes") == []


@pytest.mark.parametrize("kind", KINDS)
def test_blockdev_del_disconnects_from_the_remote(kind, start_daemon, workdir):
    # qemu-nbd without --persistent exits when its last client goes: proof the node disconnected
    image = workdir / "disk.raw"
    sparse_image(image)
    remote = start_activated(["qemu-nbd", "-f", "raw", str(image)], workdir)
    try:
        daemon = start_daemon(kind)
        assert "return" in add_nbd(daemon, "q", unix(remote.socket_path))
        assert remote.proc.poll() is None
        daemon.ok("blockdev-del", **{"node-name": "q"})
        assert remote.proc.wait(30) == 0
    finally:
        remote.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_nbdcopy_through_the_reexport(kind, start_nbdkit, start_daemon, workdir):
    """nbdcopy keeps many requests in flight on several connections; all are served through
    the node's one connection to the remote."""
    content = sparse_image(workdir / "remote.raw", 8 * MiB, {i * MiB: bytes([i + 1]) * 300_000 for i in range(8)})
    remote = start_nbdkit("file", str(workdir / "remote.raw"))
    daemon = start_daemon(kind)
    assert "return" in add_nbd(daemon, "r", unix(remote.socket_path))
    export(daemon, "r", "r")
    copy = workdir / "copy.raw"
    run(["nbdcopy", "--request-size=65536", daemon.uri("r"), str(copy)])
    assert copy.read_bytes() == content


# -- the node on its own, without a daemon ---------------------------------------------------------


def test_requests_overlap_on_the_one_connection(start_nbdkit):
    """Eight reads against a server that delays each by a second are all in flight at once."""
    remote = start_nbdkit("--filter=delay", "memory", str(MiB), "delay-read=1")

    async def main() -> tuple[int, float]:
        node = NBDNode(NBDURI("unix", socket_path=remote.socket_path))
        await node.open()
        try:
            start = time.monotonic()
            reads = [asyncio.ensure_future(node.read_into(i * 4096, memoryview(bytearray(4096)))) for i in range(8)]
            most = 0
            while not all(r.done() for r in reads):
                most = max(most, node.client.in_flight)
                await asyncio.wait(reads, timeout=0.05)
            await asyncio.gather(*reads)
            return most, time.monotonic() - start
        finally:
            await node.close()

    most, elapsed = asyncio.run(main())
    assert most == 8
    assert elapsed < 6  # serialised they would take 8 s


def test_unaligned_block_status_covers_exactly_the_range(start_nbdkit, workdir):
    sparse_image(workdir / "remote.raw")
    remote = start_nbdkit("file", str(workdir / "remote.raw"))

    async def main():
        node = NBDNode(NBDURI("unix", socket_path=remote.socket_path))
        await node.open()
        try:
            return [await node.block_status(offset, length) for offset, length in ((100, 1000), (65000, MiB + 9000))]
        finally:
            await node.close()

    inside, across = asyncio.run(main())
    assert inside == [(1000, 0)]
    end = 65000 + MiB + 9000
    assert across == [(65536 - 65000, 0), (MiB - 65536, 3), (8192, 0), (end - MiB - 8192, 3)]


def test_node_errors_are_block_errors(start_nbdkit):
    remote = start_nbdkit("--filter=error", "memory", str(MiB), "error-trim=EPERM", "error-trim-rate=1")

    async def main():
        node = NBDNode(NBDURI("unix", socket_path=remote.socket_path))
        await node.open()
        try:
            with pytest.raises(BlockError) as exc:
                await node.discard(0, 65536)
            return exc.value.errno
        finally:
            await node.close()

    assert asyncio.run(main()) == errno.EPERM


# -- TLS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tls_remote_with_tls_creds(kind, start_nbdkit, start_daemon, tls_certs):
    remote = start_nbdkit("--tls=require", f"--tls-certificates={tls_certs.dir}", "memory", str(MiB), tcp=True)
    daemon = start_daemon(kind)
    creds = {"qom-type": "tls-creds-x509", "endpoint": "client"}
    daemon.ok("object-add", **creds, id="tls0", dir=str(tls_certs.ca_only_dir))
    daemon.ok("object-add", **creds, id="other", dir=str(tls_certs.other_ca_dir))
    inet = {"type": "inet", "host": "127.0.0.1", "port": str(remote.port)}
    assert "error" in add_nbd(daemon, "plain", inet)  # the server requires TLS
    assert "error" in add_nbd(daemon, "wrong", inet, **{"tls-creds": "tls0", "tls-hostname": "other.example"})
    assert "error" in add_nbd(daemon, "untrusted", inet, **{"tls-creds": "other"})
    assert "return" in add_nbd(daemon, "tls", inet, **{"tls-creds": "tls0"})
    assert "return" in add_nbd(daemon, "named", inet, **{"tls-creds": "tls0", "tls-hostname": "localhost"})
    export(daemon, "tls", "tls", writable=True)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4096", daemon.uri("tls")])
    h = nbd.NBD()
    h.connect_uri(daemon.uri("tls"))
    assert h.pread(4096, 0) == b"\x42" * 4096
    h.shutdown()
    assert sorted(n["node-name"] for n in daemon.ok("query-named-block-nodes")) == ["named", "tls"]
