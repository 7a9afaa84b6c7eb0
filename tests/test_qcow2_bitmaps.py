"""Persistent dirty bitmaps in qcow2, both ways with qemu: qemu's bitmaps read identically through
pynbd, pynbd's bitmaps show in qemu-img info and read identically through qemu-nbd -B, and a bitmap
left IN_USE is never trusted: it comes back fully dirty."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from pynbd.daemon.open import open_image
from tests.peers import PYNBD, have, nbdinfo_map, run

pytestmark = pytest.mark.skipif(not (have("qemu-img") and have("nbdinfo")), reason="needs qemu-img and nbdinfo")

MiB = 1 << 20
SIZE = 32 * MiB


def dirty_extents(clusters: set[int], granularity: int, size: int) -> list[tuple[int, int, int]]:
    """What qemu:dirty-bitmap must answer for a set of dirty cluster indices."""
    out: list[tuple[int, int, int]] = []
    count = (size + granularity - 1) // granularity
    for index in range(count):
        start = index * granularity
        length = min(granularity, size - start)
        flag = 1 if index in clusters else 0
        if out and out[-1][2] == flag:
            out[-1] = (out[-1][0], out[-1][1] + length, flag)
        else:
            out.append((start, length, flag))
    return out


def touched(offset: int, length: int, granularity: int) -> set[int]:
    return set(range(offset // granularity, (offset + length - 1) // granularity + 1))


def pynbd_bitmap_extents(path: Path, name: str) -> tuple[list[tuple[int, int, int]], bool]:
    async def go():
        image = await open_image(str(path), read_only=True)
        node = image.node
        bitmap = node.dirty_bitmaps[name]
        extents, pos = [], 0
        for run_length, dirty in bitmap.extents(0, node.size):
            extents.append((pos, run_length, int(dirty)))
            pos += run_length
        await image.close()
        return extents, bitmap.enabled

    return asyncio.run(go())


def qemu_info_bitmaps(path: Path) -> list[dict]:
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    return info["format-specific"]["data"].get("bitmaps", [])


def test_qemu_bitmaps_read_identically(workdir: Path, start_qemu_nbd, start_pynbd) -> None:
    path = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(path), str(SIZE)])
    run(["qemu-img", "bitmap", "--add", str(path), "live"])
    run(["qemu-img", "bitmap", "--add", "-g", "4096", str(path), "fine"])
    run(["qemu-io", "-c", "write 1M 64k", "-c", "write 5000k 3k", "-c", "write -z 20M 1M", str(path)])
    run(["qemu-img", "bitmap", "--disable", str(path), "fine"])
    run(["qemu-io", "-c", "write 30M 4k", "-c", "discard 8M 128k", str(path)])

    qemu = start_qemu_nbd("-r", "-f", "qcow2", "-B", "live", "-B", "fine", str(path))
    ours = start_pynbd("-r", "-B", "live", "-B", "fine", str(path))
    for name in ("live", "fine"):
        expected = nbdinfo_map(qemu.uri, context=f"qemu:dirty-bitmap:{name}")
        assert nbdinfo_map(ours.uri, context=f"qemu:dirty-bitmap:{name}") == expected
        loaded, _ = pynbd_bitmap_extents(path, name)
        assert loaded == expected
    live = nbdinfo_map(qemu.uri, context="qemu:dirty-bitmap:live")
    assert any(t == 1 for _, _, t in live)
    fine, enabled = pynbd_bitmap_extents(path, "fine")
    assert not enabled
    assert (30 * MiB, 4096, 1) not in fine  # written after --disable
    assert dirty_extents(touched(1 * MiB, 65536, 4096) | touched(5000 * 1024, 3072, 4096) |
                         touched(20 * MiB, MiB, 4096), 4096, SIZE) == fine  # fmt: skip
    # the other contexts agree too
    for context in ("base:allocation",):
        assert nbdinfo_map(ours.uri, context=context) == nbdinfo_map(qemu.uri, context=context)


def test_pynbd_bitmaps_seen_by_qemu(workdir: Path, start_qemu_nbd) -> None:
    """Bitmaps added and dirtied by pynbd: same granularity and flags in qemu-img info, same dirty
    clusters through qemu-nbd -B, and qemu-img check finds nothing wrong."""
    path = workdir / "disk.qcow2"
    run([PYNBD, "img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)])
    run([PYNBD, "img", "bitmap", "--add", str(path), "a"])
    run([PYNBD, "img", "bitmap", "--add", "-g", "8192", str(path), "b"])
    run([PYNBD, "img", "bitmap", "--add", "--disable", str(path), "off"])
    rng = random.Random(3)
    expected_a: set[int] = set()
    expected_b: set[int] = set()

    async def workload():
        image = await open_image(str(path), read_only=False)
        disk = image.link  # through the request gate, which marks the bitmaps
        for _ in range(120):
            offset = rng.randrange(0, SIZE - 1)
            length = rng.randrange(1, min(200_000, SIZE - offset) + 1)
            kind = rng.random()
            if kind < 0.7:
                await disk.write(offset, rng.randbytes(length))
            elif kind < 0.85:
                await disk.write_zeroes(offset, length)
            else:
                await disk.discard(offset, length)
            expected_a.update(touched(offset, length, 65536))
            expected_b.update(touched(offset, length, 8192))
        await image.close()

    asyncio.run(workload())
    result = run(["qemu-img", "check", str(path)], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert qemu_info_bitmaps(path) == [
        {"flags": ["auto"], "name": "a", "granularity": 65536},
        {"flags": ["auto"], "name": "b", "granularity": 8192},
        {"flags": [], "name": "off", "granularity": 65536},
    ]
    qemu = start_qemu_nbd("-r", "-f", "qcow2", "-B", "a", "-B", "b", "-B", "off", str(path))
    assert nbdinfo_map(qemu.uri, context="qemu:dirty-bitmap:a") == dirty_extents(expected_a, 65536, SIZE)
    assert nbdinfo_map(qemu.uri, context="qemu:dirty-bitmap:b") == dirty_extents(expected_b, 8192, SIZE)
    assert nbdinfo_map(qemu.uri, context="qemu:dirty-bitmap:off") == [(0, SIZE, 0)]


def test_bitmap_commands_match_qemu(workdir: Path) -> None:
    """--clear, --merge (across granularities, from another image), --remove, --enable."""
    path, other = workdir / "disk.qcow2", workdir / "other.qcow2"
    for p in (path, other):
        run(["qemu-img", "create", "-f", "qcow2", str(p), str(SIZE)])
    run(["qemu-img", "bitmap", "--add", "-g", "4096", str(other), "src"])
    run(["qemu-io", "-c", "write 3M 4k", "-c", "write 9M 100k", str(other)])
    run(["qemu-img", "bitmap", "--add", str(path), "t"])
    run(["qemu-io", "-c", "write 1M 4k", str(path)])
    run([PYNBD, "img", "bitmap", "--clear", str(path), "t"])
    run([PYNBD, "img", "bitmap", "--merge", "src", "-b", str(other), "-F", "qcow2", str(path), "t"])
    extents, _ = pynbd_bitmap_extents(path, "t")
    assert extents == dirty_extents(touched(3 * MiB, 4096, 65536) | touched(9 * MiB, 102400, 65536), 65536, SIZE)
    run([PYNBD, "img", "bitmap", "--add", str(path), "gone", "--disable"])
    run([PYNBD, "img", "bitmap", "--enable", str(path), "gone"])
    run([PYNBD, "img", "bitmap", "--remove", str(path), "gone"])
    assert [b["name"] for b in qemu_info_bitmaps(path)] == ["t"]
    missing = run([PYNBD, "img", "bitmap", "--clear", str(path), "nope"], check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert run(["qemu-img", "check", str(path)], check=False).returncode == 0


def test_in_use_bitmap_is_fully_dirty(workdir: Path, start_qemu_nbd) -> None:
    """An image left open read-write (a crash) has its bitmaps IN_USE; pynbd loads them fully
    dirty, says so, check reports it like qemu-img check (no error), and -r all stores them back."""
    path = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(path), str(SIZE)])
    run(["qemu-img", "bitmap", "--add", str(path), "b"])

    async def crash():
        image = await open_image(str(path), read_only=False)
        node = image.node
        await node.write(4 * MiB, b"x" * 4096)
        await node.flush()
        # the process "dies": nothing stored, the file is simply closed
        await node._file.close()  # noqa: SLF001

    asyncio.run(crash())
    assert qemu_info_bitmaps(path)[0]["flags"] == ["in-use", "auto"]
    extents, _ = pynbd_bitmap_extents(path, "b")
    assert extents == [(0, SIZE, 1)]

    info = run([PYNBD, "img", "info", str(path)])
    assert "bitmap 'b' is in use" in info.stdout
    ours = run([PYNBD, "img", "check", str(path)], check=False)
    theirs = run(["qemu-img", "check", str(path)], check=False)
    assert ours.returncode == theirs.returncode == 0
    assert "in use" in ours.stderr
    repaired = run([PYNBD, "img", "check", "-r", "all", str(path)], check=False)
    assert repaired.returncode == 0, repaired.stderr
    assert qemu_info_bitmaps(path)[0]["flags"] == ["auto"]
    assert run(["qemu-img", "check", str(path)], check=False).returncode == 0
    qemu = start_qemu_nbd("-r", "-f", "qcow2", "-B", "b", str(path))
    assert nbdinfo_map(qemu.uri, context="qemu:dirty-bitmap:b") == [(0, SIZE, 1)]
