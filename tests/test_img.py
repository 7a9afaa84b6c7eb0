"""``pynbd img`` against ``qemu-img``: same output and exit codes for the same images, and images
made by one command are what qemu expects (check, compare, map)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from tests.peers import PYNBD, SYSTEM_PATH, file_extents, have, run

pytestmark = pytest.mark.skipif(not (have("qemu-img") and have("qemu-io")), reason="needs qemu-img and qemu-io")

MiB = 1 << 20
GiB = 1 << 30


def img(*args: str, check: bool = True):
    return run([PYNBD, "img", *args], check=check)


def both(*args: str):
    """Run the same command line through pynbd img and qemu-img."""
    return img(*args, check=False), run(["qemu-img", *args], check=False)


def assert_same(*args: str) -> None:
    ours, theirs = both(*args)
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr), args


# -- damaging images ------------------------------------------------------------------------------


def refcount_entry(path: Path, cluster: int) -> int:
    """File offset of the 16-bit refcount of ``cluster`` (first refcount block only)."""
    with open(path, "rb") as f:
        head = f.read(104)
    table = struct.unpack_from(">Q", head, 48)[0]
    with open(path, "rb") as f:
        f.seek(table)
        block = struct.unpack(">Q", f.read(8))[0]
    return block + 2 * cluster


def set_refcount(path: Path, cluster: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(refcount_entry(path, cluster))
        f.write(struct.pack(">H", value))


def set_bitmap_in_use(path: Path) -> None:
    data = path.read_bytes()[:65536]
    pos = struct.unpack_from(">I", data, 100)[0]
    while True:
        ext_type, length = struct.unpack_from(">II", data, pos)
        if ext_type == 0:
            raise AssertionError("no bitmaps extension")
        if ext_type == 0x23852875:
            directory = struct.unpack_from(">Q", data, pos + 8 + 16)[0]
            with open(path, "r+b") as f:
                f.seek(directory + 12)
                flags = struct.unpack(">I", f.read(4))[0]
                f.seek(directory + 12)
                f.write(struct.pack(">I", flags | 1))
            return
        pos += 8 + (length + 7) // 8 * 8


@pytest.fixture
def image(workdir: Path) -> Path:
    """A 8 MiB qcow2 with two data clusters and one L2 table (clusters 0..6), written by pynbd."""
    path = workdir / "base.qcow2"
    img("create", "-q", "-f", "qcow2", str(path), "8M")
    run(["qemu-io", "-c", "write -P 7 0 128k", str(path)])
    return path


@pytest.mark.parametrize("damage", ["leak", "refcount-zero", "refcount-two", "in-use-bitmap", "clean"])
def test_check_agrees_with_qemu_on_damaged_images(workdir: Path, image: Path, damage: str) -> None:
    if damage == "leak":
        with open(image, "r+b") as f:
            f.truncate(image.stat().st_size + 65536)
        set_refcount(image, image.stat().st_size // 65536 - 1, 1)
    elif damage == "refcount-zero":
        set_refcount(image, 4, 0)  # the L2 table: referenced, counted as unused
    elif damage == "refcount-two":
        set_refcount(image, 5, 2)  # a data cluster counted twice: a leak, and COPIED is now wrong
    elif damage == "in-use-bitmap":
        run(["qemu-img", "bitmap", "--add", str(image), "b"])
        set_bitmap_in_use(image)
    for output in ("human", "json"):
        ours, theirs = both("check", f"--output={output}", str(image))
        assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
        assert ours.stdout == theirs.stdout
        qemu_lines = theirs.stderr.splitlines()
        assert [line for line in ours.stderr.splitlines() if "in use" not in line] == qemu_lines
    if damage == "in-use-bitmap":
        assert "bitmap 'b' is in use" in ours.stderr

    for level in ("leaks", "all"):
        mine, qemus = workdir / f"mine-{level}.qcow2", workdir / f"qemu-{level}.qcow2"
        shutil.copy(image, mine)
        shutil.copy(image, qemus)
        ours = img("check", "-r", level, str(mine), check=False)
        theirs = run(["qemu-img", "check", "-r", level, str(qemus)], check=False)
        assert ours.returncode == theirs.returncode, (level, ours.stdout, ours.stderr, theirs.stdout, theirs.stderr)
        assert (
            ours.stderr.replace("pynbd img:", "qemu-img:").splitlines()[: len(qemu_lines)]
            == theirs.stderr.splitlines()[: len(qemu_lines)]
        )
        if damage == "in-use-bitmap" and level == "all":
            # pynbd stores the bitmap back (new clusters), so only the image end offset differs
            assert ours.stdout.splitlines()[:-1] == theirs.stdout.splitlines()[:-1]
        else:
            assert ours.stdout == theirs.stdout, level
        # the image pynbd repaired is, to qemu, in the same state as the one qemu repaired
        after = [run(["qemu-img", "check", str(p)], check=False).returncode for p in (mine, qemus)]
        assert after[0] == after[1], level
    if damage == "in-use-bitmap":
        info = json.loads(run(["qemu-img", "info", "--output=json", str(workdir / "mine-all.qcow2")]).stdout)
        assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["auto"]


def test_check_raw_is_unsupported(workdir: Path) -> None:
    path = workdir / "disk.raw"
    img("create", "-q", str(path), "1M")
    ours, theirs = both("check", str(path))
    assert ours.returncode == theirs.returncode == 63


def test_create_info_map_match_qemu(workdir: Path) -> None:
    base, top = workdir / "base.raw", workdir / "top.qcow2"
    ours, theirs = both("create", "-f", "raw", str(base), "4M")
    assert ours.stdout == theirs.stdout and ours.returncode == theirs.returncode == 0
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", str(base)])
    ours, theirs = both("create", "-f", "qcow2", "-o", "cluster_size=32k", "-b", base.name, "-F", "raw", str(top), "8M")
    assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode)
    run(["qemu-io", "-c", "write -P 2 512k 64k", "-c", "write -z 2M 128k", "-c", "write -P 3 3M 4k", str(top)])
    assert_same("info", str(top))
    assert_same("info", "--output=json", "--backing-chain", str(top))
    assert_same("info", "--backing-chain", str(top))
    assert_same("map", "--output=json", str(top))
    assert_same("map", str(top))
    assert_same("map", "--output=json", "--start-offset=1M", "--max-length=3M", str(top))


def test_qcow2_created_by_pynbd_is_what_qemu_creates(workdir: Path) -> None:
    for opts in ("cluster_size=512", "cluster_size=2M,refcount_bits=64", "compat=0.10", "compression_type=zstd"):
        ours, theirs = workdir / "ours.qcow2", workdir / "theirs.qcow2"
        img("create", "-q", "-f", "qcow2", "-o", opts, str(ours), "1G")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(theirs), "1G"])
        assert run(["qemu-img", "check", str(ours)], check=False).returncode == 0
        info = [json.loads(run(["qemu-img", "info", "--output=json", str(p)]).stdout) for p in (ours, theirs)]
        for i in info:
            i.pop("filename")
            i.pop("actual-size")
        assert info[0] == info[1], opts


def test_compare_matches_qemu(workdir: Path) -> None:
    a, b, c, d = (workdir / name for name in ("a.qcow2", "b.raw", "c.qcow2", "d.raw"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(a), "8M"])
    run(["qemu-io", "-c", "write -P 5 1M 100k", str(a)])
    run(["qemu-img", "convert", "-O", "raw", str(a), str(b)])
    shutil.copy(a, c)
    run(["qemu-io", "-c", "write -P 6 1500k 1", str(c)])
    run(["qemu-img", "create", "-q", "-f", "raw", str(d), "10M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 5 1M 100k", str(d)])
    assert_same("compare", str(a), str(b))
    assert_same("compare", str(a), str(c))
    assert_same("compare", "-f", "qcow2", "-F", "raw", str(a), str(d))
    assert_same("compare", "-s", str(a), str(d))
    run(["qemu-io", "-f", "raw", "-c", "write -P 9 9M 512", str(d)])
    assert_same("compare", str(a), str(d))


def test_convert_both_ways_sparse(workdir: Path) -> None:
    src, q, back = workdir / "src.raw", workdir / "conv.qcow2", workdir / "back.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(src), "64M"])
    run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 40M 12k",
            "-c",
            "write -P 0 50M 1M",
            str(src),
        ]
    )
    img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(q))
    assert run(["qemu-img", "check", str(q)], check=False).returncode == 0
    assert run(["qemu-img", "compare", str(src), str(q)]).returncode == 0
    qmap = json.loads(run(["qemu-img", "map", "--output=json", str(q)]).stdout)
    allocated = sum(e["length"] for e in qmap if e["data"])
    assert allocated == 1 * MiB + 12 * 1024  # the written zeroes at 50M stayed sparse
    img("convert", "-O", "raw", str(q), str(back))
    assert back.read_bytes() == src.read_bytes()
    assert sum(length for _, length, flags in file_extents(back) if not flags) <= 2 * MiB


def test_commit_into_backing_file(workdir: Path) -> None:
    base, top, expected = workdir / "base.qcow2", workdir / "top.qcow2", workdir / "expected.raw"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"])
    run(["qemu-io", "-c", "write -P 1 0 8M", str(base)])
    run(["qemu-img", "bitmap", "--add", str(base), "since-commit"])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top)])
    run(["qemu-io", "-c", "write -P 2 1M 64k", "-c", "write -z 4M 1M", "-c", "write -P 3 12M 8k", str(top)])
    run(["qemu-img", "convert", "-O", "raw", str(top), str(expected)])
    assert img("commit", str(top)).stdout == "Image committed.\n"
    assert run(["qemu-img", "check", str(base)], check=False).returncode == 0
    assert run(["qemu-img", "compare", "-F", "raw", str(base), str(expected)]).returncode == 0
    assert run(["qemu-img", "compare", "-F", "raw", str(top), str(expected)]).returncode == 0
    top_map = json.loads(run(["qemu-img", "map", "--output=json", str(top)]).stdout)
    assert all(entry["depth"] == 1 for entry in top_map)  # emptied
    # the base's persistent bitmap saw the commit's writes
    bitmaps = json.loads(run(["qemu-img", "info", "--output=json", str(base)]).stdout)
    assert bitmaps["format-specific"]["data"]["bitmaps"][0]["flags"] == ["auto"]


def test_large_sparse_image_written_by_pynbd(workdir: Path) -> None:
    """Several GiB of virtual disk with data scattered all over: qemu-img check is clean and
    qemu reads exactly what was written."""
    import asyncio
    import random

    from pynbd.daemon.open import open_image

    path, ref = workdir / "big.qcow2", workdir / "big.raw"
    size = 6 * GiB
    img("create", "-q", "-f", "qcow2", str(path), str(size))
    with open(ref, "wb") as f:
        f.truncate(size)
    rng = random.Random(5)

    async def go():
        image = await open_image(str(path), read_only=False)
        node = image.node
        with open(ref, "r+b") as f:
            for i in range(300):
                offset = rng.randrange(0, size - MiB) // 512 * 512
                length = rng.randrange(1, 256) * 512
                if i % 7 == 3:
                    await node.write_zeroes(offset, length)
                    f.seek(offset)
                    f.write(bytes(length))
                elif i % 11 == 5:
                    await node.discard(offset, 2 * MiB)
                    start = (offset + 65535) // 65536 * 65536
                    end = (offset + 2 * MiB) // 65536 * 65536
                    f.seek(start)
                    f.write(bytes(end - start))
                else:
                    data = rng.randbytes(length)
                    await node.write(offset, data)
                    f.seek(offset)
                    f.write(data)
        await image.close()

    asyncio.run(go())
    report = json.loads(run(["qemu-img", "check", "--output=json", str(path)]).stdout)
    assert report["check-errors"] == 0 and "corruptions" not in report and "leaks" not in report
    assert run(["qemu-img", "compare", "-F", "raw", str(path), str(ref)]).returncode == 0
    ours = json.loads(img("check", "--output=json", str(path)).stdout)
    assert ours == report | {"filename": str(path)}


# -- convert and commit on the copy job -----------------------------------------------------------

PROGRESS_LINE = re.compile(rb"    \((\d{1,3}\.\d\d)/100%\)")


def raw_run(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a tool keeping its output as bytes (progress lines end in a bare carriage return)."""
    return subprocess.run(argv, capture_output=True, timeout=300, env=dict(os.environ, PATH=SYSTEM_PATH))


def progress_values(stdout: bytes) -> list[float]:
    """The figures of qemu-img's progress output; asserts its exact shape: lines of
    ``"    (x.xx/100%)\\r"`` and a final newline."""
    assert stdout.endswith(b"\r\n"), stdout[-40:]
    lines = stdout[:-1].split(b"\r")[:-1]
    values = []
    for line in lines:
        match = PROGRESS_LINE.fullmatch(line)
        assert match, line
        values.append(float(match.group(1)))
    return values


def assert_progress(stdout: bytes) -> None:
    values = progress_values(stdout)
    assert values[0] == 0.0 and values[-1] == 100.0, values
    assert values == sorted(values), values


def map_shape(path: Path) -> list[tuple]:
    """qemu-img map without host offsets, adjacent entries of the same kind merged. Data entries
    are one kind whatever ``zero`` says: inside an allocated qcow2 cluster, the part never written
    is a hole of the image file for pynbd and a zeroed-but-allocated range for qemu (it zero-fills
    new clusters); which bytes hold data is the same."""
    shape: list[list] = []
    for entry in json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout):
        kind = (entry["depth"], entry["present"], entry["data"], None if entry["data"] else entry["zero"])
        if shape and shape[-1][0] == kind and shape[-1][1] + shape[-1][2] == entry["start"]:
            shape[-1][2] += entry["length"]
        else:
            shape.append([kind, entry["start"], entry["length"]])
    return [tuple(item) for item in shape]


def convert_sources(workdir: Path) -> list[Path]:
    """A raw image with data, a written run of zeroes and holes; a qcow2 over a backing file
    with its own data and zero clusters; a raw file whose size is not a multiple of 512."""
    first, base, second, odd = (workdir / name for name in ("s1.raw", "s2-base.qcow2", "s2.qcow2", "s3.raw"))
    run(["qemu-img", "create", "-q", "-f", "raw", str(first), "8M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -P 2 3M 12k", str(first)])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0 5M 1M", "-c", "write -P 3 6M 512", str(first)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"])
    run(["qemu-io", "-c", "write -P 4 0 2M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(second)])
    run(["qemu-io", "-c", "write -P 5 1M 64k", "-c", "write -z 1536k 256k", "-c", "write -P 6 3M 4k", str(second)])
    odd.write_bytes(bytes(range(1, 251)) * 400)  # 100000 bytes
    return [first, second, odd]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_concatenates_several_sources_as_qemu_img_does(workdir: Path, fmt: str) -> None:
    sources = [str(path) for path in convert_sources(workdir)]
    ours, theirs = workdir / f"ours.{fmt}", workdir / f"theirs.{fmt}"
    mine = raw_run([PYNBD, "img", "convert", "-p", "-O", fmt, *sources, str(ours)])
    qemus = raw_run(["qemu-img", "convert", "-p", "-O", fmt, *sources, str(theirs)])
    assert mine.returncode == qemus.returncode == 0, mine.stderr
    assert_progress(mine.stdout)
    assert_progress(qemus.stdout)
    size = 8 * MiB + 4 * MiB + 100352  # each source rounded up to 512 bytes, as qemu-img does
    for path in (ours, theirs):
        assert json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)["virtual-size"] == size
    if fmt == "raw":
        assert ours.read_bytes() == theirs.read_bytes()
        assert file_extents(ours) == file_extents(theirs)  # the same holes
    else:
        assert run(["qemu-img", "check", str(ours)]).returncode == 0
        run(["qemu-img", "compare", str(ours), str(theirs)])
    assert map_shape(ours) == map_shape(theirs)
    flat, middle = workdir / "flat.raw", workdir / "middle.raw"
    run(["qemu-img", "convert", "-O", "raw", str(ours), str(flat)])
    run(["qemu-img", "convert", "-O", "raw", sources[1], str(middle)])
    first, _, odd = (Path(src).read_bytes() for src in sources)
    assert flat.read_bytes() == first + middle.read_bytes() + odd + bytes(352)  # a, b, c, then c's padding


def test_convert_into_an_existing_target(workdir: Path) -> None:
    """-n: the sources are written over the target's start (zeroes written too), the rest stays;
    a target smaller than the sources is refused."""
    sources = [str(path) for path in convert_sources(workdir)]
    ours, theirs = workdir / "ours.raw", workdir / "theirs.raw"
    junk = bytes(range(6, 256)) * (16 * MiB // 250) + bytes(16 * MiB % 250)
    ours.write_bytes(junk)
    theirs.write_bytes(junk)
    img("convert", "-n", "-O", "raw", *sources, str(ours))
    run(["qemu-img", "convert", "-n", "-O", "raw", *sources, str(theirs)])
    assert ours.read_bytes() == theirs.read_bytes()
    small = workdir / "small.raw"
    small.write_bytes(bytes(MiB))
    mine, qemus = both("convert", "-n", "-O", "raw", *sources, str(small))
    assert mine.returncode == qemus.returncode == 1
    assert mine.stderr.replace("pynbd img:", "qemu-img:") == qemus.stderr
    assert small.read_bytes() == bytes(MiB)
    mine, qemus = both("convert", "--bitmaps", "-O", "qcow2", sources[1], sources[1], str(workdir / "b.qcow2"))
    assert mine.returncode == qemus.returncode == 1
    assert mine.stderr.replace("pynbd img:", "qemu-img:") == qemus.stderr


def test_convert_quiet_shows_no_progress(workdir: Path) -> None:
    sources = [str(path) for path in convert_sources(workdir)]
    mine = raw_run([PYNBD, "img", "convert", "-p", "-q", "-O", "raw", *sources, str(workdir / "ours.raw")])
    qemus = raw_run(["qemu-img", "convert", "-p", "-q", "-O", "raw", *sources, str(workdir / "theirs.raw")])
    assert (mine.returncode, mine.stdout) == (qemus.returncode, qemus.stdout) == (0, b"")


def test_convert_to_a_target_another_process_writes_is_refused(workdir: Path, start_qemu_nbd) -> None:
    """qemu-nbd holds the target's write lock: creating over it and -n are both refused, with
    qemu-img's messages, and the target is left as it was."""
    source, target = workdir / "src.raw", workdir / "busy.qcow2"
    source.write_bytes(bytes(range(256)) * 4096)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), "1M"])
    before = target.read_bytes()
    start_qemu_nbd("-f", "qcow2", str(target))
    for extra in ([], ["-n"]):
        mine, qemus = both("convert", *extra, "-O", "qcow2", str(source), str(target))
        assert mine.returncode == qemus.returncode == 1, mine.stderr
        assert mine.stderr.replace("pynbd img:", "qemu-img:") == qemus.stderr
        assert 'Failed to get "write" lock' in mine.stderr
        assert target.read_bytes() == before


def compressed_cluster_offset(path: Path) -> int:
    """Host offset of the first guest cluster of a qcow2 image (64 KiB clusters), compressed."""
    with open(path, "rb") as f:
        header = f.read(104)
        f.seek(struct.unpack_from(">Q", header, 40)[0])  # the L1 table
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2)
        entry = struct.unpack(">Q", f.read(8))[0]
    assert entry & (1 << 62), "not a compressed cluster"
    return entry & ((1 << 54) - 1)  # 62 - (cluster_bits - 8) offset bits


def test_convert_reports_a_source_read_error(workdir: Path) -> None:
    """A compressed cluster whose data is garbage: qemu-img's message (plus the cause), exit 1."""
    plain, broken = workdir / "plain.raw", workdir / "broken.qcow2"
    plain.write_bytes(b"abcd" * (MiB // 4))
    run(["qemu-img", "convert", "-c", "-O", "qcow2", str(plain), str(broken)])
    with open(broken, "r+b") as f:  # the first cluster is compressed: spoil its deflate stream
        f.seek(compressed_cluster_offset(broken))
        f.write(b"\xff" * 64)
    for target in ("out.raw", "out.qcow2"):
        fmt = target.split(".")[1]
        mine, qemus = both("convert", "-O", fmt, str(broken), str(workdir / target))
        assert mine.returncode == qemus.returncode == 1
        assert qemus.stderr.startswith("qemu-img: error while reading at byte 0: ")
        assert mine.stderr.startswith("pynbd img: error while reading at byte 0: qcow2: compressed cluster")
        assert mine.stderr.count("\n") == 1  # said once


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_convert_cancels_cleanly(workdir: Path, signum: int) -> None:
    """The copy crawls (-r); once it shows progress past 0 the signal comes: the process ends by
    that signal, at once, having cancelled the job and closed the target (unlocked, qemu-img
    check clean, part of the data there)."""
    source, target = workdir / "src.raw", workdir / "out.qcow2"
    source.write_bytes(bytes(range(1, 256)) * (16 * MiB // 255))
    argv = [PYNBD, "img", "convert", "-p", "-r", "1M", "-O", "qcow2", str(source), str(target)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        shown = 0.0
        while shown == 0.0:  # the first chunk is copied: the job is under way
            line = b"".join(iter(lambda: proc.stdout.read(1), b"\r"))
            shown = float(PROGRESS_LINE.fullmatch(line).group(1))
        assert shown < 100.0
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signum, err
    assert out.endswith(b"\n") and err == b""
    assert run(["qemu-img", "check", str(target)]).returncode == 0  # no -U: nobody holds a lock
    copied = json.loads(run(["qemu-img", "map", "--output=json", str(target)]).stdout)
    assert 0 < sum(e["length"] for e in copied if e["data"]) < 16 * MiB  # stopped midway


def commit_chain(workdir: Path, who: str) -> tuple[Path, Path, Path]:
    base, mid, top = (workdir / f"{who}-{name}.qcow2" for name in ("base", "mid", "top"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"])
    run(["qemu-io", "-c", "write -P 1 0 8M", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(mid)])
    run(["qemu-io", "-c", "write -P 7 14M 1M", str(mid)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top)])
    io = ["-c", "write -P 2 1M 3M", "-c", "write -z 6M 1M", "-c", "write -P 0 10M 64k", "-c", "write -P 3 12M 4k"]
    run(["qemu-io", *io, str(top)])
    return base, mid, top


@pytest.mark.parametrize("into", ["backing", "base"])
def test_commit_with_progress_matches_qemu_img(workdir: Path, into: str) -> None:
    """pynbd img commit -p on the commit job and qemu-img commit -p: the same progress format,
    the same bytes in the image committed into, the same maps (host offsets aside: each
    allocator places clusters its own way), clean checks."""
    results = {}
    for who, tool in (("ours", [PYNBD, "img"]), ("theirs", ["qemu-img"])):
        base, mid, top = commit_chain(workdir, who)
        expected = workdir / f"{who}-expected.raw"
        run(["qemu-img", "convert", "-O", "raw", str(top), str(expected)])
        extra = ["-b", str(base)] if into == "base" else []
        done = raw_run([*tool, "commit", "-p", *extra, str(top)])
        assert done.returncode == 0, done.stderr
        assert done.stdout.endswith(b"\r\nImage committed.\n")
        assert_progress(done.stdout[: -len(b"Image committed.\n")])
        into_image = base if into == "base" else mid
        for path in (base, mid, top):
            run(["qemu-img", "check", str(path)])
        run(["qemu-img", "compare", "-F", "raw", str(top), str(expected)])
        results[who] = [map_shape(path) for path in (base, mid, top)], into_image
    (ours, our_image), (theirs, their_image) = results["ours"], results["theirs"]
    assert ours == theirs
    run(["qemu-img", "compare", str(our_image), str(their_image)])
