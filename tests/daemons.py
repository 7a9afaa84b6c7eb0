"""Starting ``pynbd daemon`` and ``qemu-storage-daemon`` side by side for QMP tests.

Both get pre-bound listening sockets (QMP and NBD) as inherited file descriptors, so they are
reachable the moment they start: no test waits on a timer. Both are driven with the QEMU
project's own client library, ``qemu.qmp``.
"""

from __future__ import annotations

import json
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.peers import PYNBD

KINDS = ("pynbd", "qsd")
CONNECT_TIMEOUT = 30


@dataclass
class Daemon:
    kind: str
    proc: subprocess.Popen
    qmp_path: str
    nbd_path: str
    log_path: Path
    extra_qmp_paths: list[str] = field(default_factory=list)  # further monitors (start_daemon's monitors=)
    qmp: QEMUMonitorProtocol = field(init=False)
    backlog: list[dict] = field(init=False, default_factory=list)  # pulled, not yet asked for: oldest first

    def __post_init__(self) -> None:
        # qemu-storage-daemon 7.2 now and then greets a client that connected while it was starting
        # twice, and the second greeting spoils qmp_capabilities. Its socket monitor serves one
        # client at a time, so a fresh connection (greeted once, by then) gets it right.
        # A start-up that never answers fails within CONNECT_TIMEOUT with the daemon's log, not at
        # the test's timeout (legacy connect() has no timeout: this is its body with one).
        for attempt in range(3):
            self.qmp = QEMUMonitorProtocol(self.qmp_path)
            self.qmp._qmp.await_greeting = self.qmp._qmp.negotiate = True
            try:
                self.qmp._sync(self.qmp._qmp.connect(self.qmp_path), timeout=CONNECT_TIMEOUT)
                return
            except (ConnectError, TimeoutError) as exc:
                self.qmp.close()
                if attempt == 2 or self.kind != "qsd" or self.proc.poll() is not None:
                    raise AssertionError(f"{self.kind}: QMP connection failed ({exc!r}); log:\n{self.log()}") from exc

    def monitor(self, index: int = 1) -> RawQMP:
        """A raw client on another monitor (1 = the first extra one), capabilities negotiated."""
        client = RawQMP(self.extra_qmp_paths[index - 1])
        assert "return" in client.ask(b'{"execute": "qmp_capabilities"}'), f"{self.kind}: negotiation failed"
        return client

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_path}"

    def cmd(self, command: str, /, **args) -> dict:
        """The raw reply: {"return": ...} or {"error": {...}}. Arguments with dashes: ``**{"node-name": ...}``."""
        return self.qmp.cmd_raw(command, args or None)

    def ok(self, command: str, /, **args):
        reply = self.cmd(command, **args)
        assert "return" in reply, f"{self.kind}: {command} {args} failed: {reply}"
        return reply["return"]

    def fails(self, command: str, /, **args) -> str:
        reply = self.cmd(command, **args)
        assert "error" in reply, f"{self.kind}: {command} {args} unexpectedly succeeded"
        return reply["error"]["desc"]

    @staticmethod
    def _is(event: dict, name: str, job: str | None, status: str | None = None) -> bool:
        data = event.get("data", {})
        return (
            event["event"] == name
            and (job is None or data.get("device", data.get("id")) == job)
            and (status is None or data.get("status") == status)
        )

    def _find(self, name: str, job: str | None, timeout: float, status: str | None = None) -> int:
        """Index in :attr:`backlog` of the first event ``name`` (for ``job``, with ``status``),
        pulling more as needed."""
        for index, event in enumerate(self.backlog):
            if self._is(event, name, job, status):
                return index
        while True:
            try:  # legacy pull_event waits forever unless ``wait`` is a float; past it, it raises
                event = self.qmp.pull_event(wait=float(timeout))
            except TimeoutError:
                event = None
            assert event is not None, (
                f"{self.kind}: no {name} within {timeout}s; saw {[e['event'] for e in self.backlog]}"
            )
            self.backlog.append(event)
            if self._is(event, name, job, status):
                return len(self.backlog) - 1

    def events_until(self, name: str, job: str | None = None, timeout: float = 60) -> list[dict]:
        """The events up to and including the first ``name`` (for ``job``, if given), in order.

        They are consumed; the search starts with the events that earlier :meth:`wait_event`
        calls pulled but did not ask for.
        """
        index = self._find(name, job, timeout)
        seen = self.backlog[: index + 1]
        del self.backlog[: index + 1]
        return seen

    def wait_event(self, name: str, job: str | None = None, timeout: float = 60, status: str | None = None) -> dict:
        """The first event ``name`` (for ``job``, and with data ``status``, if given); only it is consumed.

        Events of other jobs (or other kinds) that arrive first stay in :attr:`backlog`, in
        order, for later calls: one job's READY may well come before another's COMPLETED.
        """
        return self.backlog.pop(self._find(name, job, timeout, status))

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                self.qmp.cmd_raw("quit")
            except Exception:
                self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.qmp.close()
        except Exception:
            pass
        return self.proc.returncode


class RawQMP:
    """A QMP client that sends exactly the bytes it is given, and reads replies when asked: two of
    them on two monitors can have commands in flight at the same time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""
        self.events: list[dict] = []
        self.greeting = self.recv()

    def recv(self) -> dict:
        """The next reply; asynchronous events that come first are kept in :attr:`events`."""
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError(f"QMP server closed the connection (pending {self.buf[:80]!r})")
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            message = json.loads(line)
            if "event" not in message:
                return message
            self.events.append(message)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_command(self, command: str, /, **args) -> None:
        """Send a command without waiting for its reply (read it later with :meth:`recv`)."""
        self.send(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")

    def ask(self, data: bytes) -> dict:
        self.send(data + b"\n")
        return self.recv()

    def cmd(self, command: str, /, **args) -> dict:
        self.send_command(command, **args)
        return self.recv()

    def close(self) -> None:
        self.sock.close()


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


def start_daemon(
    kind: str, tmp: Path, *options: str, nbd: bool = True, max_connections: int = 0, monitors: int = 1
) -> Daemon:
    """Start a daemon with ``options`` (qemu-storage-daemon syntax, e.g. "--blockdev", "...") and
    ``monitors`` QMP monitors, each on its own socket (``--qmp`` given again for pynbd, another
    ``--chardev``/``--monitor`` pair for qemu-storage-daemon)."""
    index = len(list(tmp.glob(f"{kind}-*.log")))
    qmp_path, nbd_path = tmp / f"{kind}{index}-qmp.sock", tmp / f"{kind}{index}-nbd.sock"
    qmp_sock = _listen(qmp_path)
    extra_paths = [tmp / f"{kind}{index}-qmp{n}.sock" for n in range(1, monitors)]
    extra_socks = [_listen(path) for path in extra_paths]
    qmp_socks = [qmp_sock, *extra_socks]
    fds = [sock.fileno() for sock in qmp_socks]
    extra = []
    if nbd:
        nbd_sock = _listen(nbd_path)
        fds.append(nbd_sock.fileno())
        server = f"addr.type=fd,addr.str={nbd_sock.fileno()}"
        if max_connections:
            server += f",max-connections={max_connections}"
        extra = ["--nbd-server", server]
    if kind == "pynbd":
        argv = [PYNBD, "daemon"]
        for sock in qmp_socks:
            argv += ["--qmp", f"fd:{sock.fileno()}"]
    else:
        argv = ["qemu-storage-daemon"]
        for n, sock in enumerate(qmp_socks):
            argv += [
                "--chardev",
                f"socket,fd={sock.fileno()},server=on,wait=off,id=qmp{n}",
                "--monitor",
                f"chardev=qmp{n}",
            ]
    # options that need the NBD server (--export) must come after it, as qemu requires
    before = [o for i, o in enumerate(options) if not _is_export(options, i)]
    after = [o for i, o in enumerate(options) if _is_export(options, i)]
    log_path = tmp / f"{kind}-{index}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*argv, *before, *extra, *after], pass_fds=fds, stdout=log, stderr=subprocess.STDOUT)
    for sock in qmp_socks:
        sock.close()
    if nbd:
        nbd_sock.close()
    return Daemon(kind, proc, str(qmp_path), str(nbd_path), log_path, [str(path) for path in extra_paths])


def _is_export(options: tuple[str, ...], i: int) -> bool:
    return options[i] == "--export" or (i > 0 and options[i - 1] == "--export")
