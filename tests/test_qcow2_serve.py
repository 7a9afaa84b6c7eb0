"""``pynbd serve`` on qcow2 images: the same answers as qemu-nbd, bitmaps marked by writes and saved
on shutdown, and an image that survives SIGKILL in the middle of writing."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path

import pytest

from pynbd.daemon.open import open_image
from tests.peers import PYNBD, have, nbdinfo_map, read_all, run

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.skipif(not (have("qemu-img") and have("nbdinfo")), reason="needs qemu-img and nbdinfo")

MiB = 1 << 20


def connect(uri: str, *contexts: str):
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    h.connect_uri(uri)
    return h


def test_serve_qcow2_chain_matches_qemu_nbd(workdir: Path, start_pynbd, start_qemu_nbd) -> None:
    """A qemu-made chain with a bitmap: data, base:allocation, allocation depth and the bitmap
    agree between pynbd serve and qemu-nbd."""
    base, top = workdir / "base.qcow2", workdir / "top.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(base), "24M"])
    run(["qemu-io", "-c", "write -P 0x41 0 4M", "-c", "write -z 8M 2M", "-c", "write -P 0x42 12M 64k", str(base)])
    run(["qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top), "32M"])
    run(["qemu-img", "bitmap", "--add", "-g", "16k", str(top), "changes"])
    run(["qemu-io", "-c", "write -P 0x43 1M 100k", "-c", "discard 2M 1M", "-c", "write -P 0x44 30M 4k", str(top)])
    qemu = start_qemu_nbd("-r", "-f", "qcow2", "-A", "-B", "changes", str(top))
    ours = start_pynbd("-r", "-A", "-B", "changes", str(top))
    for context in ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:changes"):
        assert nbdinfo_map(ours.uri, context=context) == nbdinfo_map(qemu.uri, context=context), context
    a, b = connect(ours.uri), connect(qemu.uri)
    try:
        assert read_all(a) == read_all(b)
    finally:
        a.shutdown()
        b.shutdown()


def test_serve_marks_bitmap_and_saves_it_on_shutdown(workdir: Path, start_pynbd, start_qemu_nbd) -> None:
    path = workdir / "disk.qcow2"
    size = 16 * MiB
    run([PYNBD, "img", "create", "-q", "-f", "qcow2", str(path), str(size)])
    run([PYNBD, "img", "bitmap", "--add", "-g", "65536", str(path), "b"])
    server = start_pynbd("-B", "b", str(path))
    h = connect(server.uri, "qemu:dirty-bitmap:b")  # the server opened the image before it answered
    try:
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
        assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
        h.pwrite(b"\x01" * 4096, 3 * 65536 + 100)
        h.zero(10 * 65536, 2 * 65536)
        h.trim(14 * 65536, 65536)
        h.flush()
        # the exported bitmap is live
        entries: list[int] = []
        h.block_status(size, 0, lambda ctx, off, got, err: entries.extend(got) or 0)
    finally:
        h.shutdown()
    dirty = [(65536, 0), (14 * 65536, 1), (size - 15 * 65536, 0)]
    assert list(zip(entries[::2], entries[1::2], strict=True)) == dirty
    assert server.stop(signal.SIGTERM) == 0
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    assert info["format-specific"]["data"]["bitmaps"] == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    assert run(["qemu-img", "check", str(path)], check=False).returncode == 0
    qemu = start_qemu_nbd("-r", "-f", "qcow2", "-B", "b", str(path))
    assert nbdinfo_map(qemu.uri, context="qemu:dirty-bitmap:b") == [
        (0, 65536, 0),
        (65536, 14 * 65536, 1),
        (15 * 65536, size - 15 * 65536, 0),
    ]


def test_sigkill_mid_write_leaves_only_leaks_and_a_fully_dirty_bitmap(workdir: Path, start_pynbd) -> None:
    path = workdir / "disk.qcow2"
    size = 64 * MiB
    half = size // 2
    run([PYNBD, "img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), str(size)])
    run([PYNBD, "img", "bitmap", "--add", str(path), "backup"])
    server = start_pynbd(str(path))
    rng = random.Random(11)
    expected = bytearray(half)
    h = connect(server.uri)
    try:
        # first half: acknowledged and flushed, so it must survive
        for _ in range(150):
            offset = rng.randrange(0, half - 200_000)
            data = rng.randbytes(rng.randrange(1, 200_000))
            h.pwrite(data, offset)
            expected[offset : offset + len(data)] = data
            if rng.random() < 0.2:
                length = rng.randrange(1, 300_000)
                offset = rng.randrange(0, half - length)
                h.zero(length, offset)
                expected[offset : offset + length] = bytes(length)
        h.flush()
        # second half: a burst of writes still in flight when the server dies
        for _ in range(64):
            h.aio_pwrite(rng.randbytes(256 * 1024), half + rng.randrange(0, half - 256 * 1024))
        while h.aio_in_flight() > 48:  # the server is busy writing: some replies are back, most not
            h.poll(-1)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
    finally:
        del h

    result = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    report = json.loads(result.stdout)
    assert result.returncode in (0, 3), result.stdout + result.stderr  # clean, or leaked clusters only
    assert report.get("corruptions", 0) == 0 and report["check-errors"] == 0
    ours = run([PYNBD, "img", "check", str(path)], check=False)
    assert ours.returncode == result.returncode

    async def reopen():
        image = await open_image(str(path), read_only=True)
        node = image.node
        bitmap = node.dirty_bitmaps["backup"].bitmap
        data = bytearray(half)
        await node.read_into(0, memoryview(data))
        found = set(node.bitmaps_found_in_use)
        await image.close()
        return bitmap.count(), data, found

    dirty, data, found_in_use = asyncio.run(reopen())
    assert found_in_use == {"backup"}
    assert dirty == size  # fully dirty: nothing written before the crash can be missed
    assert data == expected
    assert run([PYNBD, "img", "check", "-r", "all", str(path)], check=False).returncode == 0
    assert run(["qemu-img", "check", str(path)], check=False).returncode == 0


def test_a_partly_written_last_cluster_reads_back(workdir: Path, start_pynbd, start_qemu_nbd) -> None:
    """The image file ends inside its last data cluster: reading and mapping that cluster asks the
    file for bytes past its end, which read as zeroes (as in qemu), not as an error."""
    image = workdir / "tail.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    server = start_pynbd(str(image))
    h = nbd.NBD()
    h.connect_uri(server.uri)
    h.pwrite(b"x" * 4096, 3 << 20)
    assert h.pread(1 << 20, 3 << 20) == b"x" * 4096 + bytes((1 << 20) - 4096)
    h.shutdown()
    server.stop()
    run(["qemu-img", "check", str(image)])
    reference = start_qemu_nbd("-r", "-f", "qcow2", str(image))
    assert nbdinfo_map(reference.uri)[-2:] == nbdinfo_map(start_pynbd("-r", str(image)).uri)[-2:]
