"""Resource limits of the NBD server (docs/protocol.md, "Limits"): each limit is hit on purpose,
gives its documented behaviour, and a witness client that reads and writes all along keeps
getting its data right. Where qemu has the limit (handshake limit, connection limit), the same
scenario runs against qemu-nbd or qemu-storage-daemon 7.2 and must look the same to a client.

Memory is measured on the server process itself (/proc/PID/status: VmRSS, VmHWM) and compared
with bounds derived from the caps, never with timings. Negative checks ("this client gets no
greeting", "the server reads no more") wait a bounded half second or second, as they must.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from pynbd.server.nbd import BUFFER_CACHE, BUFFER_LIMIT, REPLY_WINDOW
from tests.peers import Server, process_memory, run
from tests.test_bad_input import (
    CHUNK_ERROR,
    CHUNK_OFFSET_DATA,
    CHUNK_OFFSET_HOLE,
    CMD_READ,
    CMD_WRITE,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    RawClient,
    Witness,
    connect,
)

MiB = 1024 * 1024
NEGATIVE_WAIT = 0.5  # how long a "nothing happens" check watches
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def disk(workdir: Path) -> Path:
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    return image


def readable(client: RawClient, wait: float = NEGATIVE_WAIT) -> bool:
    """Whether the server has sent this client something (its greeting, a reply) within ``wait`` seconds."""
    ready, _, _ = select.select([client.sock], [], [], wait)
    return bool(ready)


def wait_for(condition, what: str, timeout: float = 60, step: float = 0.05) -> None:
    """Poll a condition about another process (its log, its /proc entry) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


def daemon_server(daemon, export: str) -> Server:
    """A pynbd daemon or qemu-storage-daemon's NBD socket, as the raw clients address servers."""
    return Server([], daemon.proc, socket_path=daemon.nbd_path, export=export)


class Replies:
    """Structured replies read in whatever order the server sends them (they are out of order)."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.partial: dict[int, tuple[int, bytearray]] = {}  # cookie -> (error, data so far)
        self.offsets: dict[int, int] = {}  # cookie -> offset of the read

    def expect(self, cookie: int, read_offset: int = 0, read_length: int = 0) -> None:
        self.partial[cookie] = (0, bytearray(read_length))
        self.offsets[cookie] = read_offset

    def next(self) -> tuple[int, int, bytes]:
        """The next complete reply: (cookie, error, data read)."""
        recv = self.client.recv_exactly
        while True:
            (magic,) = struct.unpack(">I", recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", recv(12))
                _, data = self.partial.pop(cookie)
                return cookie, error, recv(len(data)) if not error else b""
            assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
            flags, kind, cookie, length = struct.unpack(">HHQI", recv(16))
            body = recv(length)
            error, data = self.partial[cookie]
            if kind == CHUNK_ERROR:
                error = struct.unpack(">I", body[:4])[0]
            elif kind in (CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE):
                (offset,) = struct.unpack(">Q", body[:8])
                start = offset - self.offsets[cookie]
                if kind == CHUNK_OFFSET_DATA:
                    data[start : start + length - 8] = body[8:]
                else:
                    (hole,) = struct.unpack(">I", body[8:12])
                    data[start : start + hole] = bytes(hole)
            self.partial[cookie] = (error, data)
            if flags & 1:
                del self.partial[cookie]
                return cookie, error, bytes(data)


def push_until_blocked(sock: socket.socket, messages: list[bytes], limit: int) -> int:
    """Send ``messages`` without blocking until the server stops taking them (the socket stays
    unwritable for a second) or ``limit`` bytes went out; return the bytes sent."""
    sock.setblocking(False)
    sent = 0
    try:
        for message in messages:
            view = memoryview(message)
            while view:
                try:
                    n = sock.send(view)
                except BlockingIOError:
                    _, writable, _ = select.select([], [sock], [], 1.0)
                    if not writable:
                        return sent
                    continue
                view, sent = view[n:], sent + n
                if sent >= limit:
                    return sent
        return sent
    finally:
        sock.setblocking(True)


def fill(handle, offset: int, data: bytes) -> None:
    """Write ``data`` through libnbd in pieces of the server's preferred maximum (4 MiB)."""
    for start in range(0, len(data), 4 * MiB):
        handle.pwrite(data[start : start + 4 * MiB], offset + start)


def write_request(cookie: int, offset: int, data: bytes) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, cookie, offset, len(data)) + data


def read_request(cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie, offset, length)


# --- handshake limit ----------------------------------------------------------------------------


def test_a_client_that_does_not_finish_negotiation_is_dropped(start_pynbd, disk):
    server = start_pynbd(str(disk), "--handshake-limit", "1", verbose=True)
    witness = Witness(server)  # negotiated before: transmission has no time limit
    started = time.monotonic()
    silent = RawClient(server)  # takes the greeting and says nothing
    silent.greeting()
    halfway = RawClient(server)  # starts options but never sends GO
    halfway.start()
    assert halfway.option(8) == [(1, b"")]  # NBD_OPT_STRUCTURED_REPLY, acknowledged
    assert silent.disconnected() and halfway.disconnected()
    assert time.monotonic() - started >= 1.0  # not before the limit
    witness.verify()  # idle longer than the limit, and still served
    silent.close()
    halfway.close()
    assert server.log().count("negotiation not finished within 1 s") == 2
    assert "Traceback" not in server.log()


def test_the_default_handshake_limit_is_qemu_nbds(start_pynbd, start_qemu_nbd, disk):
    """Debian's qemu-nbd 7.2 (with the CVE-2024-7409 fix) drops a silent client after 10 s; so does pynbd."""
    servers = [start_pynbd(str(disk)), start_qemu_nbd("-f", "raw", str(disk))]
    started = time.monotonic()
    clients = [RawClient(server) for server in servers]
    for client in clients:
        client.greeting()
    for client in clients:
        assert client.disconnected()
        assert time.monotonic() - started >= 10.0
        client.close()


@pytest.mark.parametrize("kind", ["pynbd", "qsd"])
def test_nbd_server_start_handshake_max_seconds(start_daemon, workdir, kind):
    """qemu 10.0's handshake-max-seconds: pynbd has it; qemu-storage-daemon 7.2 refuses it."""
    daemon = start_daemon(kind, nbd=False)
    args = {"addr": {"type": "unix", "data": {"path": str(workdir / "h.sock")}}, "handshake-max-seconds": 1}
    if kind == "qsd":
        assert "handshake-max-seconds" in daemon.fails("nbd-server-start", **args)
        return
    daemon.ok("nbd-server-start", **args)
    daemon.ok("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=MiB)
    daemon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "n0"})
    started = time.monotonic()
    silent = RawClient(Server([], daemon.proc, socket_path=str(workdir / "h.sock")))
    silent.greeting()
    assert silent.disconnected()
    assert time.monotonic() - started >= 1.0
    silent.close()
    for bad, error in ((-1, "expects uint32_t"), (1 << 32, "expects uint32_t"), (1.5, "expects uint64")):
        daemon.ok("nbd-server-stop")
        assert error in daemon.fails("nbd-server-start", **{**args, "handshake-max-seconds": bad})
        daemon.ok("nbd-server-start", **args)


# --- connection limit ---------------------------------------------------------------------------


def check_connection_limit(server: Server, export: str = "") -> None:
    """With a limit of 2: a third client connects but gets no greeting until one of the two leaves,
    then it is served like any other (qemu-nbd -e and nbd-server-start's max-connections)."""
    first, second = RawClient(server), RawClient(server)
    assert readable(first, 30) and readable(second, 30)
    third = RawClient(server)  # the connect itself succeeds: the kernel queues it
    assert not readable(third)
    second.go(export)
    data = os.urandom(MiB)
    second.request(CMD_WRITE, 0, len(data), payload=data)
    assert second.reply()[0] == 0
    assert not readable(third)  # still waiting while both are served
    first.close()  # a slot frees: now the third is accepted and greeted
    third.go(export)
    assert third.read(0, MiB) == data
    second.close()
    third.close()


@pytest.mark.parametrize("peer", ["pynbd", "qemu-nbd"])
def test_serve_connection_limit_is_qemu_nbds(start_pynbd, start_qemu_nbd, disk, peer):
    if peer == "pynbd":
        server = start_pynbd(str(disk), "--shared", "2")
    else:
        server = start_qemu_nbd("-f", "raw", "-e", "2", str(disk))
    check_connection_limit(server)


@pytest.mark.parametrize("kind", ["pynbd", "qsd"])
def test_daemon_connection_limit_is_qemus(start_daemon, disk, kind):
    daemon = start_daemon(
        kind,
        "--blockdev",
        f"driver=file,node-name=f0,filename={disk}",
        "--export",
        "type=nbd,id=e0,node-name=f0,writable=on",
        max_connections=2,
    )
    check_connection_limit(daemon_server(daemon, "f0"), "f0")


@pytest.mark.parametrize("kind", ["pynbd", "qsd"])
def test_daemon_default_connection_limit_is_100(start_daemon, kind):
    """Debian's qemu-storage-daemon 7.2 (CVE-2024-7409 fix) serves 100 clients by default; so does pynbd."""
    daemon = start_daemon(
        kind, "--blockdev", "driver=null-co,node-name=n0,size=1048576", "--export", "type=nbd,id=e0,node-name=n0"
    )
    server = daemon_server(daemon, "n0")
    clients = [RawClient(server) for _ in range(101)]
    try:
        for client in clients[:100]:
            client.greeting()
        assert not readable(clients[100])
        clients[0].close()
        clients[100].greeting()
    finally:
        for client in clients:
            client.close()


# --- connection storms: the listen backlog -------------------------------------------------------


def connect_all_at_once(server: Server, count: int) -> list[socket.socket]:
    """``count`` non-blocking connects in a row, none accepted in between: each must succeed at
    once (no EAGAIN from a full backlog) or, over TCP, complete."""
    socks, failures = [], []
    for _ in range(count):
        if server.socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(server.socket_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex(("127.0.0.1", server.port))
        if code not in (0, errno.EINPROGRESS):
            failures.append(errno.errorcode.get(code, code))
        socks.append(sock)
    for sock in socks:  # TCP connects complete in the background: wait for each, then ask how it went
        if sock.family == socket.AF_INET:
            select.select([], [sock], [], 30)
            if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                failures.append(errno.errorcode.get(code, code))
    assert not failures, f"{len(failures)} of {count} connects failed: {sorted(set(failures))}"
    return socks


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_400_simultaneous_connects_all_succeed_and_are_served(start_pynbd, disk, tcp):
    """400 at once, with the default limit of 100 clients: every connect succeeds, 100 are served
    at once and the rest, queued unaccepted, are served in turn as earlier ones leave."""
    server = start_pynbd(str(disk), tcp=tcp)
    witness = Witness(server)  # also proves the server listens with its own backlog by now
    clients = [RawClient.adopt(sock) for sock in connect_all_at_once(server, 400)]
    try:
        for client in clients:
            client.go()
            assert client.read(0, 4096) == witness.pattern[:4096]
            client.close()
    finally:
        for client in clients:
            client.close()
    witness.verify()


def test_400_simultaneous_connects_served_at_once_without_a_limit(start_pynbd, disk):
    server = start_pynbd(str(disk), "--shared", "0")
    witness = Witness(server)
    clients = [RawClient.adopt(sock) for sock in connect_all_at_once(server, 400)]
    try:
        for client in clients:  # all greeted before any leaves
            client.greeting()
        for client in clients:
            client.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            client.started = True
            client.go()
        for client in clients:
            assert client.read(0, 4096) == witness.pattern[:4096]
    finally:
        for client in clients:
            client.close()
    witness.verify()


# --- bytes in flight per connection: backpressure ----------------------------------------------


def test_a_connection_over_its_bytes_in_flight_is_not_read_until_replies_go_out(start_pynbd):
    """16 reads of 4 MiB that the client does not collect fill its 16 MiB of bytes in flight (the
    replies cannot all go out); the server then reads nothing more from it: the write payloads
    sent next stay in the socket. Once the client reads, everything is answered, in full."""
    server = start_pynbd("--memory", "128M", "--max-in-flight-bytes", "16M")
    witness = Witness(server)
    content = os.urandom(MiB) * 64
    fill(witness.handle, 8 * MiB, content)  # data, not holes: read replies carry 4 MiB each
    client = RawClient(server)
    client.go()
    replies = Replies(client)
    for cookie in range(16):
        replies.expect(cookie, 8 * MiB + cookie * 4 * MiB, 4 * MiB)
        client.send(read_request(cookie, 8 * MiB + cookie * 4 * MiB, 4 * MiB))
    writes = {100 + i: (80 * MiB + i * MiB, os.urandom(MiB)) for i in range(48)}
    for cookie in writes:
        replies.expect(cookie)
    stream = b"".join(write_request(cookie, offset, data) for cookie, (offset, data) in writes.items())
    pushed = push_until_blocked(client.sock, [stream], len(stream))
    # without the cap the server would have taken every write (64 requests in flight): 48 MiB
    assert pushed < 4 * MiB, f"the server kept reading: {pushed} bytes of writes taken"
    witness.handle.pwrite(b"w" * 4096, 0)  # other clients are served meanwhile
    assert witness.handle.pread(4096, 0) == b"w" * 4096
    witness.pattern = b"w" * 4096 + witness.pattern[4096:]
    rest = threading.Thread(target=client.sock.sendall, args=(stream[pushed:],))
    rest.start()  # the rest goes out as the server reads it, which needs our reading replies
    answered = {}
    while len(answered) < 16 + len(writes):
        cookie, error, data = replies.next()
        answered[cookie] = (error, data)
    rest.join()
    assert all(error == 0 for error, _ in answered.values())
    for cookie in range(16):
        assert answered[cookie][1] == content[cookie * 4 * MiB : (cookie + 1) * 4 * MiB]
    for offset, data in writes.values():
        assert client.read(offset, MiB, cookie=999) == data
    client.close()
    witness.verify()


# --- the server's buffer limit, and slow readers -------------------------------------------------


def test_the_buffer_limit_holds_other_clients_back_until_memory_frees(start_pynbd):
    """A buffer limit of 8 MiB, held entirely by read data a client does not collect: another
    client's write waits for buffer memory (backpressure, not an error) and completes as soon
    as the first client reads its replies."""
    server = start_pynbd("--memory", "128M", "--buffer-limit", "8M")
    witness = Witness(server)
    content = os.urandom(MiB) * 32
    fill(witness.handle, 4 * MiB, content)
    hog = RawClient(server)
    hog.go()
    replies = Replies(hog)
    for cookie in range(8):
        replies.expect(cookie, 4 * MiB + cookie * 4 * MiB, 4 * MiB)
    hog.send(b"".join(read_request(cookie, 4 * MiB + cookie * 4 * MiB, 4 * MiB) for cookie in range(8)))
    # Replies have started: in the same turn of its event loop the server filled the socket and
    # took the whole buffer limit for the next two replies' data (asyncio runs the hog's
    # request tasks before it polls the witness's socket again).
    assert readable(hog, 30)
    data = os.urandom(MiB)
    done: list[int] = []
    witness.handle.aio_pwrite(data, 40 * MiB, lambda err: done.append(err.value) or 1)
    deadline = time.monotonic() + NEGATIVE_WAIT
    while time.monotonic() < deadline:
        witness.handle.poll(int((deadline - time.monotonic()) * 1000) + 1)
    assert done == [], "a write went through although the buffer limit was in use"
    for _ in range(8):
        cookie, error, got = replies.next()
        assert error == 0 and got == content[cookie * 4 * MiB : (cookie + 1) * 4 * MiB]
    while not done:
        witness.handle.poll(-1)
    assert done == [0]
    assert witness.handle.pread(MiB, 40 * MiB) == data
    hog.close()
    witness.verify()


def test_a_client_that_does_not_read_its_replies_stalls_only_itself(start_pynbd, workdir):
    """64 reads of 4 MiB that the client never collects, from a qcow2 (no sendfile: read data
    goes through buffers). Another client writes and reads back 64 MiB meanwhile, and the
    server's memory grows by no more than the reply window and the buffer cache (with a
    buffer per request, as before, it held 256 MiB)."""
    image = workdir / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "512M"])
    server = start_pynbd(str(image))
    witness = Witness(server)
    witness.handle.pwrite(os.urandom(4 * MiB), 4 * MiB)  # data for the slow client to ask for
    rss_before, _ = process_memory(server.proc.pid)
    slow = RawClient(server)
    slow.go()
    slow.send(b"".join(read_request(cookie, 4 * MiB, 4 * MiB) for cookie in range(64)))
    assert readable(slow, 30)  # its first reply is on the way
    for i in range(64):
        data = os.urandom(MiB)
        witness.handle.pwrite(data, 256 * MiB + i * MiB)
        assert witness.handle.pread(MiB, 256 * MiB + i * MiB) == data
    _, peak = process_memory(server.proc.pid)
    bound = REPLY_WINDOW + BUFFER_CACHE + 32 * MiB
    assert peak - rss_before < bound, f"server grew by {(peak - rss_before) >> 20} MiB, bound {bound >> 20} MiB"
    slow.close()
    witness.verify()
    assert "Traceback" not in server.log()


def test_many_clients_writing_large_payloads_use_bounded_memory_and_give_it_back(start_pynbd, disk):
    """32 clients with 16 writes of 2 MiB in flight each, to a raw file (written by worker
    threads, so payloads queue up in the server): 1 GiB offered at once, and with a buffer per
    request as before, about as much resident. The server stays within its buffer limit plus
    its buffer cache, and once the clients leave its memory falls back."""
    server = start_pynbd(str(disk))
    witness = Witness(server)
    rss_before, _ = process_memory(server.proc.pid)
    errors: list[str] = []

    def client(index: int) -> None:
        try:
            handle = connect(server)
            share = index % 31  # 31 regions of 2 MiB: clients 0 and 31 share one, writing the same bytes
            region = (2 + 2 * share) * MiB
            data = bytes([share + 2]) * (2 * MiB)
            for _ in range(2):
                cookies = [handle.aio_pwrite(data, region) for _ in range(16)]
                for cookie in cookies:
                    while not handle.aio_command_completed(cookie):
                        handle.poll(-1)
            if handle.pread(2 * MiB, region) != data:
                errors.append(f"client {index}: wrong data read back")
            handle.shutdown()
        except Exception as exc:  # reported below, with the others
            errors.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    _, peak = process_memory(server.proc.pid)
    bound = BUFFER_LIMIT + BUFFER_CACHE + 64 * MiB
    assert peak - rss_before < bound, f"server grew by {(peak - rss_before) >> 20} MiB, bound {bound >> 20} MiB"
    witness.verify()  # the last client gone: the pool is emptied 2 s later
    wait_for(
        lambda: process_memory(server.proc.pid)[0] - rss_before < 64 * MiB,
        "the server's memory to fall back within 64 MiB of where it started",
    )


# --- vanishing clients: one line each -------------------------------------------------------------


@pytest.mark.parametrize("how", ["reset", "close-unread"])
def test_a_client_that_goes_away_with_requests_pending_is_one_info_line(start_pynbd, disk, how):
    """64 reads in flight, then the client is gone: a reset over TCP, or over a Unix socket a
    close with replies unread (the server's sends then fail with EPIPE). No request is logged,
    no traceback: one info line says the client went away."""
    server = start_pynbd(str(disk), tcp=how == "reset", verbose=True)
    witness = Witness(server)
    client = RawClient(server)
    client.go()
    client.send(b"".join(read_request(cookie, 0, MiB) for cookie in range(64)))
    assert readable(client, 30)
    if how == "reset":
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    wait_for(lambda: "went away" in server.log(), "the server to log the client's going")
    witness.verify()
    log = server.log()
    assert log.count("went away") == 1, log
    assert "request" not in log and "Traceback" not in log and "WARNING" not in log, log
