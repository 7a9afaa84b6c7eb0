"""`pynbd serve` driven by the installed real NBD clients (issue 2).

Every test serves a sparse raw image whose layout is known (4 KiB-aligned random data, holes
elsewhere) and checks what the client sees against the file's truth: the bytes in the file and
its SEEK_DATA/SEEK_HOLE layout (``tests.peers.file_extents``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import random
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from tests.peers import (
    BLOCK,
    DATA,
    HOLE_ZERO,
    PYNBD,
    data_ranges_of,
    file_extents,
    make_sparse_image,
    merge_abs_extents,
    nbd_block_status,
    nbdinfo_map,
    read_all,
    run,
)

KiB, MiB = 1024, 1024 * 1024
SIZE = 16 * MiB
# Data runs of different sizes: one block, neighbours separated by one hole block, a long run,
# an unaligned-to-MiB run, and data up to the very end.
LAYOUT = [
    (0, BLOCK),
    (64 * KiB, 192 * KiB),
    (1 * MiB, BLOCK),
    (1 * MiB + 2 * BLOCK, BLOCK),
    (3 * MiB, 1 * MiB),
    (8 * MiB + BLOCK, 60 * KiB),
    (SIZE - 128 * KiB, 128 * KiB),
]


@pytest.fixture
def image(workdir: Path) -> tuple[Path, bytearray]:
    """A 16 MiB sparse image with LAYOUT's data; returns its path and expected content."""
    path = workdir / "disk.raw"
    content = make_sparse_image(path, SIZE, LAYOUT, seed=2)
    # The test's premise: the filesystem keeps exactly this layout (ext4/xfs/btrfs with 4 KiB blocks).
    assert data_ranges_of(file_extents(path)) == merged_ranges(LAYOUT)
    return path, content


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(o, n) for o, n, _ in merge_abs_extents((o, n, DATA) for o, n in sorted(ranges))]


def flags_over(extents, offset: int, length: int) -> set[int]:
    """The set of flags of every extent overlapping ``[offset, offset+length)``."""
    return {flags for start, n, flags in extents if start < offset + length and offset < start + n}


def connect(uri: str, meta: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


SLACK = 2 * BLOCK  # extent-tree blocks the filesystem may add or drop when a run is split


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- libnbd ------------------------------------------------------------------------------------------


def test_libnbd_commands_match_the_file(start_pynbd, image):
    path, content = image
    server = start_pynbd(str(path))
    h = connect(server.uri)
    assert h.get_size() == SIZE
    assert read_all(h) == content
    assert nbd_block_status(h) == file_extents(path)

    rng = random.Random(3)
    writes = [(2 * MiB, 64 * KiB, 0), (5 * MiB + 512, 3000, nbd.CMD_FLAG_FUA), (SIZE - 4096, 4096, 0)]
    for offset, length, flags in writes:
        data = rng.randbytes(length)
        h.pwrite(data, offset, flags)
        content[offset : offset + length] = data
    h.zero(128 * KiB, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(64 * KiB, 3 * MiB + 256 * KiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    h.trim(64 * KiB, 3 * MiB + 512 * KiB, nbd.CMD_FLAG_FUA)
    for offset, length in [(3 * MiB, 128 * KiB), (3 * MiB + 256 * KiB, 64 * KiB), (3 * MiB + 512 * KiB, 64 * KiB)]:
        content[offset : offset + length] = bytes(length)
    h.flush()
    h.cache(4 * MiB, 2 * MiB)
    assert h.pread(3000, 5 * MiB + 512) == content[5 * MiB + 512 : 5 * MiB + 3512]
    assert read_all(h) == content
    truth = file_extents(path)
    assert nbd_block_status(h) == truth
    assert flags_over(truth, 2 * MiB, 64 * KiB) == {DATA}
    assert flags_over(truth, 3 * MiB, 128 * KiB) == {HOLE_ZERO}  # zero without NO_HOLE punched
    assert flags_over(truth, 3 * MiB + 512 * KiB, 64 * KiB) == {HOLE_ZERO}  # trim punched
    h.shutdown()
    assert path.read_bytes() == content


def test_trim_and_zero_punch_holes_unless_no_hole(start_pynbd, image):
    """Zeroing without NO_HOLE and trimming free the blocks (the next block status and the file
    say HOLE|ZERO); zeroing with NO_HOLE keeps the storage allocated.

    On ext4 a NO_HOLE zero becomes an *unwritten* extent (FALLOC_FL_ZERO_RANGE, as qemu-nbd and
    nbdkit do too), which stays allocated (st_blocks) but which SEEK_HOLE reports as a hole, so
    block status there follows the file's SEEK layout, whatever that is.
    """
    path, content = image
    server = start_pynbd(str(path))
    h = connect(server.uri)
    base = 3 * MiB  # a 1 MiB data run

    before = allocated_bytes(path)
    h.zero(256 * KiB, base, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    # (>=: splitting the file's extent may cost the filesystem a metadata block)
    assert allocated_bytes(path) >= before, "WRITE_ZEROES with NO_HOLE deallocated storage"
    assert h.pread(256 * KiB, base) == bytes(256 * KiB)
    assert nbd_block_status(h) == file_extents(path)

    h.zero(256 * KiB, base + 256 * KiB)
    h.flush()
    after_zero = allocated_bytes(path)
    assert before - after_zero >= 256 * KiB - SLACK
    assert flags_over(nbd_block_status(h, base + 256 * KiB, 256 * KiB), 0, SIZE) == {HOLE_ZERO}

    h.trim(256 * KiB, base + 512 * KiB)
    h.flush()
    assert after_zero - allocated_bytes(path) >= 256 * KiB - SLACK
    status = nbd_block_status(h)
    assert status == file_extents(path)
    assert flags_over(status, base + 256 * KiB, 512 * KiB) == {HOLE_ZERO}
    assert flags_over(status, base + 768 * KiB, 256 * KiB) == {DATA}
    h.shutdown()
    content[base : base + 768 * KiB] = bytes(768 * KiB)
    assert path.read_bytes() == content


def test_libnbd_block_status_and_structured_reads(start_pynbd, image):
    path, content = image
    server = start_pynbd(str(path))
    h = connect(server.uri)
    truth = file_extents(path)
    assert nbd_block_status(h) == truth
    assert nbd_block_status(h, req_one=True) == truth

    # The whole range is answered in one reply, already merged.
    replies = []
    h.block_status(SIZE, 0, lambda ctx, off, entries, err: replies.append(entries) or 0)
    assert len(replies) == 1
    entries = replies[0]
    assert [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)] == [(n, f) for _, n, f in truth]

    # Starting inside an extent, REQ_ONE gives exactly one extent of that state, within the request.
    for offset, length, flags in truth:
        probe = offset + length // 2 // BLOCK * BLOCK
        replies.clear()
        h.block_status(SIZE - probe, probe, lambda ctx, off, e, err: replies.append(e) or 0, nbd.CMD_FLAG_REQ_ONE)
        assert replies == [[offset + length - probe, flags]]

    # A request inside one run is clamped to the request.
    assert nbd_block_status(h, 3 * MiB + BLOCK, 2 * BLOCK) == [(3 * MiB + BLOCK, 2 * BLOCK, DATA)]

    # A structured read reports holes as holes and data as data, covering the range exactly.
    chunks = []

    def chunk(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status, bytes(subbuf)))
        return 0

    span = 1 * MiB + 4 * BLOCK
    data = h.pread_structured(span, 0, chunk)
    assert data == content[:span]
    chunks.sort()
    assert sum(n for _, n, _, _ in chunks) == span
    for offset, length, status, payload in chunks:
        want = nbd.READ_HOLE if flags_over(truth, offset, length) == {HOLE_ZERO} else nbd.READ_DATA
        assert status == want, (offset, length, status)
        if status == nbd.READ_DATA:
            assert payload == content[offset : offset + length]
    assert {s for *_, s, _ in chunks} == {nbd.READ_HOLE, nbd.READ_DATA}
    h.shutdown()


def test_libnbd_pipelined_aio_replies_out_of_order(start_pynbd, image):
    """Many requests in flight at once; the server answers each as soon as it is done, so cheap
    reads of holes overtake slow FUA writes submitted before them."""
    path, content = image
    server = start_pynbd(str(path))
    h = connect(server.uri)
    rng = random.Random(4)
    out_of_order = False
    for round_ in range(5):
        completed: list[int] = []
        reads: dict[int, tuple[nbd.Buffer, int, int]] = {}

        def done(index: int, completed: list[int] = completed):
            def callback(err) -> int:
                assert err.value == 0, f"request {index} failed with errno {err.value}"
                completed.append(index)
                return 1

            return callback

        index = 0
        for i in range(4):  # slow: 1 MiB writes with FUA (fdatasync each)
            offset = (10 + i) * MiB
            data = rng.randbytes(MiB)
            content[offset : offset + MiB] = data
            h.aio_pwrite(data, offset, done(index), nbd.CMD_FLAG_FUA)
            index += 1
        for _ in range(24):  # fast: reads of holes and small data, a zero, a flush
            offset = rng.choice([6 * MiB, 7 * MiB, 0, 1 * MiB, 64 * KiB]) + rng.randrange(16) * 512
            buf = nbd.Buffer(4096)
            reads[index] = (buf, offset, 4096)
            h.aio_pread(buf, offset, done(index))
            index += 1
        h.aio_zero(BLOCK, 6 * MiB + BLOCK * round_, done(index))
        index += 1
        h.aio_flush(done(index))
        index += 1
        assert h.aio_in_flight() > 1  # truly pipelined
        while h.aio_in_flight():
            h.poll(-1)
        assert sorted(completed) == list(range(index))
        for buf, offset, length in reads.values():
            assert buf.to_bytearray() == content[offset : offset + length]
        if completed != sorted(completed):
            out_of_order = True
            break
    assert out_of_order, "every reply came back in submission order"
    assert read_all(h) == content
    h.shutdown()
    assert path.read_bytes() == content


def test_libnbd_flags_block_size_and_multi_conn(start_pynbd, image):
    path, content = image
    server = start_pynbd(str(path))
    h = connect(server.uri)
    assert not h.is_read_only()
    for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df"):
        assert getattr(h, can)(), can
    assert h.can_multi_conn()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_structured_replies_negotiated()
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert 4 * MiB <= h.get_block_size(nbd.SIZE_MAXIMUM) <= 8 * MiB
    # Multi-conn: a write flushed on one connection is visible on another.
    other = connect(server.uri)
    h.pwrite(b"\xa5" * 4096, 5 * MiB)
    h.flush()
    assert other.pread(4096, 5 * MiB) == b"\xa5" * 4096
    other.shutdown()
    h.shutdown()


def test_libnbd_opt_mode(start_pynbd, image):
    path, _ = image
    server = start_pynbd(str(path), "--description", "test disk", export="disk1")
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(server.uri)
    assert h.aio_is_negotiating()

    exports = []
    assert h.opt_list(lambda name, desc: exports.append((name, desc)) or 0) == 1
    assert exports == [("disk1", "test disk")]

    h.set_export_name("disk1")
    h.opt_info()
    assert h.get_size() == SIZE
    assert h.get_export_description() == "test disk"
    assert h.get_canonical_export_name() == "disk1"
    assert h.can_multi_conn()

    def listed() -> list[str]:
        names: list[str] = []
        h.opt_list_meta_context(lambda name: names.append(name) or 0)
        return names

    assert listed() == ["base:allocation"]  # no queries: everything
    h.add_meta_context("base:")
    assert listed() == ["base:allocation"]  # namespace wildcard
    h.clear_meta_contexts()
    h.add_meta_context("nosuch:thing")
    assert listed() == []  # unknown namespace: nothing, and no error
    h.clear_meta_contexts()

    h.set_export_name("nosuch")
    with pytest.raises(nbd.Error) as exc:
        h.opt_info()
    assert exc.value.errnum == errno.ENOENT  # NBD_REP_ERR_UNKNOWN
    assert h.aio_is_negotiating()  # an error reply leaves negotiation going

    h.set_export_name("disk1")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    assert h.aio_is_ready()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert nbd_block_status(h) == file_extents(path)
    h.shutdown()


def test_unknown_export_name_is_refused(start_pynbd, image):
    path, content = image
    server = start_pynbd(str(path), export="disk1")
    h = nbd.NBD()
    with pytest.raises(nbd.Error) as exc:
        h.connect_uri(f"nbd+unix:///nosuch?socket={server.socket_path}")
    assert exc.value.errnum == errno.ENOENT  # NBD_REP_ERR_UNKNOWN
    assert "no export named 'nosuch'" in exc.value.string
    h = connect(server.uri)  # the server carries on
    assert h.pread(BLOCK, 0) == content[:BLOCK]
    h.shutdown()


# -- nbdinfo ---------------------------------------------------------------------------------------


def test_nbdinfo_plain_list_and_json(start_pynbd, image):
    path, _ = image
    server = start_pynbd(str(path), "--description", "the test disk", export="disk1")

    plain = run(["nbdinfo", server.uri]).stdout
    assert 'export="disk1":' in plain
    assert "description: the test disk" in plain
    assert f"export-size: {SIZE}" in plain
    assert "can_multi_conn: true" in plain and "is_read_only: false" in plain
    assert "base:allocation" in plain

    listing = run(["nbdinfo", "--list", server.uri]).stdout
    assert 'export="disk1":' in listing and "description: the test disk" in listing

    info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True and info["TLS"] is False
    (export,) = info["exports"]
    assert export["export-name"] == "disk1"
    assert export["description"] == "the test disk"
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is False
    assert export["contexts"] == ["base:allocation"]
    for flag in ("can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn", "can_trim"):
        assert export[flag] is True, flag
    assert export["block_size_minimum"] == 1 and export["block_size_preferred"] == 4096

    listed = json.loads(run(["nbdinfo", "--list", "--json", server.uri]).stdout)
    assert [(e["export-name"], e["description"], e["export-size"]) for e in listed["exports"]] == [
        ("disk1", "the test disk", SIZE)
    ]


def test_nbdinfo_map_and_totals(start_pynbd, image):
    path, _ = image
    server = start_pynbd(str(path))
    truth = file_extents(path)
    assert nbdinfo_map(server.uri) == truth

    text = run(["nbdinfo", "--map", server.uri]).stdout
    parsed = [(int(o), int(n), int(t)) for o, n, t, _ in (line.split(None, 3) for line in text.splitlines())]
    assert merge_abs_extents(parsed) == truth

    totals = {}
    for line in run(["nbdinfo", "--map", "--totals", server.uri]).stdout.splitlines():
        size, _percent, flags, _desc = line.split(None, 3)
        totals[int(flags)] = int(size)
    data = sum(n for _, n in LAYOUT)
    assert totals == {DATA: data, HOLE_ZERO: SIZE - data}
    as_json = json.loads(run(["nbdinfo", "--map", "--totals", "--json", server.uri]).stdout)
    assert {e["type"]: e["size"] for e in as_json} == totals


# -- nbdcopy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [["--connections=1"], ["--connections=4", "--threads=4"]], ids=["C1", "C4"])
def test_nbdcopy_both_directions(start_pynbd, image, workdir, options):
    path, content = image
    source = start_pynbd(str(path), "--read-only")
    out = workdir / "out.raw"
    run(["nbdcopy", *options, source.uri, str(out)])
    assert out.read_bytes() == content
    assert file_extents(out) == file_extents(path)  # holes were skipped, not copied as zeroes

    # Into a fresh sparse file that already has some data where the source has holes.
    target = workdir / "target.raw"
    make_sparse_image(target, SIZE, [(2 * MiB, 256 * KiB), (9 * MiB, BLOCK)], seed=9)
    sink = start_pynbd(str(target))
    run(["nbdcopy", *options, str(path), sink.uri])
    sink.stop()
    assert target.read_bytes() == content
    assert file_extents(target) == file_extents(path)  # the target stays sparse
    assert allocated_bytes(target) <= allocated_bytes(path) + SLACK


# -- nbdsh -----------------------------------------------------------------------------------------


def test_nbdsh_script(start_pynbd, image):
    path, content = image
    server = start_pynbd(str(path))
    script = [
        f"assert h.get_size() == {SIZE}",
        "h.pwrite(b'nbdsh!' * 100, 1000)",
        "h.flush()",
        "print(h.pread(600, 1000).decode())",
        "print(h.pread(16, 64 * 1024).hex())",
        "h.zero(4096, 0)",
        "assert h.pread(4096, 0) == bytes(4096)",
    ]
    out = run(["nbdsh", "-u", server.uri, *[a for line in script for a in ("-c", line)]]).stdout.splitlines()
    assert out == ["nbdsh!" * 100, content[64 * KiB : 64 * KiB + 16].hex()]
    content[1000:1600] = b"nbdsh!" * 100
    content[0:4096] = bytes(4096)
    server.stop()
    assert path.read_bytes() == content


# -- qemu ------------------------------------------------------------------------------------------


def qemu_map(uri: str) -> list[tuple[int, int, int]]:
    """``qemu-img map --output=json`` as base:allocation extents."""
    entries = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    out = []
    for e in entries:
        assert e["present"]
        out.append((e["start"], e["length"], DATA if e["data"] else (HOLE_ZERO if e["zero"] else 1)))
    return merge_abs_extents(out)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_img_convert_compare_map(start_pynbd, image, workdir, tcp):
    path, content = image
    server = start_pynbd(str(path), tcp=tcp)
    assert server.uri.startswith("nbd://127.0.0.1:" if tcp else "nbd+unix:///")
    assert qemu_map(server.uri) == file_extents(path)

    out = workdir / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(out)])
    assert out.read_bytes() == content
    assert run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), server.uri]).returncode == 0

    # Into pynbd: a fresh sparse target, written by qemu (WRITE, WRITE_ZEROES may-trim, FLUSH).
    target = workdir / "target.raw"
    make_sparse_image(target, SIZE, [(5 * MiB, 128 * KiB)], seed=5)
    sink = start_pynbd(str(target), tcp=tcp)
    differ = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), sink.uri], check=False)
    assert differ.returncode == 1, differ.stdout + differ.stderr
    # -U: the first server still has ``path`` open read-write, and convert's source would unshare
    # write (locked out, as under qemu-nbd)
    run(["qemu-img", "convert", "-U", "-n", "-f", "raw", "-O", "raw", str(path), sink.uri])
    assert run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), sink.uri]).returncode == 0
    assert qemu_map(sink.uri) == file_extents(target)
    sink.stop()
    assert target.read_bytes() == content
    assert file_extents(target) == file_extents(path)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_io_commands(start_pynbd, image, tcp):
    path, content = image
    server = start_pynbd(str(path), tcp=tcp)
    base = 3 * MiB  # a 1 MiB data run
    commands = [
        "write -P 0x11 2M 64k",  # into a hole
        "read -P 0x11 2M 64k",
        f"write -z {base} 64k",  # WRITE_ZEROES with NO_HOLE
        f"write -z -u {base + 64 * KiB} 64k",  # WRITE_ZEROES, may trim
        f"discard {base + 128 * KiB} 64k",  # TRIM
        "flush",
        f"write -f -P 0x22 {base + 192 * KiB} 4k",  # FUA
        f"read -P 0 {base} 192k",
        f"read -P 0x22 {base + 192 * KiB} 4k",
        "aio_write -P 0x33 6M 8k",
        "aio_flush",
        "read -P 0x33 6M 8k",
    ]
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for command in commands:
        args += ["-c", command]
    result = run([*args, server.uri])
    assert "fail" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
    content[2 * MiB : 2 * MiB + 64 * KiB] = b"\x11" * (64 * KiB)
    content[base : base + 192 * KiB] = bytes(192 * KiB)
    content[base + 192 * KiB : base + 196 * KiB] = b"\x22" * 4096
    content[6 * MiB : 6 * MiB + 8 * KiB] = b"\x33" * 8192
    # A wrong pattern must be noticed, or the checks above prove nothing.
    bad = run(["qemu-io", "-f", "raw", "-c", "read -P 0x44 2M 4k", server.uri], check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr

    truth = file_extents(path)
    assert flags_over(truth, base + 64 * KiB, 128 * KiB) == {HOLE_ZERO}  # -z -u and discard punched
    assert flags_over(truth, 2 * MiB, 64 * KiB) == {DATA}
    h = connect(server.uri)
    assert nbd_block_status(h) == truth
    h.shutdown()
    server.stop()
    assert path.read_bytes() == content


# -- fio -------------------------------------------------------------------------------------------


def test_fio_randwrite_verify(start_pynbd, workdir):
    path = workdir / "fio.raw"
    make_sparse_image(path, 8 * MiB, [])
    server = start_pynbd(str(path))
    args = ["fio", "--name=randwrite", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite", "--bs=4k"]
    args += ["--size=4M", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0"]
    out = run([*args, "--output-format=json"], cwd=workdir).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]  # fio prints "connected to NBD server" first
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 4 * MiB
    assert job["read"]["io_bytes"] == 4 * MiB  # the verify pass read everything back


# -- socket activation by the clients ----------------------------------------------------------------


def test_clients_start_pynbd_with_socket_activation(image, workdir):
    path, content = image
    info = json.loads(run(["nbdinfo", "--json", "--", "[", PYNBD, "serve", str(path), "]"]).stdout)
    assert info["exports"][0]["export-size"] == SIZE
    entries = json.loads(run(["nbdinfo", "--map", "--json", "--", "[", PYNBD, "serve", str(path), "]"]).stdout)
    assert merge_abs_extents((e["offset"], e["length"], e["type"]) for e in entries) == file_extents(path)

    out = workdir / "out.raw"
    run(["nbdcopy", "--", "[", PYNBD, "serve", "--read-only", str(path), "]", str(out)])
    assert out.read_bytes() == content


# -- server options --------------------------------------------------------------------------------

IN_CREATE, IN_MOVED_TO = 0x100, 0x80
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait until ``path`` exists, or fail as soon as ``proc`` exits.

    The pid file is the server's documented readiness signal (it is written after the socket
    listens, as with qemu-nbd --pid-file and nbdkit -P). Instead of polling with sleeps we let
    the kernel tell us: inotify reports the pid file's creation in its directory, and EOF on
    the server's stderr pipe reports its death; select() waits for either. ``timeout`` only
    bounds a hung server, it is not what the test synchronises on.
    """
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert _libc.inotify_add_watch(fd, str(path.parent).encode(), IN_CREATE | IN_MOVED_TO) >= 0
        deadline = time.monotonic() + timeout
        while not path.exists():  # checked after the watch exists, so no event can be missed
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{path} did not appear within {timeout}s"
            readable, _, _ = select.select([fd, proc.stderr], [], [], remaining)
            if proc.stderr in readable and not os.read(proc.stderr.fileno(), 65536):
                proc.wait()
                raise AssertionError(f"server exited with {proc.returncode} before writing {path}")
            if fd in readable:
                os.read(fd, 65536)
    finally:
        os.close(fd)


def start_listening_pynbd(workdir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """``pynbd serve`` listening by itself (no socket activation); returns once its pid file exists."""
    pid_file = workdir / "pynbd.pid"
    proc = subprocess.Popen(
        [PYNBD, "serve", "--pid-file", str(pid_file), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_file(pid_file, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    assert pid_file.read_text().strip() == str(proc.pid)
    return proc, pid_file


def stop_and_check_clean_exit(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    return stderr.decode()


def test_socket_option_with_pid_file(image, workdir):
    path, content = image
    sock = workdir / "listen.sock"
    proc, pid_file = start_listening_pynbd(workdir, "--socket", str(sock), str(path))
    try:
        h = connect(f"nbd+unix:///?socket={sock}")
        assert read_all(h) == content
        h.shutdown()
    finally:
        stop_and_check_clean_exit(proc)
    assert not pid_file.exists() and not sock.exists()  # cleaned up on exit


def test_bind_and_port_with_pid_file(image, workdir):
    path, content = image
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # free again for the server (a tiny window another process could steal it in)
    proc, pid_file = start_listening_pynbd(workdir, "--bind", "127.0.0.1", "--port", str(port), str(path))
    try:
        h = connect(f"nbd://127.0.0.1:{port}/")
        assert h.pread(256 * KiB, 0) == content[: 256 * KiB]
        h.shutdown()
        assert run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"]).stdout.strip() == str(SIZE)
    finally:
        stop_and_check_clean_exit(proc)
    assert not pid_file.exists()


def test_once_exits_after_the_first_client(start_pynbd, image):
    path, content = image
    server = start_pynbd(str(path), "--once")
    h = connect(server.uri)
    h.pwrite(b"once" * 1024, 0)
    assert server.proc.poll() is None  # still serving while the client is there
    h.shutdown()
    assert server.proc.wait(timeout=30) == 0
    assert path.read_bytes()[:4096] == b"once" * 1024


def test_read_only(start_pynbd, image):
    path, content = image
    server = start_pynbd(str(path), "--read-only")
    info = json.loads(run(["nbdinfo", "--json", server.uri]).stdout)["exports"][0]
    assert info["is_read_only"] is True
    assert info["can_trim"] is False and info["can_zero"] is False
    h = connect(server.uri)
    assert h.is_read_only() and not h.can_trim() and not h.can_zero()
    h.set_strict_mode(0)  # send the writes anyway: the server itself must refuse them
    for attempt in (
        lambda: h.pwrite(b"x" * 4096, 0),
        lambda: h.zero(4096, 0),
        lambda: h.trim(4096, 0),
        lambda: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA),
    ):
        with pytest.raises(nbd.Error) as exc:
            attempt()
        assert exc.value.errnum == errno.EPERM
    assert h.pread(4096, 0) == content[:4096]  # still usable for reads
    assert nbd_block_status(h) == file_extents(path)
    h.flush()
    h.shutdown()
    assert path.read_bytes() == content


def test_shared_one_serves_one_client_at_a_time(start_pynbd, image):
    path, content = image
    server = start_pynbd(str(path), "--shared", "1")
    first = connect(server.uri)
    second = nbd.NBD()
    second.aio_connect_uri(server.uri)
    first.pwrite(b"first" * 800, 0)
    assert first.pread(4000, 0) == b"first" * 800  # the server is busy with the first client...
    second.poll(200)  # ...and gives the second nothing: a negative check needs some bound
    assert second.aio_is_connecting()
    first.shutdown()
    deadline = time.monotonic() + 30
    while second.aio_is_connecting():
        assert time.monotonic() < deadline, "second client never served"
        second.poll(1000)
    assert second.aio_is_ready()
    assert second.pread(4000, 0) == b"first" * 800
    second.shutdown()


def test_sigterm_finishes_acknowledged_writes(start_pynbd, workdir):
    """Pipelined FUA writes keep the server busy in fdatasync, so when the first is acknowledged
    others are in flight; SIGTERM then lets those finish (and answers them) before exiting."""
    path = workdir / "sigterm.raw"
    make_sparse_image(path, 32 * MiB, [])
    server = start_pynbd(str(path))
    h = connect(server.uri)
    rng = random.Random(7)
    writes = [(i * MiB, rng.randbytes(256 * KiB)) for i in range(32)]
    acked: list[int] = []
    failed: list[int] = []

    def done(index: int):
        def callback(err) -> int:
            (failed if err.value else acked).append(index)
            return 1

        return callback

    for i, (offset, data) in enumerate(writes):
        h.aio_pwrite(data, offset, done(i), nbd.CMD_FLAG_FUA)
    while not acked:
        h.poll(-1)
    acked_before_signal = list(acked)
    server.proc.send_signal(signal.SIGTERM)
    try:
        while h.aio_in_flight() and not h.aio_is_dead():
            h.poll(1000)
    except nbd.Error:
        pass  # the server closed the connection: requests it never read fail
    assert server.proc.wait(timeout=30) == 0, server.log()
    assert "Traceback" not in server.log()
    data = path.read_bytes()
    for i in acked:
        offset, payload = writes[i]
        assert data[offset : offset + len(payload)] == payload, f"acknowledged write {i} lost"
    assert len(acked) > len(acked_before_signal), "no write in flight at SIGTERM was completed"
    assert set(acked) | set(failed) <= set(range(len(writes)))
