"""``pynbd info`` and ``pynbd copy`` against pynbd, qemu-nbd, nbdkit and nbd-server.

``pynbd info`` is compared with nbdinfo on the same export; ``pynbd copy`` round trips a 1 GiB
sparse image through each server and must come back equal (``qemu-img compare``) and sparse.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.peers import PYNBD, have, listening_socket, run

MiB = 1 << 20
GiB = 1 << 30
pytestmark = pytest.mark.timeout(300)


def pynbd(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return run([PYNBD, *args], check=check, **kwargs)


class InetdServer:
    """Runs one server process per connection with the connection on its stdin and stdout.

    nbd-server 3.24 has no socket activation, and in the foreground (``-d``) it serves a single
    client; with ``port = 0`` it serves the connection on stdin instead (inetd mode). Accepting
    here and handing each connection to a fresh ``nbd-server -d`` serves any number of clients
    from a socket that listens before any process starts, so nothing waits for a port.
    """

    def __init__(self, argv: list[str], tmp: Path, export: str = "") -> None:
        self.argv, self.export = argv, export
        self.sock, self.socket_path, _ = listening_socket(tmp)
        self.log_path = tmp / "inetd.log"
        self.procs: list[subprocess.Popen] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket_path}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, open(self.log_path, "ab") as log:
                self.procs.append(subprocess.Popen(self.argv, stdin=conn, stdout=conn, stderr=log))

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.sock.close()
        self.thread.join(10)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(30)


@pytest.fixture
def start_nbd_server(workdir):
    servers = []

    def start(image: Path, export: str = "disk") -> InetdServer:
        conf = workdir / f"nbd-server-{len(servers)}.conf"
        conf.write_text(f"[generic]\nport = 0\n[{export}]\nexportname = {image}\nflush = true\ntrim = true\n")
        server = InetdServer(["nbd-server", "-d", "-C", str(conf)], workdir, export)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def sparse_image(path: Path, size: int, seed: int = 1) -> None:
    """A sparse raw image: a few MiB of data scattered over ``size`` bytes, some of it unaligned."""
    rng = __import__("random").Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, 3 * MiB + 512, size // 3, size // 2 + 4096 + 512, size - 2 * MiB):
            f.seek(offset)
            f.write(rng.randbytes(rng.randrange(64 * 1024, 2 * MiB)))
        f.seek(size // 4)
        f.write(bytes(MiB))  # allocated zeroes: must not become allocated data in the copy


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def images_equal(a: Path, b: Path) -> bool:
    return run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)], check=False).returncode == 0


# -- pynbd info -----------------------------------------------------------------------------------


def nbdinfo_json(*args: str) -> dict:
    document = json.loads(run(["nbdinfo", "--json", *args]).stdout)
    for export in document.get("exports", []):
        export.pop("content", None)  # nbdinfo's file(1)-style probe of the first sector
        export.pop("uri", None)
    return document


def pynbd_info_json(*args: str) -> dict:
    document = json.loads(pynbd("info", "--json", *args).stdout)
    for export in document.get("exports", []):
        export.pop("uri", None)
    return document


def test_info_json_matches_nbdinfo(start_pynbd, start_qemu_nbd, start_nbdkit, workdir):
    image = workdir / "disk.raw"
    sparse_image(image, 16 * MiB)
    servers = [
        start_pynbd(str(image), "--description", "pynbd disk", export="d"),
        start_qemu_nbd("-f", "raw", "-D", "qemu disk", str(image)),
        start_nbdkit("--filter=blocksize-policy", "memory", "1G", "blocksize-minimum=512"),
        start_nbdkit("-r", "file", str(image)),
    ]
    for server in servers:
        assert pynbd_info_json(server.uri) == nbdinfo_json(server.uri), server.argv
    listing = pynbd_info_json("--list", servers[0].uri)
    assert listing == nbdinfo_json("--list", servers[0].uri)
    assert [e["export-name"] for e in listing["exports"]] == ["d"]
    assert pynbd("info", "--size", servers[2].uri).stdout == f"{GiB}\n"


def test_info_human_output(start_qemu_nbd, workdir):
    image = workdir / "disk.raw"
    sparse_image(image, 16 * MiB)
    server = start_qemu_nbd("-r", "-f", "raw", "-D", "a description", str(image))
    out = pynbd("info", server.uri).stdout
    assert out.startswith('protocol: newstyle-fixed without TLS, using structured packets\nexport="":\n')
    for line in ("\texport-size: 16777216 (16M)", "\tdescription: a description", "\t\tbase:allocation",
                 "\tis_read_only: true", "\tcan_multi_conn: false", "\tblock_size_maximum: 33554432"):  # fmt: skip
        assert line + "\n" in out


@pytest.fixture
def qcow2_bitmap_image(workdir):
    image = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 20M 3M", str(image)])
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 512k 128k", "-c", "write -P 0x44 40M 64k", str(image)])
    return image


@pytest.mark.parametrize("context", ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth"])
def test_info_map_matches_nbdinfo(start_qemu_nbd, qcow2_bitmap_image, context):
    server = start_qemu_nbd("-r", "-f", "qcow2", "-A", "-B", "b0", str(qcow2_bitmap_image))
    for extra in ([], ["--totals"], ["--json"], ["--totals", "--json"]):
        ours = pynbd("info", f"--map={context}", *extra, server.uri).stdout
        theirs = run(["nbdinfo", f"--map={context}", *extra, server.uri]).stdout
        if "--json" in extra:
            assert _rounded(ours) == _rounded(theirs), extra
        else:
            assert ours == theirs, extra


def _rounded(text: str) -> list[dict]:
    rows = json.loads(text)
    for row in rows:
        if "percent" in row:
            row["percent"] = round(row["percent"], 3)
    return rows


def test_info_map_accepts_a_server_command_and_reports_errors(workdir):
    out = pynbd("info", "--map", "--", "nbdkit", "data", "1 @1048576 2", "size=4M").stdout
    assert out.splitlines()[0].split() == ["0", "32768", "0", "data"]
    result = pynbd("info", "--map=qemu:dirty-bitmap:nope", "--", "nbdkit", "memory", "1M", check=False)
    assert result.returncode == 1 and "does not support meta context" in result.stderr
    result = pynbd("info", f"nbd+unix:///?socket={workdir}/nothing.sock", check=False)
    assert result.returncode == 1 and result.stderr.startswith("pynbd info: ")


# -- pynbd copy -------------------------------------------------------------------------------------


@pytest.fixture
def source_image(workdir) -> Path:
    path = workdir / "src.raw"
    sparse_image(path, GiB)
    return path


def _roundtrip(server_uri: str, source: Path, backing: Path, out: Path, extra: list[str]) -> None:
    pynbd("copy", *extra, str(source), server_uri)
    pynbd("copy", *extra, server_uri, str(out))
    assert images_equal(source, out)
    assert images_equal(source, backing)
    assert allocated(out) < 16 * MiB, "the copy of a sparse image must stay sparse"
    assert allocated(backing) < 16 * MiB, "the server's image must stay sparse"


def fresh_target(workdir: Path, name: str = "target.raw") -> Path:
    path = workdir / name
    with open(path, "wb") as f:
        f.truncate(GiB)
    return path


def test_copy_roundtrip_through_pynbd(start_pynbd, source_image, workdir):
    backing = fresh_target(workdir)
    server = start_pynbd(str(backing))
    _roundtrip(server.uri, source_image, backing, workdir / "out.raw", ["--connections", "4", "--flush"])


def test_copy_roundtrip_through_qemu_nbd(start_qemu_nbd, source_image, workdir):
    backing = fresh_target(workdir)
    server = start_qemu_nbd("-f", "raw", "-e", "0", "--cache=writeback", str(backing), tcp=True)
    _roundtrip(server.uri, source_image, backing, workdir / "out.raw", ["--requests", "8", "--flush"])


def test_copy_roundtrip_through_nbdkit(start_nbdkit, source_image, workdir):
    backing = fresh_target(workdir)
    server = start_nbdkit("file", str(backing))
    _roundtrip(server.uri, source_image, backing, workdir / "out.raw", ["--request-size", "256k"])


@pytest.mark.skipif(not have("nbd-server"), reason="nbd-server not installed")
def test_copy_roundtrip_through_nbd_server(start_nbd_server, source_image, workdir):
    backing = fresh_target(workdir)
    server = start_nbd_server(backing)
    # no structured replies, so no block status: every block is read, and zero blocks are detected
    # nor write zeroes: the target must be declared zero (it is a fresh sparse file) to stay sparse
    _roundtrip(server.uri, source_image, backing, workdir / "out.raw", ["--flush", "--target-is-zero"])


def test_copy_to_nbdkit_memory_skips_holes_and_stays_sparse(start_nbdkit, source_image, workdir):
    server = start_nbdkit("memory", "1G")
    pynbd("copy", str(source_image), server.uri)
    totals = json.loads(run(["nbdinfo", "--map", "--totals", "--json", server.uri]).stdout)
    data = sum(row["size"] for row in totals if row["type"] == 0)
    assert 0 < data < 16 * MiB
    out = workdir / "out.raw"
    pynbd("copy", server.uri, str(out))
    assert images_equal(source_image, out)


def test_copy_pipes_null_and_progress(start_nbdkit, workdir):
    source = workdir / "small.raw"
    sparse_image(source, 64 * MiB)
    content = source.read_bytes()
    server = start_nbdkit("memory", "64M")
    with open(source, "rb") as stdin:
        subprocess.run([PYNBD, "copy", "-", server.uri], stdin=stdin, check=True)
    out = subprocess.run([PYNBD, "copy", server.uri, "-"], capture_output=True, check=True).stdout
    assert out == content
    read_end, write_end = os.pipe()
    with os.fdopen(read_end) as progress:
        argv = [PYNBD, "copy", "--progress-fd", str(write_end), server.uri, "null:"]
        proc = subprocess.Popen(argv, pass_fds=(write_end,))
        os.close(write_end)
        lines = progress.read().split()
        assert proc.wait(60) == 0
    assert lines[0] == f"0/{64 * MiB}" and lines[-1] == f"{64 * MiB}/{64 * MiB}"
    done = [int(line.split("/")[0]) for line in lines]
    assert done == sorted(done)
    bar = pynbd("copy", "--progress", str(source), "null:").stderr
    assert "100%" in bar


def test_copy_incremental_with_dirty_bitmap(start_qemu_nbd, workdir):
    image = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 32M 4M", str(image)])
    backup = workdir / "backup.raw"
    full = start_qemu_nbd("-r", "-f", "qcow2", str(image))
    pynbd("copy", full.uri, str(backup))
    full.stop()
    run(["qemu-img", "bitmap", "--add", str(image), "b0"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 64k", "-c", "write -z 33M 1M", "-c",
         "write -P 0x44 60M 128k", str(image)])  # fmt: skip
    # a byte the incremental copy must not touch (clean), to show it copies only what is dirty
    with open(backup, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\xee")
    server = start_qemu_nbd("-r", "-f", "qcow2", "-B", "b0", str(image))
    pynbd("copy", "--bitmap", "b0", server.uri, str(backup))
    with open(backup, "r+b") as f:
        f.seek(5 * MiB)
        assert f.read(1) == b"\xee"
        f.seek(5 * MiB)
        f.write(b"\x11")
    converted = workdir / "expected.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(converted)])
    assert images_equal(converted, backup)
    result = pynbd("copy", "--bitmap", "nosuch", server.uri, str(backup), check=False)
    assert result.returncode == 1 and "qemu:dirty-bitmap:nosuch" in result.stderr


def test_copy_refuses_qcow2_files_and_small_targets(start_nbdkit, workdir):
    image = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"])
    result = pynbd("copy", str(image), "null:", check=False)
    assert result.returncode == 1 and "qcow2" in result.stderr
    small = start_nbdkit("memory", "1M")
    big = workdir / "big.raw"
    big.write_bytes(bytes(2 * MiB))
    result = pynbd("copy", str(big), small.uri, check=False)
    assert result.returncode == 1 and "smaller than the source" in result.stderr


def test_copy_with_server_commands(workdir):
    out = workdir / "out.raw"
    pynbd("copy", "--", "[", "nbdkit", "data", "1 2 3 @1048576 4", "size=2M", "]", str(out))
    data = out.read_bytes()
    assert len(data) == 2 * MiB and data[:3] == b"\1\2\3" and data[MiB] == 4 and data.count(0) == 2 * MiB - 4


def test_copy_reports_a_server_command_that_fails(workdir):
    result = pynbd("copy", "--", str(workdir / "none.raw"), "[", "qemu-nbd", "-f", "raw", str(workdir / "no.raw"), "]",
                   check=False)  # fmt: skip
    assert result.returncode == 1
    assert "pynbd copy: " in result.stderr
