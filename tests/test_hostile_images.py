"""Hostile images: a corpus of crafted qcow2 images (tests/crafted.py), each refused with a clear
error, in bounded memory and without a traceback, by every way pynbd opens an image (``img info``,
``img check``, ``serve``, the daemon's ``blockdev-add``); data that cannot be trusted fails its own
read with EIO; backing loops and chains too deep are refused with ELOOP; a bitmap of a smaller
node is exported clean past its end. Every case is also given to qemu-img, and what qemu does is
checked against the corpus' record of it."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest

from pynbd.daemon.open import MAX_BACKING_CHAIN, OpenError, open_image
from pynbd.graph.core import MAX_GRAPH_DEPTH
from tests import crafted
from tests.crafted import CASES, PATTERN, READ_EIO, REFUSED, Case
from tests.daemons import KINDS
from tests.peers import PYNBD, SYSTEM_PATH, have, run

pytestmark = pytest.mark.skipif(
    not (have("qemu-img") and have("qemu-io") and have("qemu-nbd")), reason="needs qemu-img, qemu-io and qemu-nbd"
)

MiB = 1 << 20
#: What any pynbd process may reach (peak RSS) while refusing or reading a crafted image. pynbd
#: itself peaks at 27 to 32 MiB doing so; before the limits, l1-size-huge alone took 4 GiB (and
#: then failed with a MemoryError traceback) and bitmap-table-huge more than the machine had.
MEMORY_BOUND = 128 * MiB

REFUSING = [case for case in CASES if case.expect == REFUSED]
READ_FAILING = [case for case in CASES if case.expect == READ_EIO]


def ids(cases: list[Case]) -> list[str]:
    return [case.name for case in cases]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    return crafted.make_bases(tmp_path_factory.mktemp("bases"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bases) -> dict[str, Path]:
    """Every crafted image, built once per module (and per xdist worker)."""
    directory = tmp_path_factory.mktemp("corpus")
    return {case.name: case.build(bases, directory) for case in CASES}


# -- running a process and measuring it -----------------------------------------------------------


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes, the process's own high-water mark


#: Runs argv[2:] as its child and writes "exit code, peak RSS in KiB" to fd argv[1]. The peak RSS
#: Linux reports for a process includes that of the process it was forked from, until it execs
#: (it survives exec): a child of the test process would report the test's own RSS. A child of
#: this small launcher reports at most the launcher's (about 10 MiB) or its own.
_LAUNCHER = """
import os, sys
pid = os.fork()
if not pid:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
os.write(int(sys.argv[1]), b"%d %d" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss))
"""


def measured(argv: list[str], timeout: float = 120) -> Measured:
    """Run ``argv`` to its end; its output, exit code and its own peak RSS (the rusage of that one
    process, through _LAUNCHER). The wait is on a pidfd, never a timer."""
    env = dict(os.environ, PATH=SYSTEM_PATH)
    report_r, report_w = os.pipe()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        launcher = [sys.executable, "-c", _LAUNCHER, str(report_w), *argv]
        proc = subprocess.Popen(launcher, stdout=out, stderr=err, env=env, pass_fds=(report_w,), start_new_session=True)
        os.close(report_w)
        pidfd = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if not ready:
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
        proc.wait()
        with os.fdopen(report_r, "rb") as report:
            figures = report.read().split()
        assert ready and len(figures) == 2, f"{argv} did not finish within {timeout}s"
        out.seek(0)
        err.seek(0)
        code, peak_kib = (int(figure) for figure in figures)
        return Measured(code, out.read().decode(), err.read().decode(), peak_kib * 1024)


def assert_clean_refusal(result: Measured, *pieces: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    for piece in pieces:
        assert piece in result.stderr, (piece, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") <= 2, result.stderr  # one message (and qemu's hint line at most)
    assert result.peak_rss < MEMORY_BOUND, f"peak RSS {result.peak_rss >> 20} MiB"


def vm_hwm(pid: int) -> int:
    """A running process's peak RSS in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


# -- what qemu does with each image ---------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_qemu_img_info_agrees_with_the_record(case: Case, corpus: dict[str, Path]) -> None:
    """The corpus records whether qemu-img info refuses each image: check it against qemu. pynbd
    refuses at least every image qemu refuses (the other tests), and where it refuses one that
    qemu opens, the corpus says why."""
    result = run(["qemu-img", "info", str(corpus[case.name])], check=False)
    assert (result.returncode != 0) == case.qemu_info_refuses, (case.name, result.stderr)
    if case.expect == REFUSED and not case.qemu_info_refuses:
        assert case.why_stricter, f"{case.name}: qemu accepts it, pynbd refuses it: say why"


# -- pynbd img ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFUSING, ids=ids(REFUSING))
def test_img_info_refuses(case: Case, corpus: dict[str, Path]) -> None:
    path = corpus[case.name]
    result = measured([PYNBD, "img", "info", str(path)])
    assert_clean_refusal(result, f"pynbd img: Could not open '{path}': ", case.message)
    if case.qemu_info_refuses and case.qemu_words:  # then in qemu's words
        theirs = run(["qemu-img", "info", str(path)], check=False).stderr.splitlines()[0]
        assert result.stderr.splitlines()[0].startswith(theirs.replace("qemu-img:", "pynbd img:"))


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_img_check_is_bounded(case: Case, corpus: dict[str, Path], workdir: Path) -> None:
    """``img check`` reads the metadata itself (no qcow2 node): it must stay bounded too, and
    find fault with every image refused at open (exit 1, could not check; or 2, corruptions)."""
    path = workdir / "check.qcow2"
    shutil.copy(corpus[case.name], path)
    result = measured([PYNBD, "img", "check", str(path)])
    assert "Traceback" not in result.stderr, result.stderr
    assert result.peak_rss < MEMORY_BOUND, f"peak RSS {result.peak_rss >> 20} MiB"
    if case.expect == REFUSED:
        assert result.returncode in (1, 2), (result.returncode, result.stdout, result.stderr)
    elif case.name == "l2-entry-past-eof":  # qemu-img check's words and exit code
        theirs = run(["qemu-img", "check", str(path)], check=False)
        assert result.returncode == theirs.returncode == 2
        assert theirs.stderr.splitlines()[0] in result.stderr
    else:  # the compressed bombs: check reads no data, as qemu-img check
        assert result.returncode == run(["qemu-img", "check", str(path)], check=False).returncode == 0


def test_check_of_a_snapshot_table_walks_the_parsed_table(workdir: Path, bases: dict[str, Path]) -> None:
    """The valid image with an internal snapshot: its snapshot L1 table is counted from the table
    as parsed (and limited) at open, and the result agrees with qemu-img check."""
    path = workdir / "snap.qcow2"
    shutil.copy(bases["snapshot"], path)
    ours, theirs = run([PYNBD, "img", "check", str(path)], check=False), run(["qemu-img", "check", str(path)])
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)


# -- pynbd serve ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFUSING, ids=ids(REFUSING))
def test_serve_refuses(case: Case, corpus: dict[str, Path], workdir: Path) -> None:
    path = corpus[case.name]
    result = measured([PYNBD, "serve", "-r", "-k", str(workdir / "refused.sock"), str(path)])
    assert_clean_refusal(result, f"pynbd serve: Failed to blk_new_open '{path}': ", case.message)


# -- the daemon -----------------------------------------------------------------------------------


def test_daemon_refuses_every_crafted_image_and_keeps_serving(
    corpus: dict[str, Path], bases: dict[str, Path], start_daemon
) -> None:
    """One daemon is given every crafted image (read-only and read-write): each blockdev-add is a
    QMP error (qemu-storage-daemon's own words where it refuses too), the daemon's memory stays
    bounded, nothing is left in the graph, its log has no traceback, and then it opens and
    exports a good image whose data reads back."""
    ours, qsd = start_daemon("pynbd"), start_daemon("qsd", nbd=False)
    for case in REFUSING:
        file = {"driver": "file", "filename": str(corpus[case.name])}
        for read_only in (True, False):
            options = {"driver": "qcow2", "node-name": "crafted", "read-only": read_only, "file": file}
            desc = ours.fails("blockdev-add", **options)
            assert case.message in desc, (case.name, desc)
            if case.qemu_info_refuses and case.qemu_words and read_only:
                assert desc.startswith(qsd.fails("blockdev-add", **options)), case.name
    assert ours.ok("query-named-block-nodes") == []
    assert vm_hwm(ours.proc.pid) < MEMORY_BOUND
    good = {"driver": "file", "filename": str(bases["plain"])}
    ours.ok("blockdev-add", driver="qcow2", file=good, **{"node-name": "good", "read-only": True})
    ours.ok("block-export-add", type="nbd", id="good", **{"node-name": "good"})
    h = nbd.NBD()
    h.connect_uri(ours.uri("good"))
    assert h.pread(crafted.CLUSTER, 0) == bytes([PATTERN]) * crafted.CLUSTER
    h.shutdown()
    assert "Traceback" not in ours.log()


# -- data that cannot be trusted: EIO on its read, nothing else ------------------------------------


def read_status(uri: str, offset: int, length: int) -> int:
    """0, or the errno a read through libnbd failed with."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pread(length, offset)
        return 0
    except nbd.Error as exc:
        return exc.errnum
    finally:
        h.shutdown()


@pytest.mark.parametrize("case", READ_FAILING, ids=ids(READ_FAILING))
def test_untrusted_data_fails_its_read_with_eio(case: Case, corpus: dict[str, Path], start_pynbd) -> None:
    """The first cluster's data is the crafted part: its read fails with EIO, the rest of the
    disk reads, the server lives on, in bounded memory. (qemu: the zstd bombs fail alike; it
    reads the zlib bomb's first cluster and the cluster past the end of the file as zeroes.)"""
    path = corpus[case.name]
    server = start_pynbd("-r", str(path))
    assert read_status(server.uri, 0, crafted.CLUSTER) == errno.EIO
    assert read_status(server.uri, 512, 512) == errno.EIO
    assert read_status(server.uri, crafted.CLUSTER, crafted.CLUSTER) == 0
    assert server.proc.poll() is None
    assert vm_hwm(server.proc.pid) < MEMORY_BOUND
    assert case.message in server.log() and "Traceback" not in server.log()
    qemu = run(["qemu-io", "-r", "-c", f"read 0 {crafted.CLUSTER}", str(path)], check=False)
    qemu_fails = "Input/output error" in qemu.stdout + qemu.stderr
    assert qemu_fails == case.name.startswith("zstd"), qemu.stdout
    if not qemu_fails:
        assert case.why_stricter or case.name == "l2-entry-past-eof"
    converted = measured([PYNBD, "img", "convert", "-O", "raw", str(path), str(path.with_suffix(".raw"))])
    assert converted.returncode == 1 and "Traceback" not in converted.stderr, converted.stderr
    assert converted.peak_rss < MEMORY_BOUND


def test_untrusted_data_in_a_daemon_export(corpus: dict[str, Path], start_daemon) -> None:
    daemon = start_daemon("pynbd")
    for case in READ_FAILING:
        file = {"driver": "file", "filename": str(corpus[case.name])}
        daemon.ok("blockdev-add", driver="qcow2", file=file, **{"node-name": case.name, "read-only": True})
        daemon.ok("block-export-add", type="nbd", id=case.name, **{"node-name": case.name})
        assert read_status(daemon.uri(case.name), 0, crafted.CLUSTER) == errno.EIO, case.name
        assert read_status(daemon.uri(case.name), crafted.CLUSTER, crafted.CLUSTER) == 0
    assert vm_hwm(daemon.proc.pid) < MEMORY_BOUND
    assert "Traceback" not in daemon.log()


def test_a_cluster_past_the_end_is_not_written_either(workdir: Path, corpus: dict[str, Path], start_pynbd) -> None:
    """An in-place write to the crafted cluster would extend the file by a terabyte."""
    path = workdir / "past.qcow2"
    shutil.copy(corpus["l2-entry-past-eof"], path)
    size = path.stat().st_size
    server = start_pynbd(str(path))
    h = nbd.NBD()
    h.connect_uri(server.uri)
    with pytest.raises(nbd.Error) as caught:
        h.pwrite(b"x" * 512, 0)
    assert caught.value.errnum == errno.EIO
    h.pwrite(b"y" * 512, crafted.CLUSTER)  # elsewhere writes go on
    h.shutdown()
    server.stop()
    assert path.stat().st_size < size + 4 * crafted.CLUSTER


# -- backing loops and deep chains ----------------------------------------------------------------


def open_errno(path: Path) -> int:
    async def attempt() -> int:
        try:
            image = await open_image(str(path), read_only=True)
        except OpenError as exc:
            return exc.errno
        await image.close()
        return 0

    return asyncio.run(attempt())


@pytest.mark.parametrize("length", [1, 2, 3])
def test_backing_loops_are_refused_with_eloop(length: int, workdir: Path, bases: dict[str, Path], start_daemon) -> None:
    """An image that is its own backing file, a -> b -> a, a -> b -> c -> a: refused with ELOOP by
    every opener (the one the tools share, serve, img, the daemon), never a RecursionError;
    qemu-img info --backing-chain refuses them too. (tests/test_open_locks.py runs the other img
    commands on a -> b -> a.)"""
    top = crafted.backing_loop(workdir, bases, length)
    loop = "creates an infinite loop"
    assert open_errno(top) == errno.ELOOP
    assert_clean_refusal(measured([PYNBD, "serve", "-r", "-k", str(workdir / "s.sock"), str(top)]), loop)
    assert_clean_refusal(measured([PYNBD, "img", "info", "--backing-chain", str(top)]), loop)
    if length == 1:
        assert_clean_refusal(measured([PYNBD, "img", "convert", "-O", "raw", str(top), str(workdir / "o.raw")]), loop)
    assert loop in run(["qemu-img", "info", "--backing-chain", str(top)], check=False).stderr
    daemon = start_daemon("pynbd", nbd=False)
    file = {"driver": "file", "filename": str(top)}
    for read_only in (True, False):
        assert loop in daemon.fails(
            "blockdev-add", driver="qcow2", file=file, **{"node-name": "t", "read-only": read_only}
        )
    # the loop closed through an inline backing definition
    if length > 1:
        below = workdir / f"loop{length}-1.qcow2"
        inline = {"driver": "qcow2", "file": {"driver": "file", "filename": str(below)}}
        file = {"driver": "file", "filename": str(top)}
        options = {"node-name": "t", "read-only": True}
        assert loop in daemon.fails("blockdev-add", driver="qcow2", file=file, backing=inline, **options)
    assert daemon.ok("query-named-block-nodes") == []
    assert "Traceback" not in daemon.log()


def test_deep_chains_end_at_the_limit(workdir: Path, bases: dict[str, Path], start_pynbd, start_daemon) -> None:
    """A chain of MAX_BACKING_CHAIN backing files opens and reads through to the bottom; one more
    is refused with ELOOP by every opener, where qemu opens and reads both."""
    top = crafted.deep_chain(workdir / "deep", bases, MAX_BACKING_CHAIN + 1)
    deepest_ok = top.with_name(f"{MAX_BACKING_CHAIN:06}.qcow2")
    result = run(["qemu-io", "-r", "-c", f"read -P {PATTERN} 0 {crafted.CLUSTER}", str(top)], check=False)
    assert "verification failed" not in result.stdout and result.returncode == 0, result.stdout  # qemu: no limit

    assert open_errno(deepest_ok) == 0
    server = start_pynbd("-r", str(deepest_ok))
    h = nbd.NBD()
    h.connect_uri(server.uri)
    assert h.pread(crafted.CLUSTER, 0) == bytes([PATTERN]) * crafted.CLUSTER
    h.shutdown()
    server.stop()
    assert "Traceback" not in server.log()

    deep = "backing files deep"
    assert open_errno(top) == errno.ELOOP
    assert_clean_refusal(measured([PYNBD, "serve", "-r", "-k", str(workdir / "s.sock"), str(top)]), deep)
    assert_clean_refusal(measured([PYNBD, "img", "info", "--backing-chain", str(top)]), deep)
    daemon = start_daemon("pynbd", nbd=False)
    file = {"driver": "file", "filename": str(top)}
    assert deep in daemon.fails("blockdev-add", driver="qcow2", file=file, **{"node-name": "top"})
    assert daemon.ok("query-named-block-nodes") == []
    assert "Traceback" not in daemon.log()


def test_chains_built_node_by_node_stop_at_the_limits(workdir: Path, bases: dict[str, Path], start_daemon) -> None:
    """blockdev-add with ``backing`` naming the node below, one at a time: the chain stops at
    MAX_BACKING_CHAIN with ELOOP's message; filters on top stop at MAX_GRAPH_DEPTH links."""
    top = crafted.deep_chain(workdir / "deep", bases, MAX_BACKING_CHAIN + 1)
    daemon = start_daemon("pynbd")
    below = None
    for level in range(MAX_BACKING_CHAIN + 2):
        options = {
            "driver": "qcow2",
            "node-name": f"n{level}",
            "read-only": True,
            "file": {"driver": "file", "filename": str(top.with_name(f"{level:06}.qcow2"))},
            "backing": below,
        }
        reply = daemon.cmd("blockdev-add", **options)
        if level <= MAX_BACKING_CHAIN:
            assert "return" in reply, (level, reply)
        else:
            assert "backing files deep" in reply["error"]["desc"]
        below = f"n{level}"
    filters = 0
    while True:  # raw nodes stacked on the top, each passing requests down to the one below
        below = f"c{filters}" if filters else f"n{MAX_BACKING_CHAIN}"
        options = {"node-name": f"c{filters + 1}", "read-only": True}
        reply = daemon.cmd("blockdev-add", driver="raw", file=below, **options)
        if "error" in reply:
            assert "links deep" in reply["error"]["desc"], reply
            break
        filters += 1
        assert filters < MAX_GRAPH_DEPTH
    daemon.ok("block-export-add", type="nbd", id="deep", name="deep", **{"node-name": f"c{filters - 1}"})
    h = nbd.NBD()
    h.connect_uri(daemon.uri("deep"))
    assert h.pread(crafted.CLUSTER, 0) == bytes([PATTERN]) * crafted.CLUSTER  # deepest request: no RecursionError
    h.shutdown()
    assert "Traceback" not in daemon.log()


# -- a bitmap of a smaller node -------------------------------------------------------------------


def bitmap_extents(uri: str, context: str, offset: int, length: int) -> list[tuple[int, int]]:
    """One block status request's extents for ``context`` (libnbd refuses a reply without any)."""
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    got: list[int] = []

    def callback(ctx: str, start: int, entries: list[int], err: int) -> int:
        if ctx == context:
            assert start == offset
            got.extend(entries)
        return 0

    try:
        h.block_status(length, offset, callback)
    finally:
        h.shutdown()
    return list(zip(got[0::2], got[1::2], strict=True))


@pytest.fixture
def grown_overlay(workdir: Path) -> Path:
    """base.qcow2 (1 MiB) with bitmap b0 dirty over [64 KiB, 128 KiB); top.qcow2 (2 MiB) on it."""
    base, top = workdir / "base.qcow2", workdir / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"])
    run(["qemu-img", "bitmap", "--add", str(base), "b0"])
    run(["qemu-io", "-c", "write -P 1 64k 64k", str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top), "2M"])
    return top


@pytest.mark.parametrize("server", ["pynbd", "qemu-nbd"])
def test_bitmap_of_a_smaller_backing_node_is_clean_past_its_end(
    server: str, grown_overlay: Path, start_pynbd, start_qemu_nbd
) -> None:
    """``serve -B b0`` finds b0 on the 1 MiB backing node of a 2 MiB export: past 1 MiB the
    export is clean, as qemu-nbd says, for a request inside, across and past the bitmap's end."""
    start = start_pynbd if server == "pynbd" else start_qemu_nbd
    uri = start("-r", "-B", "b0", str(grown_overlay)).uri
    context = "qemu:dirty-bitmap:b0"
    assert bitmap_extents(uri, context, 0, 2 * MiB) == [(64 << 10, 0), (64 << 10, 1), (2 * MiB - (128 << 10), 0)]
    assert bitmap_extents(uri, context, MiB - 4096, 8192) == [(8192, 0)]
    assert bitmap_extents(uri, context, MiB + 4096, 4096) == [(4096, 0)]


def test_daemon_bitmap_of_a_smaller_backing_node(grown_overlay: Path, start_daemon) -> None:
    """The daemon's export of the same, beside qemu-storage-daemon's; and a copy-before-write
    filter given that bitmap is refused alike (its bitmap must cover the node)."""
    answers = {}
    for kind in KINDS:
        daemon = start_daemon(kind)
        file = {"driver": "file", "filename": str(grown_overlay)}
        daemon.ok("blockdev-add", driver="qcow2", file=file, **{"node-name": "top", "read-only": True})
        base = next(n["node-name"] for n in daemon.ok("query-named-block-nodes") if n["image"]["virtual-size"] == MiB
                    and n["drv"] == "qcow2")  # fmt: skip
        cbw = daemon.cmd(
            "blockdev-add",
            driver="copy-before-write",
            file="top",
            target={"driver": "null-co", "size": 2 * MiB},
            bitmap={"node": base, "name": "b0"},
            **{"node-name": "cbw"},
        )
        bitmaps = [{"node": base, "name": "b0"}]
        daemon.ok("block-export-add", type="nbd", id="top", bitmaps=bitmaps, **{"node-name": "top"})
        uri, context = daemon.uri("top"), "qemu:dirty-bitmap:b0"
        answers[kind] = (bitmap_extents(uri, context, 0, 2 * MiB), bitmap_extents(uri, context, MiB + 4096, 4096), cbw)
        daemon.stop()
    assert answers["pynbd"] == answers["qsd"]
    assert answers["pynbd"][1] == [(4096, 0)]
    assert "error" in answers["pynbd"][2]


# -- fuzzing the header and extension parsers ------------------------------------------------------


def test_arbitrary_header_bytes_are_refused_cleanly() -> None:
    """decode_header and check_openable on arbitrary bytes: a header, or FormatError (a BlockError
    with an errno); never another exception, never more memory than the input's cluster."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from pynbd.errors import BlockError
    from pynbd.qcow2.layout import MAGIC, FormatError, check_openable, decode_header

    prefix = st.sampled_from([b"", MAGIC, MAGIC + b"\0\0\0\x03", MAGIC + b"\0\0\0\x02"])

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(prefix=prefix, body=st.binary(max_size=600), file_size=st.integers(0, 1 << 45))
    def holds(prefix: bytes, body: bytes, file_size: int) -> None:
        try:
            header = decode_header(prefix + body)
            check_openable(header, file_size)
        except FormatError as exc:
            assert isinstance(exc, BlockError) and exc.errno in (errno.EINVAL, errno.EFBIG, errno.ENOTSUP)

    holds()


def test_mutated_valid_images_open_or_are_refused_in_bounded_memory(bases: dict[str, Path], workdir: Path) -> None:
    """Hypothesis overwrites fields of valid images (the header, its extensions, the bitmap
    directory, the snapshot table) with arbitrary values, then opens the result read-only and
    reads it: a clean refusal (FormatError) or a clean failure of a read (BlockError) are the only
    outcomes, and Python allocates little while it happens."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from pynbd.errors import BlockError
    from pynbd.nodes.file import FileNode
    from pynbd.qcow2.node import Qcow2Node

    images = {name: bases[name].read_bytes() for name in ("plain", "bitmap", "snapshot", "zstd")}
    regions = {name: [(0, 256)] for name in images}
    regions["bitmap"].append((crafted.bitmap_directory(bases["bitmap"]), 64))
    regions["snapshot"].append((crafted.snapshot_table(bases["snapshot"]), 64))
    path = workdir / "mutant.qcow2"

    async def open_and_read() -> None:
        try:
            node = await Qcow2Node.open(FileNode(str(path), read_only=True), read_only=True)
        except BlockError:
            return
        try:
            for offset in range(0, min(node.size, 4 * crafted.CLUSTER), crafted.CLUSTER):
                try:
                    await node.read_into(offset, memoryview(bytearray(crafted.CLUSTER)))
                    await node.block_status(offset, crafted.CLUSTER)
                except BlockError:
                    pass
        finally:
            await node.close()

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(
        name=st.sampled_from(sorted(images)),
        mutations=st.lists(
            st.tuples(st.integers(0, 1 << 16), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
            min_size=1,
            max_size=4,
        ),
    )
    def holds(name: str, mutations: list[tuple[int, int, int]]) -> None:
        data = bytearray(images[name])
        for where, width, value in mutations:
            start, length = regions[name][where % len(regions[name])]
            offset = start + (where >> 4) % (length - width + 1)
            data[offset : offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
        path.write_bytes(data)
        tracemalloc.start()
        try:
            asyncio.run(open_and_read())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * MiB, f"{peak >> 20} MiB allocated"

    holds()


def test_decompression_never_exceeds_a_cluster() -> None:
    """Arbitrary compressed data, and real streams of any length: one cluster out, or an error."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    import zlib

    import zstandard

    from pynbd.qcow2.layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD, compress, decompress

    cluster = 4096

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(
        kind=st.sampled_from([COMPRESSION_ZLIB, COMPRESSION_ZSTD]),
        length=st.integers(0, 4 * cluster),
        fill=st.binary(min_size=1, max_size=8),
        noise=st.binary(max_size=64),
        cut=st.integers(0, 64),
    )
    def holds(kind: int, length: int, fill: bytes, noise: bytes, cut: int) -> None:
        stream = compress((fill * length)[:length], kind)
        for data in (stream + noise, stream[: max(0, len(stream) - cut)], noise):
            try:
                out = decompress(data, cluster, kind)
            except (ValueError, zlib.error, zstandard.ZstdError):
                continue
            assert len(out) == cluster and length == cluster

    holds()
