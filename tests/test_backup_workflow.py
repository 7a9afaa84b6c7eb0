"""The complete incremental pull-backup workflow, as libvirt drives qemu, against ``pynbd daemon``.

A qcow2 disk is written by a guest-like NBD client on a writable export. Each round sets up
fleecing together with the next checkpoint bitmap in one ``transaction`` (the old way: a qcow2
overlay and ``blockdev-backup sync=none``; the new way: copy-before-write inserted with
``blockdev-insert-filter``, plus snapshot-access), the guest keeps writing, and the backup is
pulled twice: with ``pynbd backup`` and with a libnbd script such as a backup application would
run. Three rounds give a chain of a full and two incremental backups; every chain top restores to
exactly the disk at its fleecing point. The old way runs the same QMP script against
qemu-storage-daemon, which must show the same extents and data. At the end the checkpoint
bitmaps the daemon persisted in the qcow2 file are read back by qemu-img and qemu-nbd.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest

from tests.peers import PYNBD, run

MiB = 1 << 20
SIZE = 16 * MiB
GRANULARITY = 64 * 1024
ROUNDS = 3

# The pull a backup application would write with libnbd: base:allocation for a full backup; for an
# incremental one only what the bitmap marks dirty, applied on a copy of the previous backup, with
# dirty ranges that are now holes written as zeroes so that the result is exact.
LIBNBD_PULL = r"""
import json
import os
import sys

import nbd

uri, output = sys.argv[1], sys.argv[2]
bitmap = sys.argv[3] if len(sys.argv) > 3 else None
ALLOCATION = "base:allocation"
DIRTY = "qemu:dirty-bitmap:" + bitmap if bitmap else None

h = nbd.NBD()
h.add_meta_context(ALLOCATION)
if DIRTY:
    h.add_meta_context(DIRTY)
h.connect_uri(uri)
size = h.get_size()

# every context's extents over the whole disk; each reply is cut where its shortest context ends
extents = {ALLOCATION: [], DIRTY: []}
offset = 0
while offset < size:
    reply = {}
    h.block_status(size - offset, offset, lambda ctx, start, entries, err: reply.__setitem__(ctx, entries))
    end = min(size, min(offset + sum(entries[0::2]) for entries in reply.values()))
    for ctx, entries in reply.items():
        pos = offset
        for length, flags in zip(entries[0::2], entries[1::2]):
            length = min(length, end - pos)
            if length <= 0:
                break
            extents[ctx].append((pos, length, flags))
            pos += length
    offset = end


def intersect(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if lo < hi:
            out.append((lo, hi - lo, a[i][2]))
        if a[i][0] + a[i][1] == hi:
            i += 1
        if b[j][0] + b[j][1] == hi:
            j += 1
    return out


if DIRTY:
    dirty = [(pos, length, 0) for pos, length, flags in extents[DIRTY] if flags & 1]
    wanted = intersect(extents[ALLOCATION], dirty)
    fd = os.open(output, os.O_RDWR)
else:
    dirty = None
    wanted = [e for e in extents[ALLOCATION] if not e[2] & 2]  # holes and zeroes stay sparse
    fd = os.open(output, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
for pos, length, flags in wanted:
    for at in range(pos, pos + length, 4 << 20):
        n = min(4 << 20, pos + length - at)
        os.pwrite(fd, bytes(n) if flags & 2 else h.pread(n, at), at)
os.fsync(fd)
os.close(fd)
h.shutdown()
print(json.dumps({"dirty": [[pos, length] for pos, length, _ in dirty] if dirty is not None else None}))
"""


@pytest.fixture(autouse=True)
def remove_subdirectories(workdir):
    """The workdir fixture removes files only; these tests also make directories in it."""
    yield
    for child in workdir.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def clusters(ranges) -> list[list[int]]:
    """The granularity-aligned runs covering byte ranges (offset, length): what a bitmap marks."""
    marked = sorted(
        {c for offset, length in ranges for c in range(offset // GRANULARITY, -(-(offset + length) // GRANULARITY))}
    )
    runs: list[list[int]] = []
    for c in marked:
        if runs and runs[-1][0] + runs[-1][1] == c * GRANULARITY:
            runs[-1][1] += GRANULARITY
        else:
            runs.append([c * GRANULARITY, GRANULARITY])
    return runs


class Guest:
    """A guest writing through its NBD export; it remembers the ranges it touched."""

    def __init__(self, uri: str) -> None:
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.touched: list[tuple[int, int]] = []

    def apply(self, ops) -> None:
        for op, offset, length, fill in ops:
            if op == "write":
                self.h.pwrite(bytes([fill]) * length, offset)
            elif op == "zero":
                self.h.zero(length, offset)
            else:
                self.h.trim(length, offset)
            self.touched.append((offset, length))
        self.h.flush()

    def read_all(self) -> bytes:
        return b"".join(self.h.pread(MiB, offset) for offset in range(0, SIZE, MiB))

    def close(self) -> None:
        self.h.shutdown()


def batch(seed: int) -> list[tuple[str, int, int, int]]:
    """A deterministic mix of unaligned writes and cluster-aligned zeroing and trimming."""
    rng = random.Random(seed)
    ops = []
    for _ in range(10):
        offset = rng.randrange(0, SIZE - 256 * 1024, 512)
        ops.append(("write", offset, rng.randrange(1, 400) * 512, rng.randrange(1, 256)))
    for op in ("zero", "trim", "zero"):
        cluster = rng.randrange(0, SIZE // GRANULARITY - 8)
        ops.append((op, cluster * GRANULARITY, rng.randrange(1, 8) * GRANULARITY, 0))
    # and one that turns data of the previous backup into zeroes: the incremental must record it
    ops.append(
        [("zero", 1 * MiB, 256 * 1024, 0), ("trim", 8 * MiB, 128 * 1024, 0), ("zero", 3 * MiB, 64 * 1024, 0)][seed]
    )
    rng.shuffle(ops)
    return ops


def context_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    out, offset = [], 0
    while offset < SIZE:
        got = []
        h.block_status(SIZE - offset, offset, lambda ctx, start, entries, err, got=got: got.extend(entries))
        for length, flags in zip(got[0::2], got[1::2], strict=True):
            if out and out[-1][2] == flags:
                out[-1] = (out[-1][0], out[-1][1] + length, flags)
            else:
                out.append((offset, length, flags))
            offset += length
    h.shutdown()
    return out


def image_map(path: Path) -> list[dict]:
    return json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Round:
    """What one backup round showed: compared across daemons in the differential test."""

    data: str = ""
    allocation: list = field(default_factory=list)
    dirty_map: list = field(default_factory=list)
    dirty: list | None = None
    data_bytes: int = 0
    zero_bytes: int = 0


class Workflow:
    def __init__(self, start_daemon, kind: str, way: str, workdir: Path) -> None:
        self.kind, self.way, self.dir = kind, way, workdir / f"{kind}-{way}"
        self.dir.mkdir()
        self.disk = self.dir / "disk.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disk), str(SIZE)])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 4M", "-c", "write -P 0x62 8M 1M", str(self.disk)])
        discard = ",discard=unmap"  # so that qemu too frees trimmed clusters (and marks them dirty)
        self.daemon = start_daemon(
            kind,
            "--blockdev",
            f"driver=file,node-name=f0,filename={self.disk}{discard}",
            "--blockdev",
            f"driver=qcow2,node-name=d0,file=f0{discard}",
        )
        self.daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
        self.guest = Guest(self.daemon.uri("w"))
        self.raw_restore = self.dir / "libnbd.raw"
        self.rounds: list[Round] = []

    # -- QMP: one transaction for the fleecing point and the checkpoints -------------------------

    def bitmap_actions(self, k: int) -> list[dict]:
        actions = [
            {
                "type": "block-dirty-bitmap-add",
                "data": {"node": "d0", "name": f"c{k}", "persistent": True, "granularity": GRANULARITY},
            }
        ]
        if k:  # a frozen copy of the previous checkpoint: "what changed since c{k-1}"
            if self.way == "new":  # pynbd's copy primitive: one action instead of add + merge
                actions.append(
                    {
                        "type": "block-dirty-bitmap-copy",
                        "data": {"node": "d0", "name": "frozen", "source": f"c{k - 1}", "disabled": True},
                    }
                )
            else:
                actions += [
                    {
                        "type": "block-dirty-bitmap-add",
                        "data": {"node": "d0", "name": "frozen", "disabled": True, "granularity": GRANULARITY},
                    },
                    {
                        "type": "block-dirty-bitmap-merge",
                        "data": {"node": "d0", "target": "frozen", "bitmaps": [f"c{k - 1}"]},
                    },
                ]
        return actions

    def start_fleecing(self, k: int) -> None:
        d = self.daemon
        if self.way == "old":
            overlay = self.dir / f"fleece{k}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(overlay), str(SIZE)])
            d.ok(
                "blockdev-add",
                driver="qcow2",
                **{"node-name": "tmp"},
                file={"driver": "file", "filename": str(overlay)},
                backing="d0",
            )
            job = {"device": "d0", "target": "tmp", "sync": "none", "job-id": "fleecing"}
            d.ok("transaction", actions=[*self.bitmap_actions(k), {"type": "blockdev-backup", "data": job}])
            node = "tmp"
        else:
            scratch = self.dir / f"fleece{k}.raw"
            scratch.write_bytes(b"")
            with open(scratch, "r+b") as f:
                f.truncate(SIZE)
            d.ok("blockdev-add", driver="file", filename=str(scratch), **{"node-name": "scratch"})
            d.ok(
                "blockdev-add",
                driver="copy-before-write",
                file="d0",
                target="scratch",
                discard="unmap",  # pass the guest's TRIMs on (blockdev-add's default drops them, as qemu)
                **{"node-name": "cbw"},
            )
            d.ok(
                "transaction",
                actions=[*self.bitmap_actions(k), {"type": "blockdev-insert-filter", "data": {"filter": "cbw"}}],
            )
            d.ok("blockdev-add", driver="snapshot-access", file="cbw", discard="unmap", **{"node-name": "snap"})
            node = "snap"
        bitmaps = [{"node": "d0", "name": "frozen"}] if k else []
        d.ok("block-export-add", type="nbd", id="backup", **{"node-name": node}, name="backup", bitmaps=bitmaps)

    def stop_fleecing(self, k: int) -> None:
        d = self.daemon
        d.ok("block-export-del", id="backup")
        d.wait_event("BLOCK_EXPORT_DELETED")
        if self.way == "old":
            d.ok("block-job-cancel", device="fleecing")
            d.wait_event("BLOCK_JOB_CANCELLED")
            d.ok("blockdev-del", **{"node-name": "tmp"})
        else:
            d.ok("blockdev-del", **{"node-name": "snap"})
            d.ok("blockdev-remove-filter", filter="cbw")
            d.ok("blockdev-del", **{"node-name": "cbw"})
            d.ok("blockdev-del", **{"node-name": "scratch"})
        if k:
            d.ok("block-dirty-bitmap-remove", node="d0", name="frozen")

    # -- one round ---------------------------------------------------------------------------------

    def backup_round(self, k: int) -> Round:
        observed = Round()
        expected_dirty = clusters(self.guest.touched)
        at_fleecing = self.guest.read_all()  # nobody else writes: this is the disk at the fleecing point
        self.guest.touched = []
        self.start_fleecing(k)
        ops = batch(seed=k)
        # qemu drops TRIMs that reach the old way's implicit copy-before-write filter (it is opened
        # without discard=unmap), so in the old way the guest trims only between backups
        later = [op for op in ops if op[0] == "trim"] if self.way == "old" else []
        ops = [op for op in ops if op not in later]
        self.guest.apply(ops[:6])  # written after the fleecing point, before the pull
        uri = self.daemon.uri("backup")
        top = self.dir / f"backup{k}.qcow2"
        argv = [PYNBD, "backup", "full", uri, str(top), "--json"]
        if k:
            argv = [PYNBD, "backup", "incremental", uri, "--bitmap", "frozen"]
            argv += ["--base", str(self.dir / f"backup{k - 1}.qcow2"), str(top), "--json"]
        pull = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.guest.apply(ops[6:])  # ... and while it runs
        out, err = pull.communicate(timeout=120)
        assert pull.returncode == 0, err
        result = json.loads(out)

        # the same pull as a backup application would write it with libnbd
        script = self.dir / "pull.py"
        script.write_text(LIBNBD_PULL)
        libnbd = json.loads(
            run(["/usr/bin/python3", str(script), uri, str(self.raw_restore), *(["frozen"] if k else [])]).stdout
        )
        run([PYNBD, "backup", "verify", uri, str(top)])

        observed.data = sha(at_fleecing)
        observed.allocation = context_map(uri, "base:allocation")
        if k:
            observed.dirty_map = context_map(uri, "qemu:dirty-bitmap:frozen")
        self.stop_fleecing(k)
        self.guest.apply(later)

        assert sha(self.raw_restore.read_bytes()) == observed.data, f"round {k}: libnbd pull differs"
        restored = self.dir / "restored.raw"
        run(["qemu-img", "check", str(top)])
        run(["qemu-img", "convert", "-O", "raw", str(top), str(restored)])
        assert sha(restored.read_bytes()) == observed.data, f"round {k}: the chain does not restore the disk"
        if k:
            assert result["dirty"] == expected_dirty, (
                f"{self.kind}-{self.way} round {k}: dirty {result['dirty']}, written {expected_dirty}"
            )
            assert libnbd["dirty"] == expected_dirty
            assert result["zero_bytes"] >= 64 * 1024  # dirty ranges that now read as zeroes: zero clusters
            info = json.loads(run(["qemu-img", "info", "--output=json", str(top)]).stdout)
            assert info["backing-filename"] == f"backup{k - 1}.qcow2"
            assert info["backing-filename-format"] == "qcow2"
            # the incremental holds the dirty clusters (data or zero clusters) and nothing else
            own = [[e["start"], e["length"]] for e in image_map(top) if e["depth"] == 0]
            assert clusters([tuple(r) for r in own]) == expected_dirty
        else:
            assert result["dirty"] is None
            holes = [(off, n) for off, n, flags in observed.allocation if flags & 2]
            for e in image_map(top):
                if e["data"]:
                    assert not any(off < e["start"] + e["length"] and e["start"] < off + n for off, n in holes)
        observed.dirty = result["dirty"]
        observed.data_bytes, observed.zero_bytes = result["data_bytes"], result["zero_bytes"]
        return observed

    def run_all(self) -> list[Round]:
        for k in range(ROUNDS):
            self.rounds.append(self.backup_round(k))
        # what the last round's writes left in the checkpoints, to be found in the file after quit
        self.last_written = clusters(self.guest.touched)
        self.guest.close()
        assert self.daemon.stop() == 0
        return self.rounds


def persisted_bitmaps(disk: Path) -> list[dict]:
    run(["qemu-img", "check", str(disk)])  # exits non-zero on errors or leaks
    info = json.loads(run(["qemu-img", "info", "--output=json", str(disk)]).stdout)
    return info["format-specific"]["data"]["bitmaps"]


def check_persisted(flow: Workflow, start_qemu_nbd) -> list[dict]:
    bitmaps = persisted_bitmaps(flow.disk)
    assert sorted((b["name"], b["granularity"], tuple(b["flags"])) for b in bitmaps) == [
        (f"c{k}", GRANULARITY, ("auto",)) for k in range(ROUNDS)
    ]
    # the newest checkpoint holds exactly what the guest wrote after the last fleecing point
    server = start_qemu_nbd("-r", "-f", "qcow2", "-B", f"c{ROUNDS - 1}", str(flow.disk))
    dirty = context_map(server.uri, f"qemu:dirty-bitmap:c{ROUNDS - 1}")
    server.stop()
    assert [[off, n] for off, n, flags in dirty if flags] == flow.last_written
    return bitmaps


def test_pull_workflow_new_way_copy_before_write(start_daemon, start_qemu_nbd, workdir):
    """copy-before-write inserted under the live export atomically with the checkpoint (pynbd only)."""
    flow = Workflow(start_daemon, "pynbd", "new", workdir)
    rounds = flow.run_all()
    assert all(r.dirty_map for r in rounds[1:])
    check_persisted(flow, start_qemu_nbd)


def test_pull_workflow_old_way_same_as_qemu_storage_daemon(start_daemon, start_qemu_nbd, workdir):
    """The old way (overlay + blockdev-backup sync=none): the same QMP script, the same results."""
    results = {}
    for kind in ("pynbd", "qsd"):
        flow = Workflow(start_daemon, kind, "old", workdir)
        results[kind] = (flow.run_all(), check_persisted(flow, start_qemu_nbd))
    (ours, our_bitmaps), (qemus, qemu_bitmaps) = results["pynbd"], results["qsd"]
    for k, (mine, theirs) in enumerate(zip(ours, qemus, strict=True)):
        assert mine.data == theirs.data, f"round {k}: different disk contents at the fleecing point"
        assert mine.allocation == theirs.allocation, f"round {k}: base:allocation of the fleecing export"
        assert mine.dirty_map == theirs.dirty_map, f"round {k}: qemu:dirty-bitmap of the fleecing export"
        assert mine.dirty == theirs.dirty
        assert (mine.data_bytes, mine.zero_bytes) == (theirs.data_bytes, theirs.zero_bytes)
    # the same bitmaps; the order of the directory differs (qemu writes its newest bitmap first)
    assert sorted(our_bitmaps, key=lambda b: b["name"]) == sorted(qemu_bitmaps, key=lambda b: b["name"])


def test_incremental_from_a_view_limited_to_the_bitmap(start_daemon, workdir):
    """copy-before-write with ``bitmap``: the view refuses reads and block status outside the dirty
    clusters (EACCES, as qemu's), so pynbd backup asks for the bitmap alone and still restores exactly."""
    disk = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 4M", str(disk)])
    daemon = start_daemon(
        "pynbd",
        "--blockdev",
        f"driver=file,node-name=f0,filename={disk}",
        "--blockdev",
        "driver=qcow2,node-name=d0,file=f0",
    )
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "d0"}, name="w", writable=True)
    daemon.ok("block-dirty-bitmap-add", node="d0", name="c0", granularity=GRANULARITY)
    full = workdir / "full.qcow2"
    run([PYNBD, "backup", "full", daemon.uri("w"), str(full)])  # nobody writes: the disk at c0
    guest = Guest(daemon.uri("w"))
    guest.apply([("write", MiB + 100, 5000, 7), ("zero", 2 * MiB, 2 * GRANULARITY, 0), ("write", 9 * MiB, 512, 9)])
    at_fleecing = guest.read_all()
    scratch = workdir / "scratch.raw"
    with open(scratch, "wb") as f:
        f.truncate(SIZE)
    daemon.ok("blockdev-add", driver="file", filename=str(scratch), **{"node-name": "scratch"})
    # the filter takes the bitmap's content when it is inserted: fill it in the same transaction
    bitmap = {"node": "d0", "name": "since-c0"}
    daemon.ok("block-dirty-bitmap-add", **bitmap, disabled=True, granularity=GRANULARITY)
    cbw = {
        "driver": "copy-before-write",
        "node-name": "cbw",
        "file": "d0",
        "target": "scratch",
        "bitmap": bitmap,
        "discard": "unmap",
    }
    daemon.ok("blockdev-add", **cbw)
    daemon.ok(
        "transaction",
        actions=[
            {"type": "block-dirty-bitmap-merge", "data": {"node": "d0", "target": "since-c0", "bitmaps": ["c0"]}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "c0"}},
            {"type": "blockdev-insert-filter", "data": {"filter": "cbw"}},
        ],
    )
    daemon.ok("blockdev-add", driver="snapshot-access", file="cbw", discard="unmap", **{"node-name": "snap"})
    daemon.ok("block-export-add", type="nbd", id="b", **{"node-name": "snap"}, name="b", bitmaps=[bitmap])
    guest.apply([("write", MiB, 4096, 3), ("write", 2 * MiB, 4096, 4)])  # after the fleecing point
    reader = nbd.NBD()
    reader.add_meta_context("base:allocation")
    reader.connect_uri(daemon.uri("b"))
    with pytest.raises(nbd.Error) as refused:
        reader.block_status(SIZE, 0, lambda *args: 0)
    assert refused.value.errnum == errno.EPERM  # EACCES on the wire
    reader.shutdown()
    inc = workdir / "inc.qcow2"
    argv = [PYNBD, "backup", "incremental", daemon.uri("b"), "--bitmap", "since-c0", "--base", str(full), str(inc)]
    result = json.loads(run([*argv, "--json"]).stdout)
    guest.close()
    assert result["dirty"] == clusters([(MiB + 100, 5000), (2 * MiB, 2 * GRANULARITY), (9 * MiB, 512)])
    restored = workdir / "restored.raw"
    run(["qemu-img", "convert", "-O", "raw", str(inc), str(restored)])
    assert sha(restored.read_bytes()) == sha(at_fleecing)
