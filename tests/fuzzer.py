"""A socket-level fuzzer for ``pynbd serve`` and ``pynbd daemon`` (NBD and QMP), shared by
``scripts/fuzz`` (long runs) and tests/test_fuzz_sockets.py (a short run in the suite).

Cases are mutations of valid traffic, so that most of them get past the first check and reach
deeper code:

- ``handshake``: a fixed-newstyle handshake (client flags, then options: LIST, INFO, GO,
  STRUCTURED_REPLY, meta contexts, STARTTLS, ABORT, unknown ones) serialised and then mutated (bit
  flips, byte runs, truncation, splices, huge lengths);
- ``request``: a connection negotiated normally, then a burst of transmission requests with
  mutated headers (commands, flags, offsets, lengths near the limits, payload lengths that lie)
  and a clean disconnect;
- ``qmp``: a QMP session (greeting, ``qmp_capabilities``) and then mutated commands: wrong types,
  huge numbers, NaN, deep nesting, unknown arguments, truncated JSON, invalid UTF-8.

After every batch a *witness* client checks that the servers still answer and that the data it
wrote before the run reads back intact, and QMP still answers ``query-version``. A crash (the
process exited), a hang (the witness did not get an answer within the timeout) or changed
witness data ends the run with the seed needed to replay it. Memory is watched as the servers'
VmRSS between batches.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbd

from pynbd.protocol import wire
from pynbd.protocol.constants import Cmd, Opt
from tests.daemons import Daemon, start_daemon
from tests.peers import Server, pynbd_server, run

MiB = 1 << 20
DISK_SIZE = 64 * MiB
WITNESS_OFFSET = 48 * MiB  # cases may write anywhere below; the witness owns what is above
WITNESS_LENGTH = 1 * MiB
IO_TIMEOUT = 10.0  # a server that takes longer than this to answer one case is hung


@dataclass
class Target:
    """One server under test: how to reach it, how to tell it is alive, its process."""

    name: str
    proc: subprocess.Popen
    nbd_socket: str
    export: str = ""
    qmp_socket: str | None = None
    stop: Callable[[], object] = lambda: None

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


@dataclass
class Report:
    cases: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    rss_start_kib: dict[str, int] = field(default_factory=dict)
    rss_max_kib: dict[str, int] = field(default_factory=dict)
    rss_end_kib: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.cases / self.seconds if self.seconds else 0.0
        lines = [f"{self.cases} cases in {self.seconds:.0f} s ({rate:.0f}/s): {dict(sorted(self.by_kind.items()))}"]
        for name in sorted(self.rss_start_kib):
            lines.append(
                f"{name}: RSS {self.rss_start_kib[name] // 1024} MiB at start, "
                f"{self.rss_max_kib[name] // 1024} MiB at most, {self.rss_end_kib.get(name, 0) // 1024} MiB at the end"
            )
        lines.append(f"{len(self.failures)} failures" + "".join(f"\n  {f}" for f in self.failures))
        return "\n".join(lines)


# -- starting the servers ---------------------------------------------------------------------


def start_serve(work: Path) -> Target:
    disk = work / "serve.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    server: Server = pynbd_server(work, str(disk))
    assert server.socket_path is not None
    return Target("serve", server.proc, server.socket_path, stop=server.stop)


def start_pynbd_daemon(work: Path) -> Target:
    image = work / "daemon.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(DISK_SIZE)])
    daemon: Daemon = start_daemon(
        "pynbd",
        work,
        "--blockdev",
        f"driver=file,node-name=f0,filename={image}",
        "--blockdev",
        "driver=qcow2,node-name=q0,file=f0",
        "--export",
        "type=nbd,id=e0,node-name=q0,name=disk,writable=on",
    )
    return Target("daemon", daemon.proc, daemon.nbd_path, "disk", daemon.qmp_path, stop=daemon.stop)


# -- mutations --------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits of ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        pos = rng.randrange(len(out) + 1)
        if choice == 0 and out:  # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:  # set a byte to an interesting value
            out[rng.randrange(len(out))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif choice == 2:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif choice == 3 and out:  # delete a run
            del out[pos : pos + rng.randint(1, 16)]
        elif choice == 4:  # truncate
            del out[pos:]
        elif choice == 5 and len(out) >= 4:  # an interesting 32-bit value (lengths, counts)
            i = rng.randrange(len(out) - 3)
            value = rng.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 4096, 4097, 33 * MiB, 0x10000))
            out[i : i + 4] = struct.pack(">I", value)
        elif choice == 6 and out:  # duplicate a slice
            start = rng.randrange(len(out))
            out[pos:pos] = out[start : start + rng.randint(1, 32)]
    return bytes(out)


def handshake_bytes(rng: random.Random, export: str) -> bytes:
    """A client's side of a fixed-newstyle handshake: flags and a few options."""
    parts = [struct.pack(">I", rng.choice((1, 3, 3, 0, 2)))]
    for _ in range(rng.randint(1, 5)):
        option = rng.choice(
            [
                Opt.LIST,
                Opt.INFO,
                Opt.GO,
                Opt.STRUCTURED_REPLY,
                Opt.LIST_META_CONTEXT,
                Opt.SET_META_CONTEXT,
                Opt.STARTTLS,
                Opt.ABORT,
                Opt.EXPORT_NAME,
                rng.randrange(1 << 32),
            ]
        )
        if option in (Opt.INFO, Opt.GO):
            payload = wire.encode_info_request(export, rng.sample([0, 1, 2, 3], rng.randint(0, 4)))
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            queries = rng.sample(["base:allocation", "qemu:", "qemu:dirty-bitmap:x", "qemu:allocation-depth", "x"], 2)
            payload = wire.encode_meta_context_request(export, queries)
        elif option == Opt.EXPORT_NAME:
            payload = export.encode()
        else:
            payload = b""
        parts.append(wire.encode_option(option, payload))
    return b"".join(parts)


def request_bytes(rng: random.Random) -> bytes:
    """A burst of transmission requests, well-formed or subtly not, below the witness range."""
    parts = []
    for _ in range(rng.randint(1, 8)):
        cmd = rng.choice([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, Cmd.CACHE, 99])
        flags = rng.choice((0, 0, 1, 2, 4, 8, 0xFFFF, rng.randrange(1 << 16)))
        length = rng.choice((0, 1, 512, 4096, 65536, 32 * MiB, 32 * MiB + 1, rng.randrange(1 << 32)))
        offset = rng.choice((0, 4096, WITNESS_OFFSET - 4096, DISK_SIZE, DISK_SIZE - 1, rng.randrange(1 << 64)))
        if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and offset + length > WITNESS_OFFSET:
            offset, length = rng.randrange(WITNESS_OFFSET // 2), rng.choice((1, 512, 4096, 65536))
        header = wire.encode_request(flags, cmd, rng.randrange(1 << 64), offset, length)
        if rng.random() < 0.3:
            header = mutate(rng, header)[: wire.REQUEST.size].ljust(wire.REQUEST.size, b"\0")
            if struct.unpack_from(">H", header, 6)[0] in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
                # a mutation may have made a write of any kind: never aim it at the witness
                header = header[:16] + struct.pack(">QI", 0, 4096 if cmd == Cmd.WRITE else 65536)
        parts.append(header)
        if cmd == Cmd.WRITE:
            parts.append(rng.randbytes(min(length, rng.choice((length, 0, 100, 4096)), 65536)))
    return b"".join(parts)


QMP_COMMANDS = [
    {"execute": "query-version"},
    {"execute": "query-block-exports"},
    {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
    {"execute": "block-dirty-bitmap-add", "arguments": {"node": "q0", "name": "b0", "granularity": 65536}},
    {"execute": "block-dirty-bitmap-remove", "arguments": {"node": "q0", "name": "b0"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": 1048576}},
    {"execute": "blockdev-del", "arguments": {"node-name": "n0"}},
    {"execute": "query-jobs"},
    {"execute": "x-no-such-command", "arguments": {"a": 1}},
    {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "q0", "name": "x"}},
    {"execute": "block-export-del", "arguments": {"id": "e1"}},
    {"execute": "query-block-jobs"},
]
HOSTILE_VALUES = [
    None,
    True,
    -1,
    2**64,
    2**63,
    -(2**63) - 1,
    1.5,
    "",
    "q0",
    "a" * 5000,
    [],
    {},
    [[[[[]]]]],
    {"a": {"b": {}}},
]
HOSTILE_TEXT = [
    b'{"execute": "query-version", "id": ' + b"9" * 5000 + b"}",
    b'{"execute": "query-version", "id": NaN}',
    b'{"execute": "query-version", "id": Infinity}',
    b"[" * 20000 + b"]" * 20000,
    b'{"execute": "\xff\xfe"}',
    b'{"execute": "query-version"',
    b"}}}]]]",
    b'"just a string"',
    b"12345",
    b"\x00\x00\x00\x00",
]


def qmp_messages(rng: random.Random) -> Iterator[bytes]:
    """Mutated QMP commands, one per line."""
    for _ in range(rng.randint(1, 6)):
        roll = rng.random()
        if roll < 0.15:
            yield rng.choice(HOSTILE_TEXT) + b"\n"
            continue
        message = json.loads(json.dumps(rng.choice(QMP_COMMANDS)))
        if rng.random() < 0.3:
            message["id"] = rng.choice(HOSTILE_VALUES[:12])
        arguments = message.setdefault("arguments", {})
        for _ in range(rng.randint(0, 3)):
            key = rng.choice([*arguments.keys(), "node-name", "name", "x", "size", "granularity"] or ["x"])
            arguments[key] = rng.choice(HOSTILE_VALUES)
        text = json.dumps(message).encode()
        if roll > 0.85:
            text = mutate(rng, text)
        yield text + b"\n"


# -- running cases ----------------------------------------------------------------------------


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    sock.connect(path)
    return sock


class Hang(Exception):
    """The server neither answered nor closed within IO_TIMEOUT after the client finished."""


def _finish(sock: socket.socket) -> None:
    """Tell the server we are done (EOF) and read whatever it still answers until it closes: a
    server must close a connection whose client has gone, and never block on unread replies."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return  # it already closed on us
    try:
        while sock.recv(1 << 20):
            pass
    except TimeoutError:
        raise Hang(f"no close within {IO_TIMEOUT:.0f} s of the client's EOF") from None
    except OSError:
        return


def _negotiated(target: Target) -> socket.socket:
    """A raw connection in the transmission phase (structured replies, base:allocation, GO)."""
    sock = _connect(target.nbd_socket)
    _recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    sock.sendall(wire.encode_option(Opt.STRUCTURED_REPLY))
    contexts = wire.encode_meta_context_request(target.export, ["base:allocation"])
    sock.sendall(wire.encode_option(Opt.SET_META_CONTEXT, contexts))
    sock.sendall(wire.encode_option(Opt.GO, wire.encode_info_request(target.export, [])))
    while True:  # replies to the three options: the GO's ACK is the last
        header = _recv_exact(sock, wire.OPTION_REPLY_HEADER.size)
        option, reply, length = wire.decode_option_reply_header(header)
        _recv_exact(sock, length)
        if option == Opt.GO and reply & 0x80000000:
            raise AssertionError(f"GO refused: {reply:#x}")
        if option == Opt.GO and reply == 1:
            return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed")
        data += chunk
    return bytes(data)


def case_handshake(rng: random.Random, target: Target) -> None:
    data = handshake_bytes(rng, target.export)
    if rng.random() < 0.8:
        data = mutate(rng, data)
    with _connect(target.nbd_socket) as sock:
        try:
            _recv_exact(sock, 18)
            sock.sendall(data)
        except (OSError, ConnectionError):
            return
        _finish(sock)


def case_request(rng: random.Random, target: Target) -> None:
    try:
        sock = _negotiated(target)
    except (OSError, ConnectionError):
        return
    with sock:
        try:
            sock.sendall(request_bytes(rng))
            if rng.random() < 0.5:
                sock.sendall(wire.encode_request(0, Cmd.DISC, 0, 0, 0))
        except OSError:
            return
        _finish(sock)


def case_qmp(rng: random.Random, target: Target) -> None:
    assert target.qmp_socket is not None
    with _connect(target.qmp_socket) as sock:
        try:
            _read_line(sock)
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            _read_line(sock)
            for message in qmp_messages(rng):
                sock.sendall(message)
        except (OSError, ConnectionError):
            return
        _finish(sock)


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


CASES = {"handshake": case_handshake, "request": case_request, "qmp": case_qmp}


# -- the witness ------------------------------------------------------------------------------


class Witness:
    """A well-behaved client per target: its data must survive every batch intact."""

    def __init__(self, targets: list[Target], seed: int) -> None:
        self.pattern = random.Random(seed).randbytes(WITNESS_LENGTH)
        self.targets = targets
        for target in targets:
            handle = self._handle(target)
            handle.pwrite(self.pattern, WITNESS_OFFSET)
            handle.flush()
            handle.shutdown()

    @staticmethod
    def _handle(target: Target) -> nbd.NBD:
        handle = nbd.NBD()
        handle.set_export_name(target.export)
        handle.connect_unix(target.nbd_socket)
        return handle

    def check(self) -> list[str]:
        problems = []
        for target in self.targets:
            if target.proc.poll() is not None:
                problems.append(f"{target.name}: exited with {target.proc.returncode}")
                continue
            try:
                handle = self._handle(target)
                data = handle.pread(WITNESS_LENGTH, WITNESS_OFFSET)
                handle.shutdown()
            except nbd.Error as exc:
                problems.append(f"{target.name}: witness failed: {exc}")
                continue
            if data != self.pattern:
                problems.append(f"{target.name}: witness data changed")
            if target.qmp_socket is not None:
                try:
                    with _connect(target.qmp_socket) as sock:
                        _read_line(sock)
                        sock.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-version"}\n')
                        _read_line(sock)
                        if b'"return"' not in _read_line(sock):
                            problems.append(f"{target.name}: QMP query-version failed")
                except (OSError, ConnectionError) as exc:
                    problems.append(f"{target.name}: QMP does not answer: {exc}")
        return problems


def fuzz(
    targets: list[Target],
    seed: int,
    cases: int,
    seconds: float,
    batch: int = 200,
    kinds: tuple[str, ...] = tuple(CASES),
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Run up to ``cases`` cases (or until ``seconds`` pass) round-robin over the targets."""
    report = Report()
    witness = Witness(targets, seed)
    for target in targets:
        report.rss_start_kib[target.name] = report.rss_max_kib[target.name] = target.rss_kib()
    rng = random.Random(seed)
    start = time.monotonic()
    while report.cases < cases and time.monotonic() - start < seconds:
        batch_seed = rng.randrange(1 << 32)
        batch_rng = random.Random(batch_seed)
        for _ in range(min(batch, cases - report.cases)):
            target = batch_rng.choice(targets)
            available = [k for k in kinds if k != "qmp" or target.qmp_socket]
            kind = batch_rng.choice(available)
            try:
                CASES[kind](batch_rng, target)
            except Hang as exc:
                report.failures.append(f"batch seed {batch_seed}: {target.name}: {kind} case hung: {exc}")
            report.cases += 1
            report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
        for target in targets:
            if target.proc.poll() is None:
                report.rss_max_kib[target.name] = max(report.rss_max_kib[target.name], target.rss_kib())
        problems = witness.check()
        if problems or report.failures:
            report.failures += [f"batch seed {batch_seed}: {p}" for p in problems]
            break
        if progress is not None:
            report.seconds = time.monotonic() - start
            progress(report)
    report.seconds = time.monotonic() - start
    for target in targets:
        if target.proc.poll() is None:
            report.rss_end_kib[target.name] = target.rss_kib()
    return report


def log_tracebacks(work: Path) -> list[str]:
    """Server logs that contain a Python traceback (bad input must never produce one)."""
    return [str(path) for path in work.glob("*.log") if "Traceback" in path.read_text(errors="replace")]

