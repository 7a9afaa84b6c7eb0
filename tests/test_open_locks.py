"""Image locks and backing loops for ``pynbd serve`` and ``pynbd img``, side by side with qemu-nbd
and qemu-img on the same images in the same situations.

Both tools open images through pynbd/daemon/open.py, the daemon's own blockdev path: an image
another process writes is refused with qemu's messages (nothing written), ``-U`` opens it for
reading, a running ``pynbd serve`` keeps qemu's tools away as qemu-nbd would, and a backing chain
that loops is refused the same way by serve, img and the daemon.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.peers import PYNBD, have, run

pytestmark = pytest.mark.skipif(
    not all(have(p) for p in ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdsh")),
    reason="needs qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon and nbdsh",
)

MiB = 1 << 20
SIZE = 8 * MiB


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def as_qemu(stderr: str, ours: str, theirs: str) -> str:
    return stderr.replace(f"{ours}:", f"{theirs}:")


def make_image(workdir: Path, fmt: str, name: str = "disk") -> Path:
    path = workdir / f"{name}.{fmt}"
    run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(SIZE)])
    run(["qemu-io", "-f", fmt, "-c", "write -P 0x11 0 1M", str(path)])
    return path


def hold_with_qsd(start_daemon, path: Path, fmt: str):
    """qemu-storage-daemon with ``path`` open read-write and exported writable as "disk"."""
    return start_daemon(
        "qsd",
        "--blockdev",
        f"driver=file,filename={path},node-name=f0",
        "--blockdev",
        f"driver={fmt},file=f0,node-name=disk",
        "--export",
        "type=nbd,id=e0,node-name=disk,writable=on",
    )


def qemu_write(uri: str, pattern: int, offset: int, length: int) -> None:
    """Write through an NBD export and flush: data the holder has acknowledged and made durable."""
    run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", "-c", "flush", uri])


def serve_refusal(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``pynbd serve`` in the foreground: it must give up at once (the timeout is a safety net)."""
    return run([PYNBD, "serve", "-k", str(workdir / "refused.sock"), *args], check=False, timeout=60)


def qemu_nbd_refusal(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["qemu-nbd", "-k", str(workdir / "refused-qemu.sock"), *args], check=False, timeout=60)


# -- another process writes the image ----------------------------------------------------------------


def test_serve_refuses_an_image_qemu_writes(workdir: Path, start_daemon) -> None:
    """The issue's case: qemu-storage-daemon writes disk.qcow2; ``pynbd serve`` must not start.

    (Only qcow2: qemu lets a second writer into a raw image, there being no metadata to protect,
    and pynbd, taking the same permissions, does too.)"""
    path = make_image(workdir, "qcow2")
    holder = hold_with_qsd(start_daemon, path, "qcow2")
    qemu_write(holder.uri("disk"), 0x5A, 2 * MiB, MiB)  # acknowledged by qemu: must survive
    before = digest(path)
    for extra in ([], ["-r"], ["-f", "qcow2"]):
        ours = serve_refusal(workdir, *extra, str(path))
        theirs = qemu_nbd_refusal(workdir, *extra, str(path))
        assert theirs.returncode == 1 and "lock" in theirs.stderr, theirs.stderr
        assert ours.returncode == theirs.returncode
        assert as_qemu(ours.stderr, "pynbd serve", "qemu-nbd") == theirs.stderr
    assert digest(path) == before  # nothing written by the refused servers
    holder.stop()
    assert run(["qemu-img", "check", str(path)]).returncode == 0
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", f"read -P 0x5a {2 * MiB} {MiB}", str(path)])


def test_serve_read_only_force_share_serves_an_image_qemu_writes(workdir: Path, start_daemon, start_pynbd) -> None:
    path = make_image(workdir, "qcow2")
    holder = hold_with_qsd(start_daemon, path, "qcow2")
    qemu_write(holder.uri("disk"), 0x5A, 2 * MiB, MiB)
    before = digest(path)
    server = start_pynbd("-r", "-U", str(path))
    data = run(["nbdsh", "-u", server.uri, "-c", f"import sys; sys.stdout.buffer.write(h.pread({MiB}, {2 * MiB}))"])
    assert data.stdout == "\x5a" * MiB
    assert run(["nbdsh", "-u", server.uri, "-c", "print(h.is_read_only())"]).stdout.strip() == "True"
    server.stop()
    assert digest(path) == before

    # writable and force-shared: refused with qemu's reason (qemu-nbd says it for --image-opts)
    ours = serve_refusal(workdir, "-U", str(path))
    theirs = qemu_nbd_refusal(workdir, "--image-opts", f"driver=qcow2,file.filename={path},force-share=on")
    reason = "force-share=on can only be used with read-only images"
    assert theirs.returncode == 1 and reason in theirs.stderr
    assert ours.returncode == 1 and ours.stderr == f"pynbd serve: Failed to blk_new_open '{path}': {reason}\n"
    assert digest(path) == before


IMG_COMMANDS = [
    ("check", "{img}"),
    ("check", "-U", "{img}"),
    ("check", "-r", "leaks", "{img}"),
    ("check", "-r", "all", "-U", "{img}"),
    ("info", "{img}"),
    ("info", "-U", "{img}"),
    ("info", "-U", "--backing-chain", "{img}"),
    ("map", "--output=json", "{img}"),
    ("map", "-U", "--output=json", "{img}"),
    ("bitmap", "--add", "{img}", "b0"),
    ("commit", "{img}"),
    ("compare", "{img}", "{other}"),
    ("compare", "-U", "{img}", "{other}"),
    ("convert", "-O", "raw", "{img}", "{out}"),
    ("convert", "-U", "-O", "raw", "{img}", "{out}"),
    ("convert", "-n", "-O", "{fmt}", "{other}", "{img}"),
]


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_img_refuses_where_qemu_img_refuses(workdir: Path, start_daemon, fmt: str) -> None:
    """Every ``pynbd img`` command on an image qemu-storage-daemon writes: refused (with qemu-img's
    message) exactly where qemu-img refuses, run where it runs, and the image never touched."""
    path = make_image(workdir, fmt)
    other = make_image(workdir, fmt, "other")
    holder = hold_with_qsd(start_daemon, path, fmt)
    qemu_write(holder.uri("disk"), 0x5A, 2 * MiB, MiB)
    before = digest(path)
    outcomes = []
    for command in IMG_COMMANDS:
        if fmt == "raw" and "-n" in command:
            continue  # qemu lets a second writer into a raw image: this convert would write it
        results = []
        for tool in ([PYNBD, "img"], ["qemu-img"]):
            out = workdir / f"out-{len(outcomes)}-{len(results)}.raw"
            args = [a.format(img=path, other=other, out=out, fmt=fmt) for a in command]
            results.append((run([*tool, *args], check=False, timeout=120), out))
        (ours, our_out), (theirs, their_out) = results
        outcomes.append((command, theirs.returncode))
        assert ours.returncode == theirs.returncode, (command, ours.stderr, theirs.stderr)
        if "Failed to get" in theirs.stderr or "force-share" in theirs.stderr:  # refused: same words
            assert as_qemu(ours.stderr, "pynbd img", "qemu-img") == theirs.stderr, command
        if command[0] == "convert" and theirs.returncode == 0 and their_out.exists():
            assert our_out.read_bytes() == their_out.read_bytes(), command
        assert digest(path) == before, command
    refused = {" ".join(c) for c, rc in outcomes if rc != 0}
    if fmt == "qcow2":  # the qcow2 metadata lock: only -U gets in
        assert refused >= {"check {img}", "info {img}", "map --output=json {img}", "bitmap --add {img} b0"}
        assert "check -U {img}" not in refused and "info -U {img}" not in refused
    else:  # a raw image: qemu lets readers in, but not convert (it unshares write on its source)
        assert "info {img}" not in refused and "map --output=json {img}" not in refused
        assert "convert -O raw {img} {out}" in refused and "convert -U -O raw {img} {out}" not in refused
    holder.stop()
    if fmt == "qcow2":
        assert run(["qemu-img", "check", str(path)]).returncode == 0
    run(["qemu-io", "-f", fmt, "-c", f"read -P 0x5a {2 * MiB} {MiB}", str(path)])


# -- pynbd serve keeps others away ---------------------------------------------------------------------


PROBES = [
    ["qemu-img", "check", "{img}"],
    ["qemu-img", "info", "{img}"],
    ["qemu-img", "check", "-U", "{img}"],
    ["qemu-img", "bitmap", "--add", "{img}", "b0"],
    ["qemu-nbd", "-k", "{sock}", "{img}"],
    ["qemu-io", "-U", "-r", "-c", "read -P 0x11 0 1M", "{img}"],
    [PYNBD, "serve", "-k", "{sock}", "{img}"],
    [PYNBD, "img", "check", "{img}"],
]


def probe_all(workdir: Path, path: Path) -> list[tuple[int, str]]:
    results = []
    for i, probe in enumerate(PROBES):
        argv = [a.format(img=path, sock=workdir / f"probe-{i}.sock") for a in probe]
        result = run(argv, check=False, timeout=60)
        stderr = result.stderr.replace("pynbd serve:", "qemu-nbd:").replace("pynbd img:", "qemu-img:")
        results.append((result.returncode, stderr))
    return results


@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_a_running_serve_keeps_others_away_as_qemu_nbd_does(
    workdir: Path, start_pynbd, start_qemu_nbd, read_only: bool
) -> None:
    path = make_image(workdir, "qcow2")
    flags = ["-r"] if read_only else []
    seen = {}
    for kind, start in (("pynbd", start_pynbd), ("qemu-nbd", start_qemu_nbd)):
        server = start(*flags, "-f", "qcow2", str(path))
        # a finished handshake means the server has opened the image (and holds its locks)
        assert run(["nbdsh", "-u", server.uri, "-c", "print(h.get_size())"]).stdout.strip() == str(SIZE)
        before = digest(path)
        seen[kind] = probe_all(workdir, path)
        assert digest(path) == before, kind
        server.stop()
    assert seen["pynbd"] == seen["qemu-nbd"]
    by_probe = dict(zip((" ".join(p[:3]) for p in PROBES), (rc for rc, _ in seen["pynbd"]), strict=True))
    assert by_probe["qemu-io -U -r"] == 0 and by_probe["qemu-img check -U"] == 0
    assert by_probe["qemu-nbd -k {sock}"] == 1 and by_probe["qemu-img bitmap --add"] == 1
    assert by_probe["qemu-img check {img}"] == (0 if read_only else 1)
    assert run(["qemu-img", "check", str(path)]).returncode == 0


# -- force-share in the daemon -----------------------------------------------------------------------


def test_daemon_force_share_as_qemu_storage_daemon(workdir: Path, start_daemon) -> None:
    path = make_image(workdir, "qcow2")
    holder = hold_with_qsd(start_daemon, path, "qcow2")
    qemu_write(holder.uri("disk"), 0x5A, 2 * MiB, MiB)
    before = digest(path)
    file = {"driver": "file", "filename": str(path)}
    replies = {}
    for kind in ("pynbd", "qsd"):
        daemon = start_daemon(kind, nbd=False)
        replies[kind] = [
            daemon.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "n0", "file": file}),
            daemon.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "n1", "read-only": True, "file": file}),
            daemon.cmd(
                "blockdev-add",
                **{"driver": "qcow2", "node-name": "n2", "read-only": True, "force-share": True, "file": file},
            ),
            daemon.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "n3", "force-share": True, "file": file}),
        ]
        daemon.stop()
    assert replies["pynbd"] == replies["qsd"]
    assert [("error" in r) for r in replies["pynbd"]] == [True, True, False, True]
    assert replies["pynbd"][0]["error"]["desc"] == 'Failed to get "write" lock'
    assert digest(path) == before


# -- backing loops -------------------------------------------------------------------------------------


def test_backing_loop_refused_alike_by_serve_img_and_daemon(workdir: Path, start_daemon) -> None:
    """a.qcow2 -> b.qcow2 -> a.qcow2. qemu 7.2 has no answer of its own here (read-only it recurses
    until it runs out of file descriptors); pynbd refuses with qemu-img's words for such chains."""
    a, b = workdir / "a.qcow2", workdir / "b.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(a), str(SIZE)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b)])
    run(["qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a)])
    # a's backing file b fails to open because b's backing file is a: one prefix per level, as qemu
    loop = f"Could not open backing file: Could not open backing file: Backing file '{a}' creates an infinite loop."
    before = digest(a), digest(b)

    for flags in ([], ["-r"]):
        result = serve_refusal(workdir, *flags, str(a))
        assert (result.returncode, result.stderr) == (1, f"pynbd serve: Failed to blk_new_open '{a}': {loop}\n")
    for command in (["map", str(a)], ["convert", "-O", "raw", str(a), str(workdir / "out.raw")], ["commit", str(a)]):
        result = run([PYNBD, "img", *command], check=False, timeout=60)
        assert (result.returncode, result.stderr) == (1, f"pynbd img: Could not open '{a}': {loop}\n"), command
    compared = run([PYNBD, "img", "compare", str(a), str(b)], check=False, timeout=60)
    assert (compared.returncode, compared.stderr) == (2, f"pynbd img: Could not open '{a}': {loop}\n")
    # info reads the header only, as qemu-img info: the loop shows only along --backing-chain
    assert run([PYNBD, "img", "info", str(a)]).returncode == 0
    chain = run([PYNBD, "img", "info", "--backing-chain", str(a)], check=False)
    assert chain.returncode == 1 and "creates an infinite loop" in chain.stderr
    assert "creates an infinite loop" in run(["qemu-img", "info", "--backing-chain", str(a)], check=False).stderr

    daemon = start_daemon("pynbd", nbd=False)
    for read_only in (False, True):
        reply = daemon.cmd(
            "blockdev-add",
            **{
                "driver": "qcow2",
                "node-name": "a",
                "read-only": read_only,
                "file": {"driver": "file", "filename": str(a)},
            },
        )
        assert reply["error"]["desc"] == loop
    assert daemon.ok("query-named-block-nodes") == []  # every node it opened is closed again
    assert (digest(a), digest(b)) == before
