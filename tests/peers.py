"""Starting and stopping real NBD servers (pynbd, qemu-nbd, nbdkit) for tests.

Every server is started with systemd-style socket activation: the test binds and listens on
the socket itself and hands it over as fd 3, so clients can connect the moment the process
exists and no test ever waits on a timer. The shell's ``exec`` keeps the pid that
``LISTEN_PID`` names.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
PYNBD = str(VENV_BIN / "pynbd") if (VENV_BIN / "pynbd").exists() else shutil.which("pynbd") or "pynbd"
# nbdsh and the libnbd module belong to Debian's python; put its directory first for nbdsh.
SYSTEM_PATH = "/usr/bin:" + os.environ.get("PATH", "")


def have(program: str) -> bool:
    return shutil.which(program) is not None


@dataclass
class Server:
    """A running server process, reachable at :attr:`uri`."""

    argv: list[str]
    proc: subprocess.Popen
    socket_path: str | None = None
    port: int | None = None
    export: str = ""
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def uri(self) -> str:
        name = self.export
        if self.socket_path:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def qemu_uri(self) -> str:
        """URI for qemu tools (qemu 7.2 understands the same nbd:// and nbd+unix:// forms)."""
        return self.uri

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def listening_socket(tmp: Path, tcp: bool = False) -> tuple[socket.socket, str | None, int | None]:
    if tcp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        return sock, None, sock.getsockname()[1]
    path = str(tmp / f"nbd-{os.getpid()}-{id(tmp)}-{len(os.listdir(tmp))}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock, path, None


def start_activated(argv: list[str], tmp: Path, tcp: bool = False, export: str = "", env: dict | None = None) -> Server:
    """Run ``argv`` with a listening socket on fd 3 (LISTEN_FDS=1, LISTEN_PID=its pid)."""
    sock, path, port = listening_socket(tmp, tcp)
    fd = sock.fileno()
    log_path = tmp / f"server-{len(os.listdir(tmp))}.log"
    shell = f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&{fd}'
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("LISTEN_FDNAMES", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["bash", "-c", shell, "bash", *argv], pass_fds=(fd,), stdout=log, stderr=subprocess.STDOUT, env=full_env
        )
    sock.close()
    return Server(argv, proc, path, port, export, log_path)


def pynbd_server(tmp: Path, *args: str, tcp: bool = False, export: str = "", verbose: bool = False) -> Server:
    """``pynbd serve ARGS``; ``verbose`` logs at info level too (pynbd -v: clients coming and going)."""
    argv = [PYNBD, *(["-v"] if verbose else []), "serve", *args]
    if export:
        argv += ["--export-name", export]
    return start_activated(argv, tmp, tcp, export)


def qemu_nbd_server(tmp: Path, *args: str, tcp: bool = False, export: str = "") -> Server:
    argv = ["qemu-nbd", "-t", *args]
    if export:
        argv[2:2] = ["-x", export]
    return start_activated(argv, tmp, tcp, export)


def nbdkit_server(tmp: Path, *args: str, tcp: bool = False, export: str = "") -> Server:
    return start_activated(["nbdkit", "-f", *args], tmp, tcp, export)


def run(argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a client tool and return its output as text; raise with its stderr on failure."""
    kwargs.setdefault("env", dict(os.environ, PATH=SYSTEM_PATH))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=kwargs.pop("timeout", 300), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# -- sparse images and their truth (shared by the interop and differential tests) ------------------

BLOCK = 4096
HOLE_ZERO = 3  # base:allocation NBD_STATE_HOLE | NBD_STATE_ZERO
DATA = 0

AbsExtent = tuple[int, int, int]  # (offset, length, base:allocation flags)


def make_sparse_image(path: Path, size: int, data_ranges: list[tuple[int, int]], seed: int = 1) -> bytearray:
    """Create ``path`` of ``size`` bytes with random data in ``data_ranges`` (offset, length) and holes
    elsewhere; return the expected content. Ranges should be 4 KiB-aligned so the filesystem's
    layout matches them exactly."""
    import random

    rng = random.Random(seed)
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data_ranges:
            data = rng.randbytes(length)
            content[offset : offset + length] = data
            f.seek(offset)
            f.write(data)
    return content


def merge_abs_extents(extents) -> list[AbsExtent]:
    """Join touching extents of equal flags: NBD servers may split a run anywhere, so only the
    merged form is comparable between peers."""
    merged: list[AbsExtent] = []
    for offset, length, flags in extents:
        if not length:
            continue
        if merged and merged[-1][2] == flags and merged[-1][0] + merged[-1][1] == offset:
            prev = merged[-1]
            merged[-1] = (prev[0], prev[1] + length, flags)
        else:
            merged.append((offset, length, flags))
    return merged


def file_extents(path: Path | str) -> list[AbsExtent]:
    """The file's real layout from SEEK_DATA/SEEK_HOLE, as base:allocation extents."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole up to EOF
                data = size
            if data > pos:
                out.append((pos, data - pos, HOLE_ZERO))
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data, DATA))
            pos = hole
    finally:
        os.close(fd)
    return merge_abs_extents(out)


def data_ranges_of(extents: list[AbsExtent]) -> list[tuple[int, int]]:
    return [(offset, length) for offset, length, flags in extents if not flags & 1]


def nbd_block_status(h, offset: int = 0, length: int | None = None, req_one: bool = False) -> list[AbsExtent]:
    """base:allocation of ``[offset, offset+length)`` through libnbd, walking as far as needed.
    Every reply must start where it was asked to and not go past the request."""
    import nbd

    end = h.get_size() if length is None else offset + length
    out: list[AbsExtent] = []
    pos = offset
    while pos < end:
        got: list[AbsExtent] = []

        def callback(metacontext: str, start: int, entries: list[int], err: int, got=got) -> int:
            assert metacontext == "base:allocation"
            at = start
            for i in range(0, len(entries), 2):
                got.append((at, entries[i], entries[i + 1]))
                at += entries[i]
            return 0

        h.block_status(end - pos, pos, callback, nbd.CMD_FLAG_REQ_ONE if req_one else 0)
        assert got and got[0][0] == pos, f"block status at {pos} answered {got[:2]}"
        if req_one:
            assert len(got) == 1, f"REQ_ONE answered with {len(got)} extents"
        for start, length_, flags in got:
            length_ = min(length_, end - start)  # a server may describe past the request; clamp
            out.append((start, length_, flags))
        pos = got[-1][0] + got[-1][1]
    return merge_abs_extents(out)


def nbdinfo_map(uri: str, *extra: str, context: str | None = None) -> list[AbsExtent]:
    """``nbdinfo --map[=CONTEXT] --json`` as merged (offset, length, type) extents."""
    import json

    option = f"--map={context}" if context else "--map"
    entries = json.loads(run(["nbdinfo", option, "--json", *extra, uri]).stdout)
    return merge_abs_extents((e["offset"], e["length"], e["type"]) for e in entries)


def read_all(h, chunk: int = 4 << 20) -> bytes:
    size = h.get_size()
    return b"".join(h.pread(min(chunk, size - off), off) for off in range(0, size, chunk))


def process_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes: its resident memory now and at its peak."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def open_fds(pid: int) -> int:
    """How many file descriptors a process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))
