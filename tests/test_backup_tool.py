"""``pynbd backup`` as a tool: chains against qemu-nbd -B and pynbd serve -B, restores, verify, errors.

The complete QMP workflow (fleecing, checkpoints, a writing guest) is in test_backup_workflow.py;
here the exports are plain images with persistent bitmaps that qemu-io changed, which is what
virtnbdbackup's offline mode backs up.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.peers import PYNBD, run

MiB = 1 << 20
SIZE = 16 * MiB


def backup(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([PYNBD, "backup", *args], check=check)


def backup_json(*args: str) -> dict:
    return json.loads(backup(*args, "--json").stdout)


def qemu_io(image: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    run([*argv, str(image)])


def raw_of(image: Path, workdir: Path) -> bytes:
    """The image's guest-visible content, as qemu-img convert restores it."""
    out = workdir / f"{image.stem}-restored.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image), str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


def runs(ranges: list[tuple[int, int]], granularity: int) -> list[list[int]]:
    """Granularity-aligned, merged runs covering (offset, length) ranges."""
    marked = sorted({c for off, n in ranges for c in range(off // granularity, -(-(off + n) // granularity))})
    out: list[list[int]] = []
    for c in marked:
        if out and out[-1][0] + out[-1][1] == c * granularity:
            out[-1][1] += granularity
        else:
            out.append([c * granularity, granularity])
    return out


def data_ranges(image: Path) -> list[list[int]]:
    """Where ``qemu-img map`` finds data, merged (clusters written concurrently are not in order)."""
    out: list[list[int]] = []
    for e in json.loads(run(["qemu-img", "map", "--output=json", str(image)]).stdout):
        if not e["data"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"]])
    return out


@pytest.fixture
def disk(workdir: Path) -> Path:
    path = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)])
    qemu_io(path, "write -P 0x61 0 4M", "write -P 0x62 8M 1M", "write -P 0x63 15M 512k")
    return path


def serve(kind: str, start_qemu_nbd, start_pynbd, image: Path, *bitmaps: str):
    """A read-only export of ``image`` with ``bitmaps``, by qemu-nbd or pynbd serve."""
    options = ["-r", "-f", "qcow2"]
    for name in bitmaps:
        options += ["-B", name]
    if kind == "qemu-nbd":
        return start_qemu_nbd(*options, str(image))
    return start_pynbd(*options, str(image))


# changes after each checkpoint: unaligned writes (4 KiB bitmap, 64 KiB clusters: partial-cluster
# copy-on-write from the backing file), data turned into zeroes, and fresh data
CHANGES = [
    [("write -P 0x71 100k 3k", 100 * 1024, 3 * 1024), ("write -z 8M 128k", 8 * MiB, 128 * 1024),
     ("write -P 0x72 12M 1M", 12 * MiB, MiB)],
    [("write -P 0x73 1M 70k", MiB, 70 * 1024), ("write -z -u 15M 64k", 15 * MiB, 64 * 1024),
     ("write -P 0x74 12M 4k", 12 * MiB, 4096)],
]  # fmt: skip


@pytest.mark.parametrize("server", ["qemu-nbd", "pynbd"])
def test_chain_of_three_restores_exactly(server, disk, workdir, start_qemu_nbd, start_pynbd):
    """full + 2 incrementals from ``-B`` exports; each chain top restores to the disk at its time."""
    states = []
    export = serve(server, start_qemu_nbd, start_pynbd, disk)
    full = backup_json("full", export.uri, str(workdir / "b0.qcow2"))
    export.stop()
    states.append(raw_of(disk, workdir))
    assert full["kind"] == "full" and full["backing"] is None and full["dirty"] is None
    assert full["data_bytes"] == 4 * MiB + MiB + MiB // 2  # the holes were not read
    for k, changes in enumerate(CHANGES, start=1):
        run(["qemu-img", "bitmap", "--add", "-g", "4096", str(disk), f"c{k}"])
        qemu_io(disk, *(command for command, _, _ in changes))
        states.append(raw_of(disk, workdir))
        export = serve(server, start_qemu_nbd, start_pynbd, disk, f"c{k}")
        top = workdir / f"b{k}.qcow2"
        base = str(workdir / f"b{k - 1}.qcow2")
        result = backup_json("incremental", export.uri, "--bitmap", f"c{k}", "--base", base, str(top))
        run([PYNBD, "backup", "verify", export.uri, str(top)])
        export.stop()
        assert result["dirty"] == runs([(off, n) for _, off, n in changes], 4096)
        assert result["backing"] == f"b{k - 1}.qcow2"
        assert result["zero_bytes"] == 64 * 1024 * (2 if k == 1 else 1)  # the zeroed ranges
    run(["qemu-img", "check", str(workdir / "b2.qcow2")])
    for k, state in enumerate(states):
        assert raw_of(workdir / f"b{k}.qcow2", workdir) == state, f"chain top b{k} does not restore the disk"
    # the other way to restore: serve the chain top and pull it with pynbd copy
    served = start_pynbd("-r", "-f", "qcow2", str(workdir / "b2.qcow2"))
    run([PYNBD, "copy", served.uri, str(workdir / "restored.raw")])
    assert (workdir / "restored.raw").read_bytes() == states[-1]


def test_full_backup_keeps_holes_sparse_and_reports_progress(disk, workdir, start_qemu_nbd):
    export = start_qemu_nbd("-r", "-f", "qcow2", str(disk))
    out = workdir / "full.qcow2"
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [PYNBD, "backup", "full", export.uri, str(out), "--progress-fd", str(write_end), "-R", "4", "-C", "1"],
            pass_fds=(write_end,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        os.close(write_end)
        with os.fdopen(read_end) as progress:
            lines = progress.read().split()
        assert proc.wait(60) == 0, proc.stderr.read()
        assert "full backup of 16.0 MiB" in proc.stdout.read()
    finally:
        proc.stdout.close()
        proc.stderr.close()
    assert lines[0] == f"0/{SIZE}" and lines[-1] == f"{SIZE}/{SIZE}"
    assert data_ranges(out) == [[0, 4 * MiB], [8 * MiB, MiB], [15 * MiB, MiB // 2]]


def test_verify_reports_the_first_differing_range(disk, workdir, start_qemu_nbd, start_pynbd):
    out = workdir / "full.qcow2"
    export = start_qemu_nbd("-r", "-f", "qcow2", str(disk))
    backup("full", export.uri, str(out))
    assert "matches the export" in backup("verify", export.uri, str(out)).stdout
    export.stop()
    qemu_io(disk, "write -P 0xee 5000 100", "write -P 0xee 9M 4k")  # both ends changed afterwards
    export = start_qemu_nbd("-r", "-f", "qcow2", str(disk))
    result = backup("verify", export.uri, str(out), check=False)
    assert result.returncode == 1
    assert "mismatch at bytes [5000, 5120)" in result.stdout
    report = json.loads(backup("verify", export.uri, str(out), "--json", check=False).stdout)
    assert report["equal"] is False and report["mismatch"] == [5000, 5120]
    # a different size is a mismatch too
    small = start_pynbd("--memory", "8M")
    result = backup("verify", small.uri, str(out), check=False)
    assert result.returncode == 1 and "size mismatch" in result.stdout
    # and an error is not a mismatch
    result = backup("verify", f"nbd+unix:///?socket={workdir}/nothing.sock", str(out), check=False)
    assert result.returncode == 2 and result.stderr.startswith("pynbd backup: ")


def test_refuses_to_overwrite_and_leaves_no_partial_output(disk, workdir, start_qemu_nbd, start_nbdkit):
    run(["qemu-img", "bitmap", "--add", str(disk), "b0"])
    export = start_qemu_nbd("-r", "-f", "qcow2", "-B", "b0", str(disk))
    full = workdir / "full.qcow2"
    full.write_bytes(b"precious")
    result = backup("full", export.uri, str(full), check=False)
    assert result.returncode == 1 and "already exists" in result.stderr
    assert full.read_bytes() == b"precious"
    backup("full", export.uri, str(full), "--force")
    assert raw_of(full, workdir) == raw_of(disk, workdir)

    inc = workdir / "inc.qcow2"
    result = backup("incremental", export.uri, "--bitmap", "nope", "--base", str(full), str(inc), check=False)
    assert result.returncode == 1 and "qemu:dirty-bitmap:nope" in result.stderr
    assert not inc.exists()
    other = workdir / "other.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "8M"])
    result = backup("incremental", export.uri, "--bitmap", "b0", "--base", str(other), str(inc), check=False)
    assert result.returncode == 1 and "8388608 bytes" in result.stderr
    assert not inc.exists()
    result = backup("incremental", export.uri, "--bitmap", "b0", "--base", str(full), str(full), check=False)
    assert result.returncode == 1 and "base of the backup itself" in result.stderr

    # the server fails reads half way: the half-written backup is removed, not left looking valid
    raw = workdir / "disk.raw"
    raw.write_bytes(raw_of(disk, workdir))
    failing = start_nbdkit("--filter=error", "file", str(raw), "error-pread-rate=100%", "error-pread=EIO")
    result = backup("full", failing.uri, str(workdir / "broken.qcow2"), check=False)
    assert result.returncode == 1 and "pynbd backup:" in result.stderr
    assert not (workdir / "broken.qcow2").exists()


def test_server_without_block_status_and_odd_sizes(workdir, start_nbdkit):
    raw = workdir / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x5a" * 65536)
    plain = start_nbdkit("--no-sr", "file", str(raw))  # no structured replies: no base:allocation
    out = workdir / "plain.qcow2"
    result = backup_json("full", plain.uri, str(out))
    assert result["data_bytes"] == MiB  # everything was read; only the request with data was written
    assert data_ranges(out) == [[MiB, MiB]]
    assert raw_of(out, workdir) == raw.read_bytes()
    assert "matches the export" in backup("verify", plain.uri, str(out)).stdout
    odd = start_nbdkit("memory", "1000")
    result = backup("full", odd.uri, str(workdir / "odd.qcow2"), check=False)
    assert result.returncode == 1 and "not a multiple of 512" in result.stderr


def test_tls_export(disk, workdir, start_qemu_nbd, tls_certs):
    creds = f"tls-creds-x509,id=tls0,endpoint=server,dir={tls_certs.dir}"
    export = start_qemu_nbd("-r", "-f", "qcow2", "--object", creds, "--tls-creds", "tls0", str(disk))
    uri = f"nbds+unix:///?socket={export.socket_path}&tls-certificates={tls_certs.dir}"
    out = workdir / "full.qcow2"
    backup("full", uri, str(out))
    assert "matches the export" in backup("verify", uri, str(out)).stdout
    result = backup("full", export.uri, str(workdir / "plain.qcow2"), check=False)  # no TLS: refused
    assert result.returncode == 1
