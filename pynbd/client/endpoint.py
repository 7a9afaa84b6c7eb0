"""Where a client's connections go: a TCP address, a Unix socket, or an NBD server we start ourselves.

A server we start runs as a child process either with systemd socket activation (a listening
Unix socket on fd 3, ``LISTEN_PID``/``LISTEN_FDS`` set: nbdkit, qemu-nbd, pynbd serve, like
libnbd's ``connect_systemd_socket_activation``) or inetd style with the connection on its stdin
and stdout (``nbdkit -s``, nbd-server with ``port = 0``, like libnbd's ``connect_command``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence

STOP_TIMEOUT = 10.0


class Endpoint:
    """Opens connected sockets to one server; ``reusable`` if it can open more than one."""

    reusable = True
    description = ""

    async def open(self) -> socket.socket:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the endpoint owns (a child process); sockets it opened are the caller's."""


class TCPEndpoint(Endpoint):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.description = f"{host}:{port}"

    async def open(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for family, kind, proto, _, address in await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise last or OSError(f"cannot resolve {self.host}")


class UnixEndpoint(Endpoint):
    def __init__(self, path: str) -> None:
        self.path = path
        self.description = path

    async def open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.path)
        except OSError:
            sock.close()
            raise
        return sock


class _Child:
    """A server process we started; stopped (SIGTERM, then SIGKILL) when the endpoint closes."""

    proc: subprocess.Popen | None = None

    async def _stop_child(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


class ActivatedCommand(_Child, Endpoint):
    """Runs ``argv`` with a listening Unix socket passed by systemd socket activation."""

    def __init__(self, argv: Sequence[str]) -> None:
        if not argv:
            raise ValueError("empty server command")
        self.argv = list(argv)
        self.description = " ".join(self.argv)
        self.tmpdir: str | None = None
        self.path: str | None = None

    def start(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="pynbd-")
        self.path = os.path.join(self.tmpdir, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            listener.listen(128)
            fd = listener.fileno()
            # LISTEN_PID must be the server's own pid: the shell sets it to $$ and then execs the server.
            script = f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&{fd}'
            env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
            self.proc = subprocess.Popen(
                ["bash", "-c", script, "bash", *self.argv], pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL
            )
        except BaseException:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise
        finally:
            listener.close()  # the child holds it now; connections queue in its backlog

    async def open(self) -> socket.socket:
        if self.path is None:
            self.start()
        if self.proc is not None and self.proc.poll() is not None:
            status = self.proc.returncode
            raise ConnectionRefusedError(f"server command exited with status {status}: {self.description}")
        assert self.path is not None  # start() set it
        return await UnixEndpoint(self.path).open()

    async def close(self) -> None:
        await self._stop_child()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


class StdioCommand(_Child, Endpoint):
    """Runs ``argv`` with one end of a socket pair as its stdin and stdout (one connection only)."""

    reusable = False

    def __init__(self, argv: Sequence[str]) -> None:
        if not argv:
            raise ValueError("empty server command")
        self.argv = list(argv)
        self.description = " ".join(self.argv)
        self._opened = False

    async def open(self) -> socket.socket:
        if self._opened:
            raise ConnectionRefusedError("an inetd-style server command serves a single connection")
        self._opened = True
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=theirs.fileno(), stdout=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    async def close(self) -> None:
        await self._stop_child()
