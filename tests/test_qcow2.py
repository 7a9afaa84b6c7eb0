"""The qcow2 driver against qemu's own tools: images written by pynbd must pass ``qemu-img check``
and read identically through qemu; images written by qemu must read identically through pynbd."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from pynbd.daemon.open import open_image
from pynbd.qcow2.create import CreateOptions, create_qcow2
from pynbd.qcow2.node import Qcow2Node
from tests.peers import PYNBD, have, run

pytestmark = pytest.mark.skipif(not have("qemu-img"), reason="needs qemu-img")

MiB = 1 << 20


async def read_all(node, chunk: int = 4 * MiB) -> bytes:
    out = bytearray(node.size)
    for off in range(0, node.size, chunk):
        await node.read_into(off, memoryview(out)[off : off + chunk])
    return bytes(out)


async def random_workload(node, size: int, ops: int, seed: int, max_len: int = 300_000) -> bytearray:
    """Random writes, zeroes and discards through the node; returns what the disk must read as."""
    rng = random.Random(seed)
    ref = bytearray(await read_all(node))
    cs = node.cluster_size
    for i in range(ops):
        off = rng.randrange(0, size - 1)
        length = rng.randrange(1, min(max_len, size - off) + 1)
        op = rng.random()
        if op < 0.65:
            data = rng.randbytes(length)
            await node.write(off, data)
            ref[off : off + length] = data
        elif op < 0.85:
            await node.write_zeroes(off, length, may_trim=rng.random() < 0.5)
            ref[off : off + length] = bytes(length)
        else:
            await node.discard(off, length)
            first = (off + cs - 1) // cs * cs
            end = off + length
            last = size if end == size else end // cs * cs
            if first < last:
                ref[first:last] = bytes(last - first)
        if i % 40 == 39:
            await node.flush()
    return ref


def qemu_check(path: Path) -> dict:
    result = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    assert result.returncode == 0, f"qemu-img check failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


def qemu_read(path: Path, fmt: str = "qcow2") -> bytes:
    """The disk as qemu reads it (qemu-img convert to raw)."""
    out = path.with_suffix(".qemu-read.raw")
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
def test_random_workload_passes_qemu_check(workdir: Path, cluster_size: int) -> None:
    path = workdir / "disk.qcow2"
    size = 48 * MiB
    create_qcow2(str(path), size, CreateOptions(cluster_size=cluster_size))

    async def go() -> bytearray:
        image = await open_image(str(path), read_only=False)
        node = image.node
        assert isinstance(node, Qcow2Node)
        ref = await random_workload(node, size, 250, seed=cluster_size)
        assert await read_all(node) == ref
        await image.close()
        return ref

    ref = asyncio.run(go())
    qemu_check(path)
    assert qemu_read(path) == bytes(ref)
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    assert info["cluster-size"] == cluster_size and info["virtual-size"] == size


def test_backing_chain_made_by_qemu(workdir: Path) -> None:
    """raw <- qcow2 <- qcow2, each layer written by qemu-io; pynbd reads what qemu reads, and its
    block status and allocation depth follow the layers."""
    base, mid, top = workdir / "base.raw", workdir / "mid.qcow2", workdir / "top.qcow2"
    run(["qemu-img", "create", "-f", "raw", str(base), "8M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 2M", str(base)])
    run(["qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "raw", str(mid), "12M"])
    run(["qemu-io", "-c", "write -P 0x22 1M 1M", "-c", "write -z 6M 1M", str(mid)])
    run(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", mid.name, "-F", "qcow2", str(top)])
    run(["qemu-io", "-c", "write -P 0x33 1536k 4k", "-c", "discard 0 64k", "-c", "write -P 0x44 10M 8k", str(top)])
    expected = qemu_read(top)

    async def go():
        image = await open_image(str(top), read_only=True)
        node = image.node
        data = await read_all(node)
        status = await node.block_status(0, node.size)
        depth = await node.allocation_depth(0, node.size)
        await image.close()
        return data, status, depth

    data, status, depth = asyncio.run(go())
    assert data == expected
    # discard 0..64k in top (v3) is a zero cluster run; 64k..2M data from base and mid
    assert status[0] == (64 * 1024, 3)
    offset = 0
    depth_at = {}
    for length, d in depth:
        depth_at[offset] = d
        for probe in (0, 1536 * 1024, 1 * MiB, 3 * MiB, 6 * MiB, 9 * MiB, 10 * MiB):
            if offset <= probe < offset + length:
                depth_at[probe] = d
        offset += length
    assert offset == 12 * MiB
    assert depth_at[0] == 1  # zero cluster written by the discard
    assert depth_at[1536 * 1024] == 1
    assert depth_at[1 * MiB] == 2
    assert depth_at[3 * MiB] == 3  # raw base: allocated everywhere it exists
    assert depth_at[6 * MiB] == 2  # zero clusters in mid
    assert depth_at[9 * MiB] == 3  # past the end of the 8 MiB base: qemu counts it as the base's zeroes
    assert depth_at[10 * MiB] == 1


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_clusters_from_qemu(workdir: Path, compression: str) -> None:
    src, packed = workdir / "src.raw", workdir / "packed.qcow2"
    rng = random.Random(7)
    content = bytearray(6 * MiB)
    for off in range(0, len(content), 192 * 1024):
        content[off : off + 100_000] = bytes([rng.randrange(256)]) * 50_000 + rng.randbytes(50_000)
    src.write_bytes(content)
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}", str(src), str(packed)])
    qemu_map = json.loads(run(["qemu-img", "map", "--output=json", str(packed)]).stdout)
    assert any(e["data"] for e in qemu_map)

    async def go():
        image = await open_image(str(packed), read_only=False)
        node = image.node
        data = await read_all(node)
        # partial overwrite of a compressed cluster: copy-on-write keeps the rest of it
        await node.write(65536 + 100, b"\xee" * 1000)
        await image.close()
        return data

    assert asyncio.run(go()) == bytes(content)
    content[65536 + 100 : 65536 + 1100] = b"\xee" * 1000
    qemu_check(packed)
    assert qemu_read(packed) == bytes(content)


def test_qcow2_v2_image_from_qemu(workdir: Path) -> None:
    """compat=0.10 has no zero flag: zeroing must write real zeroes and discard must unmap."""
    path = workdir / "old.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", str(path), "4M"])
    run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(path)])

    async def go():
        image = await open_image(str(path), read_only=False)
        node = image.node
        assert node.header.version == 2
        await node.write_zeroes(4096, 8192)
        await node.discard(512 * 1024, 128 * 1024)
        await node.write(3 * MiB, b"\x01" * 70000)
        data = await read_all(node)
        await image.close()
        return data

    data = asyncio.run(go())
    qemu_check(path)
    assert qemu_read(path) == data
    assert data[4096 : 4096 + 8192] == bytes(8192)
    assert data[:4096] == b"\x5a" * 4096


@pytest.mark.parametrize("with_backing", [False, True])
def test_concurrent_disjoint_writes_into_the_same_clusters(workdir: Path, with_backing: bool) -> None:
    """Many requests in flight at once, each writing its own piece of a few clusters (some new, some
    copied up from a backing file): none may undo another's bytes."""
    path, base = workdir / "top.qcow2", workdir / "base.raw"
    size = 4 * MiB
    expected = bytearray(size)
    backing = None
    if with_backing:
        expected[:] = random.Random(1).randbytes(size)
        base.write_bytes(expected)
        backing = base.name
    create_qcow2(str(path), size, CreateOptions(cluster_size=65536), backing, "raw" if backing else None)
    rng = random.Random(2)
    pieces = [(off, rng.randbytes(512)) for off in range(0, 16 * 65536, 512) if rng.random() < 0.6]
    rng.shuffle(pieces)

    async def go() -> bytes:
        image = await open_image(str(path), read_only=False)
        node = image.node
        for _round in range(2):  # first into unallocated clusters, then overwriting in place
            await asyncio.gather(*(node.write(off, data) for off, data in pieces))
            await node.flush()
        data = await read_all(node)
        await image.close()
        return data

    for off, data in pieces:
        expected[off : off + 512] = data
    assert asyncio.run(go()) == bytes(expected)
    qemu_check(path)
    assert qemu_read(path) == bytes(expected)


def test_extended_l2_images_read_as_qemu_reads_them(workdir: Path) -> None:
    """Subclusters (extended L2 entries): partly allocated, zero and unallocated subclusters over a
    backing file, plus compressed clusters, read and map exactly as qemu; writing is refused."""
    base, top, packed = workdir / "base.raw", workdir / "top.qcow2", workdir / "packed.qcow2"
    run(["qemu-img", "create", "-q", "-f", "raw", str(base), "8M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 8M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", base.name, "-F", "raw", str(top)])
    run(
        ["qemu-io", "-c", "write -P 0x22 2k 4k", "-c", "write -z 100k 10k", "-c", "write -P 0x33 1M 64k"]
        + ["-c", "discard 1M 16k", "-c", "write -P 0x44 3M 1k", str(top)]
    )
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "extended_l2=on", str(top), str(packed)])
    for path in (top, packed):
        ours = run([PYNBD, "img", "map", "--output=json", str(path)]).stdout
        assert ours == run(["qemu-img", "map", "--output=json", str(path)]).stdout

        async def go(path=path) -> bytes:
            image = await open_image(str(path), read_only=True)
            node = image.node
            data = await read_all(node)
            await image.close()
            return data

        assert asyncio.run(go()) == qemu_read(path)
        assert run([PYNBD, "img", "check", str(path)]).stdout == run(["qemu-img", "check", str(path)]).stdout
    refused = run([PYNBD, "img", "bitmap", "--add", str(top), "b"], check=False)
    assert refused.returncode == 1 and "extended L2" in refused.stderr


def test_dirty_lazy_refcounts_image_is_repaired_on_read_write_open(workdir: Path) -> None:
    """qemu killed while writing an image with lazy refcounts leaves the dirty bit and stale
    refcounts; opening it read-write repairs it first, as qemu does."""
    path = workdir / "lazy.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "8M"])
    run(["qemu-io", "-c", "write -P 5 0 128k", "-c", "flush", "-c", "sigraise 9", str(path)], check=False)
    assert json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)["dirty-flag"]
    assert run(["qemu-img", "check", str(path)], check=False).returncode == 2

    async def go() -> None:
        image = await open_image(str(path), read_only=False)
        node = image.node
        await node.write(1 * MiB, b"\x06" * 65536)
        await image.close()

    asyncio.run(go())
    qemu_check(path)
    assert not json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)["dirty-flag"]
    data = qemu_read(path)
    assert data[: 128 * 1024] == b"\x05" * 128 * 1024 and data[MiB : MiB + 65536] == b"\x06" * 65536
