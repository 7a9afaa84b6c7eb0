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


def pynbd_server(tmp: Path, *args: str, tcp: bool = False, export: str = "") -> Server:
    argv = [PYNBD, "serve", *args]
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
