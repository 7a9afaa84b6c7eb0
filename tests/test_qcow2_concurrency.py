"""qcow2 metadata under concurrency: no L2 or refcount update may be lost, whatever the cache size.

Hundreds of requests run at once (``asyncio.gather``) on a node whose L2 and refcount caches hold
only a couple of tables, so that nearly every lookup evicts something another request has just
changed: allocating writes, write-zeroes and discards over shared clusters and L2 tables, with
block-status / allocation scans and flushes in between. Afterwards the image must pass the real
``qemu-img check`` (no leaks, no corruptions) and ``qemu-img compare`` must find it identical to
an in-memory model of what was written.

Requests of one batch that overlap always agree on the outcome, so the model does not depend on
the order they ran in: writes of a batch take their bytes from one pattern that depends only on
the disk offset, and write-zeroes and discards (which only ever make bytes zero) never share a
byte with a write of the same batch. Between batches everything overlaps.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pynbd.nodes.file import FileNode
from pynbd.protocol.constants import State
from pynbd.qcow2.create import CreateOptions, create_qcow2
from pynbd.qcow2.node import Qcow2Node
from tests.daemons import KINDS
from tests.peers import have, run
from tests.test_qcow2 import qemu_check

pytestmark = pytest.mark.skipif(not have("qemu-img"), reason="needs qemu-img")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PATTERN_PERIOD = 1_048_573  # a prime: a cluster that lands at the wrong offset never matches by chance


class SparseModel:
    """What the disk must read as, kept in 64 KiB chunks (the disks are gigabytes, mostly empty)."""

    CHUNK = 64 * KiB

    def __init__(self, size: int) -> None:
        self.size = size
        self.chunks: dict[int, bytearray] = {}

    def _pieces(self, offset: int, length: int):
        pos, end = offset, offset + length
        while pos < end:
            index, within = divmod(pos, self.CHUNK)
            n = min(self.CHUNK - within, end - pos)
            yield index, within, n, pos - offset
            pos += n

    def write(self, offset: int, data: bytes) -> None:
        for index, within, n, at in self._pieces(offset, len(data)):
            chunk = self.chunks.setdefault(index, bytearray(self.CHUNK))
            chunk[within : within + n] = data[at : at + n]

    def zero(self, offset: int, length: int) -> None:
        for index, within, n, _ in self._pieces(offset, length):
            chunk = self.chunks.get(index)
            if chunk is not None:
                chunk[within : within + n] = bytes(n)

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for index, within, n, at in self._pieces(offset, length):
            chunk = self.chunks.get(index)
            if chunk is not None:
                out[at : at + n] = chunk[within : within + n]
        return bytes(out)

    def save_raw(self, path: Path) -> None:
        """The model as a sparse raw file, for ``qemu-img compare``."""
        with open(path, "wb") as f:
            f.truncate(self.size)
            for index, chunk in self.chunks.items():
                f.seek(index * self.CHUNK)
                f.write(chunk[: self.size - index * self.CHUNK])


def pattern(block: bytes, offset: int, length: int) -> bytes:
    """The bytes a batch writes at ``offset``: a function of the offset alone within the batch."""
    out = bytearray()
    start = offset % len(block)
    while len(out) < length:
        take = min(length - len(out), len(block) - start)
        out += block[start : start + take]
        start = 0
    return bytes(out)


def full_clusters(offset: int, length: int, cluster_size: int, size: int) -> tuple[int, int]:
    """What a discard drops: the whole clusters inside the range (the disk's last one counts as whole)."""
    end = offset + length
    first = -(-offset // cluster_size) * cluster_size
    last = size if end == size else end // cluster_size * cluster_size
    return first, max(first, last)


def overlaps(a: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    return any(a[0] < off + n and off < a[0] + a[1] for off, n in ranges)


@dataclass
class Batch:
    """One ``asyncio.gather`` worth of requests, and the pattern its writes take bytes from."""

    block: bytes
    writes: list[tuple[int, int, bool]] = field(default_factory=list)  # offset, length, fua
    zeroes: list[tuple[int, int, bool]] = field(default_factory=list)  # offset, length, may_trim
    discards: list[tuple[int, int]] = field(default_factory=list)
    reads: list[tuple[int, int]] = field(default_factory=list)  # touched by nothing in the batch
    scans: list[tuple[str, int, int]] = field(default_factory=list)  # block_status, allocation_depth, layer_map
    flushes: int = 0

    def written(self) -> list[tuple[int, int]]:
        return [(off, n) for off, n, _ in self.writes]

    def zeroed(self) -> list[tuple[int, int]]:
        return [(off, n) for off, n, _ in self.zeroes] + self.discards


def random_batch(rng: random.Random, size: int, cluster_size: int, l2_span: int, ops: int) -> Batch:
    """``ops`` requests: most near a hot spot a few L2 tables wide (so they share clusters and
    tables), the rest anywhere on the disk (so they need tables and refcount blocks the caches
    have not got)."""
    batch = Batch(rng.randbytes(PATTERN_PERIOD))
    hot_len = min(size, 4 * l2_span)
    hot = rng.randrange(0, size - hot_len + 1) // cluster_size * cluster_size
    max_len = min(256 * KiB, 3 * l2_span)

    def a_range() -> tuple[int, int]:
        shape = rng.random()
        if shape < 0.4:
            length = rng.randrange(1, 2 * cluster_size + 1)
        elif shape < 0.7:
            length = rng.randrange(1, 5) * cluster_size
        else:
            length = rng.randrange(1, max_len + 1)
        length = min(length, size)
        if rng.random() < 0.7:
            offset = hot + rng.randrange(0, hot_len)
            if rng.random() < 0.5:
                offset -= offset % cluster_size
        else:
            offset = rng.randrange(0, size)
        offset = min(offset, size - length)
        return offset, length

    for _ in range(ops):
        kind = rng.random()
        offset, length = a_range()
        if kind < 0.55:
            if not overlaps((offset, length), batch.zeroed()):
                batch.writes.append((offset, length, rng.random() < 0.03))
        elif kind < 0.75:
            if not overlaps((offset, length), batch.written()):
                batch.zeroes.append((offset, length, rng.random() < 0.6))
        elif kind < 0.85:
            if not overlaps((offset, length), batch.written()):
                batch.discards.append((offset, length))
        elif kind < 0.93:
            what = rng.choice(["block_status", "allocation_depth", "layer_map"])
            whole = rng.random() < 0.3
            batch.scans.append((what, 0, size) if whole else (what, offset, length))
        elif kind < 0.97:
            batch.reads.append((offset, length))
        else:
            batch.flushes += 1
    touched = batch.written() + batch.zeroed()
    batch.reads = [r for r in batch.reads if not overlaps(r, touched)]
    return batch


async def run_batch(node: Qcow2Node, batch: Batch, model: SparseModel) -> None:
    """Run every request of the batch at once; check what can be checked while they run (reads
    and scans of ranges no request of the batch touches), then bring the model up to date."""
    touched = batch.written() + batch.zeroed()

    async def write(offset: int, length: int, fua: bool) -> None:
        await node.write(offset, pattern(batch.block, offset, length), fua=fua)

    async def read(offset: int, length: int) -> None:
        buf = bytearray(length)
        await node.read_into(offset, memoryview(buf))
        assert buf == model.read(offset, length), f"read of untouched {offset}+{length} differs"

    async def scan(what: str, offset: int, length: int) -> None:
        if what == "layer_map":
            runs = await node.layer_map(offset, length)
            assert sum(n for _, n, _, _ in runs) == length
            return
        extents = await getattr(node, what)(offset, length)
        assert sum(n for n, _ in extents) == length, f"{what} {offset}+{length} answered {extents}"
        if what != "block_status" or overlaps((offset, length), touched):
            return
        pos = offset
        for n, flags in extents:  # nothing written may be reported as reading as zeroes
            if flags & State.ZERO:
                assert model.read(pos, n) == bytes(n), f"data at {pos}+{n} reported as zero"
            pos += n

    requests = [write(*w) for w in batch.writes]
    requests += [node.write_zeroes(*z) for z in batch.zeroes]
    requests += [node.discard(*d) for d in batch.discards]
    requests += [read(*r) for r in batch.reads]
    requests += [scan(*s) for s in batch.scans]
    requests += [node.flush() for _ in range(batch.flushes)]
    random.Random(len(requests)).shuffle(requests)
    await asyncio.gather(*requests)

    for offset, length, _ in batch.writes:
        model.write(offset, pattern(batch.block, offset, length))
    for offset, length, _ in batch.zeroes:
        model.zero(offset, length)
    for offset, length in batch.discards:
        first, last = full_clusters(offset, length, node.cluster_size, model.size)
        model.zero(first, last - first)


async def open_tiny(path: Path) -> Qcow2Node:
    """The image with the smallest caches qemu allows (2 L2 tables, 4 refcount blocks): nearly
    every lookup evicts a table."""
    node = await Qcow2Node.open(FileNode(str(path)), filename=str(path), l2_cache_size=0, refcount_cache_size=0)
    assert (node.l2cache.max_tables, node.refcounts.max_cached_blocks) == (2, 4)
    return node


def compare_with_model(path: Path, model: SparseModel) -> None:
    """``qemu-img compare`` of the image against the model saved as a sparse raw file."""
    expected = path.with_suffix(".model.raw")
    model.save_raw(expected)
    result = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(expected), str(path)], check=False)
    expected.unlink()
    assert result.returncode == 0, f"qemu reads something else than was written:\n{result.stdout}{result.stderr}"


# (cluster size, refcount bits, disk size): each has many L2 tables, all but 64 KiB many refcount blocks
SHAPES = [
    pytest.param(512, 16, 64 * MiB, id="512B"),
    pytest.param(4096, 16, 512 * MiB, id="4KiB"),
    pytest.param(65536, 64, 4 * GiB, id="64KiB"),
]


@pytest.mark.parametrize(("cluster_size", "refcount_bits", "size"), SHAPES)
def test_concurrent_metadata_updates_survive_tiny_caches(
    workdir: Path, cluster_size: int, refcount_bits: int, size: int
) -> None:
    """Sessions (open, batches, close) of concurrent requests with the tiniest caches: the image
    stays clean for qemu and reads exactly as the model. Every batch also maps the whole disk:
    the first block status of an open image walks every refcount (metadata preallocation
    detection) while the writers allocate."""
    path = workdir / "disk.qcow2"
    create_qcow2(str(path), size, CreateOptions(cluster_size=cluster_size, refcount_bits=refcount_bits))
    model = SparseModel(size)
    rng = random.Random(cluster_size)

    async def session() -> None:
        node = await open_tiny(path)
        try:
            for _ in range(2):
                batch = random_batch(rng, size, cluster_size, node.l2_span, ops=200)
                batch.scans += [("block_status", 0, size)] * 3
                await run_batch(node, batch, model)
            for offset in rng.sample(sorted(model.chunks), min(40, len(model.chunks))):
                start = offset * model.CHUNK
                buf = bytearray(model.CHUNK)
                await node.read_into(start, memoryview(buf))
                assert buf == model.read(start, model.CHUNK), f"pynbd reads something else at {start}"
        finally:
            await node.close()

    for _ in range(4):
        asyncio.run(session())
        qemu_check(path)
        compare_with_model(path, model)


def test_any_concurrent_mix_leaves_a_clean_image(workdir: Path) -> None:
    """Property: whatever mix of overlapping requests runs at once (Hypothesis draws them, and
    shrinks a failure to a small one), with the smallest caches, the image afterwards is clean for
    qemu-img check and reads as the model."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    kinds = ["write", "write", "zero", "zero-keep", "discard", "scan", "flush"]
    request = st.tuples(st.sampled_from(kinds), st.floats(0, 1), st.integers(1, 96 * KiB))

    @hypothesis.settings(max_examples=60, deadline=None, database=None)
    @hypothesis.given(
        cluster_size=st.sampled_from([512, 4096]),
        requests=st.lists(request, min_size=1, max_size=120),
        seed=st.integers(0, 1 << 32),
    )
    def property_holds(cluster_size: int, requests: list, seed: int) -> None:
        size = 16384 * cluster_size  # 32 L2 tables of 4 KiB clusters, 256 of 512-byte ones
        batch = Batch(random.Random(seed).randbytes(PATTERN_PERIOD))
        for kind, where, length in requests:
            length = min(length, size)
            offset = int(where * (size - length))
            if kind == "write" and not overlaps((offset, length), batch.zeroed()):
                batch.writes.append((offset, length, False))
            elif kind.startswith("zero") and not overlaps((offset, length), batch.written()):
                batch.zeroes.append((offset, length, kind == "zero"))
            elif kind == "discard" and not overlaps((offset, length), batch.written()):
                batch.discards.append((offset, length))
            elif kind == "scan":
                batch.scans.append(("block_status", offset, length))
            elif kind == "flush":
                batch.flushes += 1
        path = workdir / "property.qcow2"
        create_qcow2(str(path), size, CreateOptions(cluster_size=cluster_size))
        model = SparseModel(size)

        async def go() -> None:
            node = await open_tiny(path)
            try:
                await run_batch(node, batch, model)
            finally:
                await node.close()

        asyncio.run(go())
        qemu_check(path)
        compare_with_model(path, model)

    property_holds()


# -- the crash-safe order, checked on the sequence of writes the image file saw ---------------------


class RecordingFile(FileNode):
    """The image file, also noting when each write, flush and discard of the qcow2 node above it
    starts and completes (what a disk may lose on power failure follows from that order)."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename)
        self.events: list[tuple] = []

    async def write(self, offset: int, data, fua: bool = False) -> None:
        write_id = len(self.events)
        self.events.append(("write", offset, bytes(data), write_id))
        await super().write(offset, data, fua)
        self.events.append(("written", write_id))

    async def discard(self, offset: int, length: int) -> None:
        self.events.append(("discard", offset, length))  # the bytes may be gone from now on
        await super().discard(offset, length)

    async def flush(self) -> None:
        self.events.append(("flush",))
        await super().flush()
        self.events.append(("flushed",))


class OrderChecker:
    """Replays a :class:`RecordingFile` trace and names every write that a power failure could turn
    into a corrupt image or into data from the wrong place:

    - an L2 entry reaching the disk before the refcount of the cluster it names is flushed;
    - an L2 entry naming a new cluster before data was written to that cluster;
    - an L1 entry naming an L2 table before the table is written and flushed;
    - a refcount dropping to 0 (or the cluster being discarded) while a flushed L2 entry names it.

    The image's layout comes from the image itself (refcount blocks and L2 tables never move)."""

    def __init__(self, before: bytes, after: bytes) -> None:
        from pynbd.qcow2.layout import OFFSET_MASK, decode_header, table_from_bytes
        from pynbd.qcow2.refcount import decode_block

        self.mask, self.decode_table, self.decode_block = OFFSET_MASK, table_from_bytes, decode_block
        header = decode_header(after[:65536])
        self.cs, self.bits = header.cluster_size, header.refcount_bits
        self.per_block = self.cs * 8 // self.bits
        reftable_at = header.refcount_table_offset
        reftable = table_from_bytes(after[reftable_at : reftable_at + header.refcount_table_clusters * self.cs])
        self.block_offsets = {offset & self.mask: index for index, offset in enumerate(reftable) if offset}
        l1 = table_from_bytes(after[header.l1_table_offset : header.l1_table_offset + header.l1_size * 8])
        self.l1_offset, self.l1_size = header.l1_table_offset, header.l1_size
        self.l2_offsets = {entry & self.mask for entry in l1 if entry & self.mask}
        # what is on disk for certain: the image as it was before the node opened it
        self.durable_blocks = {
            off: decode_block(before[off : off + self.cs], self.bits) for off in self.block_offsets if off < len(before)
        }
        self.written_blocks: dict[int, object] = {}
        self.durable_l2: dict[int, list[int]] = {}
        self.written_l2: dict[int, list[int]] = {}
        self.has_data: set[int] = set()
        self.pending: dict[int, tuple[int, bytes]] = {}  # writes started, not yet completed
        self.problems: list[str] = []

    def refcount(self, cluster: int) -> int:
        block_index = cluster // self.per_block
        for offset, index in self.block_offsets.items():
            if index == block_index:
                block = self.durable_blocks.get(offset)
                return block[cluster % self.per_block] if block is not None else 0
        return 0

    def referenced(self) -> set[int]:
        return {entry & self.mask for table in self.durable_l2.values() for entry in table if entry & self.mask}

    def check(self, events: list[tuple]) -> list[str]:
        flush_snapshot = None
        for event in events:
            kind = event[0]
            if kind == "write":
                self.before_write(event[1], event[2])
                self.pending[event[3]] = event[1], event[2]
            elif kind == "written":
                self.after_write(*self.pending.pop(event[1]))
            elif kind == "discard":
                first, count = event[1] // self.cs, event[2] // self.cs
                gone = set(range(first, first + count))
                named = gone & self.referenced()
                if named:
                    self.problems.append(f"clusters {sorted(named)[:4]} discarded while a flushed L2 entry names them")
                self.has_data -= gone
            elif kind == "flush":
                flush_snapshot = (dict(self.written_blocks), dict(self.written_l2))
            elif kind == "flushed":
                self.durable_blocks.update(flush_snapshot[0])
                self.durable_l2.update(flush_snapshot[1])
        return self.problems

    def before_write(self, offset: int, data: bytes) -> None:
        if offset in self.l2_offsets and len(data) == self.cs:
            previous = self.written_l2.get(offset, [0] * (self.cs // 8))
            for index, entry in enumerate(self.decode_table(data)):
                host = entry & self.mask
                if not host or entry & (1 << 62):  # none, or compressed
                    continue
                if not self.refcount(host // self.cs):
                    self.problems.append(f"L2 {offset:#x}[{index}] names {host:#x} before its refcount is flushed")
                if host != previous[index] & self.mask and host // self.cs not in self.has_data:
                    self.problems.append(f"L2 {offset:#x}[{index}] names {host:#x} before data was written there")
        elif self.l1_offset <= offset < self.l1_offset + self.l1_size * 8:
            for entry in self.decode_table(data):
                table = entry & self.mask
                if table and (table not in self.durable_l2 or not self.refcount(table // self.cs)):
                    self.problems.append(f"L1 names L2 table {table:#x} before the table is flushed")
        elif offset in self.block_offsets and len(data) == self.cs:
            counts = self.decode_block(data, self.bits)
            first = self.block_offsets[offset] * self.per_block
            freed = {first + i for i, count in enumerate(counts) if not count}
            named = freed & self.referenced()
            if named:
                self.problems.append(f"refcount of {sorted(named)[:4]} drops to 0 while a flushed L2 entry names it")

    def after_write(self, offset: int, data: bytes) -> None:
        if offset in self.l2_offsets and len(data) == self.cs:
            self.written_l2[offset] = list(self.decode_table(data))
        elif offset in self.block_offsets and len(data) == self.cs:
            self.written_blocks[offset] = self.decode_block(data, self.bits)
        else:
            first, last = offset // self.cs, (offset + len(data) - 1) // self.cs
            self.has_data.update(range(first, last + 1))


@pytest.mark.parametrize(("cluster_size", "refcount_bits", "size"), SHAPES[:2])
def test_metadata_reaches_the_file_in_crash_safe_order(
    workdir: Path, cluster_size: int, refcount_bits: int, size: int
) -> None:
    """With the tiniest caches, evictions write tables and refcount blocks in the middle of requests;
    the order of everything the file saw must still leave only leaks after a power failure at any
    moment: refcounts flushed before the L2 entries naming their clusters, data before the L2
    entries naming it, L2 tables flushed before the L1 entries naming them, and a reference dropped
    (and flushed) before its refcount."""
    path = workdir / "disk.qcow2"
    create_qcow2(str(path), size, CreateOptions(cluster_size=cluster_size, refcount_bits=refcount_bits))
    before = path.read_bytes()
    model = SparseModel(size)
    rng = random.Random(cluster_size + 1)
    file = RecordingFile(str(path))

    async def session() -> None:
        node = await Qcow2Node.open(file, filename=str(path), l2_cache_size=0, refcount_cache_size=0)
        try:
            for _ in range(2):
                await run_batch(node, random_batch(rng, size, cluster_size, node.l2_span, ops=150), model)
        finally:
            await node.close()

    asyncio.run(session())
    qemu_check(path)
    compare_with_model(path, model)
    problems = OrderChecker(before, path.read_bytes()).check(file.events)
    assert not problems, f"{len(problems)} writes out of the crash-safe order, e.g.:\n" + "\n".join(problems[:10])


def test_refcounts_an_eviction_wrote_are_flushed_before_the_l2_entries(workdir: Path) -> None:
    """The first block status of an open image walks every refcount block (metadata-preallocation
    detection); with a 4-block cache that walk evicts, and so writes, the block a write just
    changed. That early write is not flushed: the flush that follows must still put a barrier
    between it and the L2 table naming the new cluster, though no refcount block is dirty by then."""
    path = workdir / "disk.qcow2"
    create_qcow2(str(path), 8 * MiB, CreateOptions(cluster_size=512))

    async def fill() -> None:  # 1 MiB of data: eight refcount blocks' worth of clusters
        node = await Qcow2Node.open(FileNode(str(path)), filename=str(path))
        await node.write(0, b"\x11" * MiB)
        await node.close()

    asyncio.run(fill())
    before = path.read_bytes()
    file = RecordingFile(str(path))

    async def go() -> list:
        node = await Qcow2Node.open(file, filename=str(path), l2_cache_size=0, refcount_cache_size=0)
        await node.write(4 * MiB, b"\x22" * 512)
        extents = await node.block_status(0, node.size)
        await node.flush()
        await node.close()
        return extents

    assert asyncio.run(go())[:3] == [(MiB, 0), (3 * MiB, 3), (512, 0)]
    problems = OrderChecker(before, path.read_bytes()).check(file.events)
    assert not problems, problems
    qemu_check(path)


# -- the cache options through the daemon, against qemu-storage-daemon --------------------------------

CACHE_OPTION_REFUSALS = [
    (
        {"cache-size": MiB, "l2-cache-size": 512 * KiB, "refcount-cache-size": 512 * KiB},
        "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
    ),
    ({"cache-size": MiB, "l2-cache-size": 2 * MiB}, "l2-cache-size may not exceed cache-size"),
    ({"cache-size": MiB, "refcount-cache-size": 2 * MiB}, "refcount-cache-size may not exceed cache-size"),
    (
        {"l2-cache-entry-size": 1000},
        "L2 cache entry size must be a power of two between 512 and the cluster size (65536)",
    ),
    (
        {"l2-cache-entry-size": 128 * KiB},
        "L2 cache entry size must be a power of two between 512 and the cluster size (65536)",
    ),
]
CACHE_OPTIONS_ACCEPTED = [
    {"cache-size": 1},
    {"cache-size": 4 * MiB, "l2-cache-size": MiB},
    {"cache-size": 4 * MiB, "refcount-cache-size": MiB},
    {"l2-cache-size": 1 << 40, "refcount-cache-size": 0},
    {"l2-cache-entry-size": 64 * KiB},
]


@pytest.mark.parametrize("kind", KINDS)
def test_cache_size_options_are_checked_as_qemu_checks_them(kind, start_daemon, workdir) -> None:
    path = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"])
    daemon = start_daemon(kind, nbd=False)
    file = {"driver": "file", "filename": str(path)}
    for options, message in CACHE_OPTION_REFUSALS:
        assert daemon.fails("blockdev-add", driver="qcow2", **{"node-name": "q"}, file=file, **options) == message
    assert daemon.ok("query-named-block-nodes") == []  # nothing of the refused nodes is left
    for options in CACHE_OPTIONS_ACCEPTED:
        daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "q"}, file=file, **options)
        daemon.ok("blockdev-del", **{"node-name": "q"})
    if kind == "pynbd":  # qemu caches 4 KiB slices of the tables; pynbd caches whole tables only
        refused = daemon.fails(
            "blockdev-add", driver="qcow2", **{"node-name": "q"}, file=file, **{"l2-cache-entry-size": 4096}
        )
        assert "only the cluster size (65536)" in refused


def issue_over_nbd(h, batch: Batch, model: SparseModel) -> None:
    """The batch's requests all in flight at once on one NBD connection; reads and block status
    of untouched ranges are checked against the model as they complete."""
    import nbd

    touched = batch.written() + batch.zeroed()
    checks: list = []
    for offset, length, fua in batch.writes:
        h.aio_pwrite(pattern(batch.block, offset, length), offset, flags=nbd.CMD_FLAG_FUA if fua else 0)
    for offset, length, may_trim in batch.zeroes:
        h.aio_zero(length, offset, flags=0 if may_trim else nbd.CMD_FLAG_NO_HOLE)
    for offset, length in batch.discards:
        h.aio_trim(length, offset)
    for offset, length in batch.reads:
        buf = nbd.Buffer(length)
        h.aio_pread(buf, offset)
        checks.append((buf, offset, length))
    for _, offset, length in batch.scans:
        if not overlaps((offset, length), touched):

            def extents(context, start, entries, err, request_end=offset + length):
                pos = start
                for i in range(0, len(entries), 2):
                    if entries[i + 1] & State.ZERO:
                        end = min(pos + entries[i], request_end)
                        assert model.read(pos, end - pos) == bytes(end - pos), f"data at {pos} reported as zero"
                    pos += entries[i]
                return 0

            h.aio_block_status(length, offset, extents)
    for _ in range(batch.flushes):
        h.aio_flush()
    assert h.aio_in_flight() > 1
    while h.aio_in_flight():
        h.poll(-1)
    for buf, offset, length in checks:
        assert buf.to_bytearray() == model.read(offset, length), f"read of untouched {offset}+{length} differs"
    for offset, length, _ in batch.writes:
        model.write(offset, pattern(batch.block, offset, length))
    for offset, length, _ in batch.zeroes:
        model.zero(offset, length)
    for offset, length in batch.discards:
        first, last = full_clusters(offset, length, 512, model.size)
        model.zero(first, last - first)


@pytest.mark.parametrize("kind", KINDS)
def test_smallest_caches_serve_many_requests_at_once(kind, start_daemon, workdir) -> None:
    """blockdev-add with l2-cache-size=0 and refcount-cache-size=0 (2 L2 tables, 4 refcount blocks)
    over an image of 512-byte clusters, and hundreds of NBD requests in flight: the image is clean
    for qemu-img check and reads as the model, as it does with qemu-storage-daemon."""
    import nbd

    size = 32 * MiB
    path = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), str(size)])
    daemon = start_daemon(kind)
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "q", "l2-cache-size": 0, "refcount-cache-size": 0, "discard": "unmap"},
        file={"driver": "file", "filename": str(path)},
    )
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "q"}, name="disk", writable=True)
    model = SparseModel(size)
    rng = random.Random(7)
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(daemon.uri("disk"))
    try:
        for _ in range(3):
            issue_over_nbd(h, random_batch(rng, size, 512, 512 * 64, ops=300), model)
        h.shutdown()
    finally:
        del h
    assert daemon.stop() == 0
    qemu_check(path)
    compare_with_model(path, model)


# qemu writes an L1 entry as soon as it allocates the table, not on flush: that case is pynbd's own
FAILED_WRITES = [
    pytest.param(kind, what, sector, id=f"{what}-{kind}")
    for what, sector in (("L2 table", 0x40000 // 512), ("refcount block", 0x20000 // 512), ("L1 table", 0x30000 // 512))
    for kind in KINDS
    if not (what == "L1 table" and kind == "qsd")
]


@pytest.mark.parametrize(("kind", "what", "sector"), FAILED_WRITES)
def test_a_failed_metadata_write_is_retried_by_the_next_flush(kind, what, sector, start_daemon, workdir) -> None:
    """blkdebug fails the first write of one piece of metadata (in qemu-img's layout: refcount
    block in cluster 2, L1 in 3, the first L2 table in 4): the flush that wrote it fails, the
    piece stays dirty, and the next flush writes it, so nothing is lost."""
    import nbd

    path = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"])
    daemon = start_daemon(kind)
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "q"},
        file={
            "driver": "blkdebug",
            "image": {"driver": "file", "filename": str(path)},
            "inject-error": [{"event": "write_aio", "errno": 5, "sector": sector, "once": True}],
        },
    )
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "q"}, name="disk", writable=True)
    data = random.Random(3).randbytes(3 * 65536)
    h = nbd.NBD()
    h.connect_uri(daemon.uri("disk"))
    try:
        h.pwrite(data, 0)
        with pytest.raises(nbd.Error) as failed:
            h.flush()
        assert failed.value.errno == "EIO", f"{what}: {failed.value}"
        h.flush()
        assert h.pread(len(data), 0) == data
        h.shutdown()
    finally:
        del h
    assert daemon.stop() == 0
    qemu_check(path)
    model = SparseModel(64 * MiB)
    model.write(0, data)
    compare_with_model(path, model)
