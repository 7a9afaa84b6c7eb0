"""`pynbd serve` against hostile and broken clients.

Each test abuses a real server over raw sockets or through libnbd with its client-side checks
off, and then proves two things a user cares about: the abuser got the error the spec prescribes
(or a clean disconnect where the stream cannot be trusted), and a well-behaved client that was
connected all along still sees its data intact. Error codes are compared with nbdkit, which
returns the spec's codes.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd
import pytest

from tests.peers import Server

MiB = 1024 * 1024
DISK_SIZE = 64 * MiB  # room for requests just over the 32 MiB payload limit
WITNESS_OFFSET = 0
WITNESS_LENGTH = 1 * MiB
ABUSE_OFFSET = 8 * MiB  # where abusers write, well away from the witness's data

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_SR, OPT_SET_META = 1, 2, 3, 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID = 0x80000001, 0x80000003
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE, CMD_FLAG_FAST_ZERO = 1, 2, 4, 8, 16
CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS, CHUNK_ERROR = 1, 2, 5, 0x8001
EPERM, EINVAL, ENOSPC = 1, 22, 28


# --- a deliberately dumb client: exact bytes on a plain socket -----------------------------------


class RawClient:
    """Speaks NBD byte by byte so tests can break the protocol anywhere they like."""

    def __init__(self, server: Server, timeout: float = 30) -> None:
        if server.socket_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(server.socket_path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        self.structured = False
        self.started = False

    @classmethod
    def adopt(cls, sock: socket.socket, timeout: float = 30) -> RawClient:
        """A client on a socket the caller connected (e.g. one of many connected at once)."""
        client = cls.__new__(cls)
        sock.setblocking(True)
        sock.settimeout(timeout)
        client.sock, client.structured, client.started = sock, False, False
        return client

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), MiB))
            if not chunk:
                raise EOFError(f"server closed the connection after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def disconnected(self) -> bool:
        """Wait until the server closes the connection; True if it did (EOF or reset), with nothing sent first."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def vanish_and_wait(self) -> None:
        """Stop sending mid-stream (half-close) and wait for the server to drop us.

        To the server this is a client that vanished; waiting for its close means its log is written.
        """
        self.sock.shutdown(socket.SHUT_WR)
        assert self.disconnected()

    # -- handshake --------------------------------------------------------------------------------

    def greeting(self) -> int:
        data = self.recv_exactly(18)
        assert data[:16] == NBDMAGIC + IHAVEOPT
        return struct.unpack(">H", data[16:])[0]

    def start(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.greeting()
        self.send(struct.pack(">I", flags))
        self.started = True

    def send_option(self, option: int, payload: bytes = b"") -> None:
        self.send(IHAVEOPT + struct.pack(">II", option, len(payload)) + payload)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == OPTION_REPLY_MAGIC
        return option, reply, self.recv_exactly(length)

    def option(self, option: int, payload: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option and collect its replies up to the final ACK or error."""
        self.send_option(option, payload)
        got = []
        while True:
            opt, reply, data = self.option_reply()
            assert opt == option
            got.append((reply, data))
            if reply == REP_ACK or reply & 0x80000000:
                return got

    def go(self, name: str = "", structured: bool = True, contexts: tuple[str, ...] = ()) -> tuple[int, int]:
        """Negotiate (SR, SET_META_CONTEXT, GO) and return the export's (size, transmission flags)."""
        if not self.started:
            self.start()
        if structured:
            assert self.option(OPT_SR) == [(REP_ACK, b"")]
            self.structured = True
        if contexts:
            raw = name.encode()
            payload = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(contexts))
            payload += b"".join(struct.pack(">I", len(c)) + c.encode() for c in contexts)
            replies = self.option(OPT_SET_META, payload)
            assert [r for r, _ in replies] == [REP_META_CONTEXT] * len(contexts) + [REP_ACK]
        raw = name.encode()
        replies = self.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        assert replies[-1][0] == REP_ACK, replies
        for reply, data in replies:
            if reply == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
                _, size, flags = struct.unpack(">HQH", data)
                return size, flags
        raise AssertionError("no NBD_INFO_EXPORT in the GO replies")

    # -- transmission -----------------------------------------------------------------------------

    def request(self, cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1, payload: bytes = b""):
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload)

    def reply(self, cookie: int = 1, read_length: int = 0, read_offset: int = 0) -> tuple[int, bytes, str]:
        """Read one whole reply; return (error, data read, form) where form is "simple" or "structured".

        For a READ, ``read_offset`` and ``read_length`` say where data chunks belong.
        """
        (magic,) = struct.unpack(">I", self.recv_exactly(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, got_cookie = struct.unpack(">IQ", self.recv_exactly(12))
            assert got_cookie == cookie
            data = self.recv_exactly(read_length) if error == 0 else b""
            return error, data, "simple"
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        error, data = 0, bytearray(read_length)
        while True:
            flags, kind, got_cookie, length = struct.unpack(">HHQI", self.recv_exactly(16))
            assert got_cookie == cookie
            body = self.recv_exactly(length)
            if kind == CHUNK_ERROR:
                error, msg_len = struct.unpack(">IH", body[:6])
                assert error != 0 and 6 + msg_len == length
            elif kind == CHUNK_OFFSET_DATA:
                (offset,) = struct.unpack(">Q", body[:8])
                start = offset - read_offset
                assert 0 <= start and start + length - 8 <= read_length, "data chunk outside the request"
                data[start : start + length - 8] = body[8:]
            if flags & 1:
                return error, bytes(data) if error == 0 else b"", "structured"

    def error_message(self, cookie: int = 1) -> tuple[int, str]:
        """Read a structured error reply and return (error, message)."""
        magic, flags, kind, got_cookie, length = struct.unpack(">IHHQI", self.recv_exactly(20))
        assert (magic, kind, flags & 1, got_cookie) == (STRUCTURED_REPLY_MAGIC, CHUNK_ERROR, 1, cookie)
        body = self.recv_exactly(length)
        error, msg_len = struct.unpack(">IH", body[:6])
        return error, body[6 : 6 + msg_len].decode()

    def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        self.request(CMD_READ, offset, length, cookie=cookie)
        error, data, _ = self.reply(cookie, length, offset)
        assert error == 0
        return data


# --- the well-behaved client ---------------------------------------------------------------------


class Witness:
    """A libnbd client that writes a pattern before the abuse and checks it afterwards."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pattern = os.urandom(WITNESS_LENGTH)
        self.handle = connect(server)
        self.handle.pwrite(self.pattern, WITNESS_OFFSET)
        self.handle.flush()

    def verify(self) -> None:
        """The server is alive, the witness's own connection works, and a fresh one sees the same data."""
        assert self.server.proc.poll() is None, f"server died:\n{self.server.log()}"
        assert self.handle.pread(WITNESS_LENGTH, WITNESS_OFFSET) == self.pattern
        fresh = connect(self.server)
        try:
            assert fresh.pread(WITNESS_LENGTH, WITNESS_OFFSET) == self.pattern
        finally:
            fresh.shutdown()
        self.handle.shutdown()


def connect(server: Server, strict: bool = True, structured: bool = True, meta: bool = False) -> nbd.NBD:
    handle = nbd.NBD()
    if not strict:
        handle.set_strict_mode(0)
    handle.set_request_structured_replies(structured)
    if meta:
        handle.add_meta_context("base:allocation")
    handle.connect_uri(server.uri)
    return handle


@pytest.fixture
def disk(workdir: Path) -> Path:
    image = workdir / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(DISK_SIZE)
    return image


@pytest.fixture
def pynbd(start_pynbd, disk) -> Server:
    return start_pynbd(str(disk))


@pytest.fixture
def witness(pynbd) -> Iterator[Witness]:
    watcher = Witness(pynbd)
    yield watcher
    watcher.verify()


@contextmanager
def raw(server: Server) -> Iterator[RawClient]:
    client = RawClient(server)
    try:
        yield client
    finally:
        client.close()


def start_peer(name: str, start_pynbd, start_nbdkit, disk: Path, *extra: str) -> Server:
    """pynbd or nbdkit serving ``disk`` (nbdkit is the reference for error codes)."""
    if name == "pynbd":
        return start_pynbd(str(disk), *extra)
    return start_nbdkit(*extra, "file", str(disk))


# --- handshake abuse -----------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0xFFFFFFFF, 0x4, FLAG_FIXED_NEWSTYLE | 0x100], ids=hex)
def test_unknown_client_flags_disconnect(pynbd, witness, flags):
    with raw(pynbd) as client:
        client.start(flags)
        assert client.disconnected()
    assert "unknown handshake flags" in pynbd.log()


def test_bad_option_magic_disconnects(pynbd, witness):
    with raw(pynbd) as client:
        client.start()
        client.send(b"IHAVEOPX" + struct.pack(">II", OPT_LIST, 0))
        assert client.disconnected()
    assert "bad option magic" in pynbd.log()


def test_option_length_over_32_mib_disconnects_without_reading_it(pynbd, witness):
    with raw(pynbd) as client:
        client.start()
        client.send(IHAVEOPT + struct.pack(">II", 0x4242, 32 * MiB + 1))  # header only: the server must not wait
        assert client.disconnected()
    assert "over the limit" in pynbd.log()


def test_large_unknown_option_under_the_limit_is_consumed(pynbd, witness):
    with raw(pynbd) as client:
        client.start()
        assert client.option(0x4242, os.urandom(4 * MiB))[0][0] == REP_ERR_UNSUP
        size, _ = client.go()
        assert size == DISK_SIZE
        assert client.read(WITNESS_OFFSET, 4096) == witness.pattern[:4096]


def test_http_request_on_the_nbd_socket_is_dropped(pynbd, witness):
    with raw(pynbd) as client:
        client.greeting()
        client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        client.vanish_and_wait()
    assert "unknown handshake flags 0x47455420" in pynbd.log()  # b"GET "


def test_tls_client_hello_without_starttls_is_dropped(pynbd, witness):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with raw(pynbd) as client:
        client.greeting()  # a TLS client that ignores the greeting and starts its handshake
        with pytest.raises(OSError):  # ssl.SSLError or a reset: either way no TLS session
            context.wrap_socket(client.sock, server_hostname="localhost")
    assert "protocol error" in pynbd.log()


def test_garbage_after_a_good_option_disconnects(pynbd, witness):
    with raw(pynbd) as client:
        client.start()
        assert client.option(OPT_SR) == [(REP_ACK, b"")]
        client.send(os.urandom(64))
        assert client.disconnected()
    assert "protocol error" in pynbd.log()


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connects and goes away at once
        b"\0\0",  # half the client flags
        struct.pack(">I", 3) + IHAVEOPT[:5],  # half an option header
        struct.pack(">I", 3) + IHAVEOPT + struct.pack(">II", OPT_GO, 100) + b"\0\0\0\0",  # part of a payload
    ],
    ids=["nothing", "half-flags", "half-header", "half-payload"],
)
def test_client_vanishing_mid_handshake(pynbd, witness, sent):
    with raw(pynbd) as client:
        client.greeting()
        client.send(sent)
        client.vanish_and_wait()
    if sent:
        assert "mid-message" in pynbd.log()


def test_client_resetting_mid_handshake_over_tcp(start_pynbd, disk):
    server = start_pynbd(str(disk), tcp=True)
    watcher = Witness(server)
    with raw(server) as client:
        client.greeting()
        client.send(struct.pack(">I", 3) + IHAVEOPT[:3])
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    watcher.verify()


def test_flood_of_unknown_options(pynbd, witness):
    """Ten thousand junk options, sent in pipelined bursts: every one is refused and negotiation goes on."""
    with raw(pynbd) as client:
        client.start()
        burst = 500
        for first in range(0, 10_000, burst):
            options = [(0x100 + i, os.urandom(i % 37)) for i in range(first, first + burst)]
            client.send(b"".join(IHAVEOPT + struct.pack(">II", opt, len(p)) + p for opt, p in options))
            for opt, _ in options:
                got_option, reply, message = client.option_reply()
                assert (got_option, reply) == (opt, REP_ERR_UNSUP)
        size, _ = client.go()
        assert size == DISK_SIZE
        assert client.read(WITNESS_OFFSET, WITNESS_LENGTH) == witness.pattern


def test_malformed_go_payload_is_err_invalid_and_negotiation_continues(pynbd, witness):
    with raw(pynbd) as client:
        client.start()
        [(reply, message)] = client.option(OPT_GO, struct.pack(">I", 50) + b"short")
        assert reply == REP_ERR_INVALID and message
        [(reply, _)] = client.option(OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 2) + b"\0\1")  # count lies
        assert reply == REP_ERR_INVALID
        assert client.go()[0] == DISK_SIZE


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_framing_over_the_wire(pynbd, witness, no_zeroes):
    """EXPORT_NAME's reply is padded with 124 zeroes unless NO_ZEROES: a wrong count would shift every reply."""
    with raw(pynbd) as client:
        client.start(FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0))
        client.send_option(OPT_EXPORT_NAME, b"")
        size, flags = struct.unpack(">QH", client.recv_exactly(10))
        assert size == DISK_SIZE and flags & 1
        if not no_zeroes:
            assert client.recv_exactly(124) == bytes(124)
        assert client.read(WITNESS_OFFSET, 512) == witness.pattern[:512]


# --- transmission abuse: error codes, compared with nbdkit ---------------------------------------

END = DISK_SIZE
PAST_END_CASES = [
    # (command, offset, length, flags, expected error)
    ("read-past-end", CMD_READ, END, 512, 0, EINVAL),
    ("read-straddling", CMD_READ, END - 512, 1024, 0, EINVAL),
    ("read-wrapping-2^64", CMD_READ, (1 << 64) - 512, 1024, 0, EINVAL),
    ("write-past-end", CMD_WRITE, END, 512, 0, ENOSPC),
    ("write-straddling", CMD_WRITE, END - 512, 1024, 0, ENOSPC),
    ("write-zeroes-past-end", CMD_WRITE_ZEROES, END - 512, 1024, 0, ENOSPC),
    ("trim-past-end", CMD_TRIM, END, 4096, 0, EINVAL),
    ("cache-past-end", CMD_CACHE, END, 4096, 0, EINVAL),
    ("unknown-command", 100, 0, 512, 0, EINVAL),
    ("unknown-flag", CMD_READ, 0, 512, 1 << 9, EINVAL),
    ("no-hole-on-write", CMD_WRITE, ABUSE_OFFSET, 512, CMD_FLAG_NO_HOLE, EINVAL),
    ("req-one-on-read", CMD_READ, 0, 512, CMD_FLAG_REQ_ONE, EINVAL),
    ("fast-zero-on-trim", CMD_TRIM, ABUSE_OFFSET, 512, CMD_FLAG_FAST_ZERO, EINVAL),
    ("flush-with-length", CMD_FLUSH, 0, 512, 0, EINVAL),
    ("block-status-without-context", CMD_BLOCK_STATUS, 0, 4096, 0, EINVAL),
]


def expect_error(client: RawClient, cmd: int, offset: int, length: int, flags: int, error: int, cookie: int) -> str:
    """Send one bad request (with its payload if it is a WRITE) and check the error; return the reply form."""
    payload = b"\xee" * length if cmd == CMD_WRITE else b""
    client.request(cmd, offset, length, flags, cookie, payload)
    got, _, form = client.reply(cookie)
    assert got == error
    return form


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("peer", ["pynbd", "nbdkit"])
def test_bad_requests_get_the_spec_errors(start_pynbd, start_nbdkit, disk, peer, structured):
    """Every bad request on one connection: each gets its error and the connection stays usable."""
    server = start_peer(peer, start_pynbd, start_nbdkit, disk)
    watcher = Witness(server)
    with raw(server) as client:
        client.go(structured=structured)
        for cookie, (_, cmd, offset, length, flags, error) in enumerate(PAST_END_CASES, start=1):
            form = expect_error(client, cmd, offset, length, flags, error, cookie)
            if peer == "pynbd":  # the spec allows either form with SR; pynbd always sends error chunks then
                assert form == ("structured" if structured else "simple")
            assert client.read(WITNESS_OFFSET, 4096, cookie=1000 + cookie) == watcher.pattern[:4096]
        # nothing was written by the refused requests
        assert client.read(END - 4096, 4096) == bytes(4096)
        assert client.read(ABUSE_OFFSET, 512) == bytes(512)
    watcher.verify()
    if peer == "pynbd":
        log = server.log()
        assert "past the end" in log and "unknown command 100" in log and "no meta context" in log


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_df_without_structured_replies(start_pynbd, start_nbdkit, disk, structured):
    """DF is only valid once structured replies are on; without them both servers refuse it."""
    for server in (start_pynbd(str(disk)), start_nbdkit("file", str(disk))):
        with raw(server) as client:
            client.go(structured=structured)
            client.request(CMD_READ, 0, 4096, CMD_FLAG_DF)
            error, data, _ = client.reply(1, 4096)
            assert error == (0 if structured else EINVAL), server.argv
            if structured:
                assert data == bytes(4096)


def test_error_chunks_carry_a_message(pynbd, witness):
    with raw(pynbd) as client:
        client.go(structured=True)
        client.request(CMD_READ, END, 512)
        error, message = client.error_message()
        assert error == EINVAL and "past the end" in message


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_block_status_past_the_end(start_pynbd, start_nbdkit, disk, structured):
    """With a context negotiated, a range past the end is EINVAL (structured replies are required for contexts)."""
    for server in (start_pynbd(str(disk)), start_nbdkit("file", str(disk))):
        with raw(server) as client:
            client.go(contexts=("base:allocation",))
            for cookie, (offset, length) in enumerate([(END, 512), (END - 512, 1024)], start=1):
                client.request(CMD_BLOCK_STATUS, offset, length, cookie=cookie)
                assert client.reply(cookie)[0] == EINVAL, server.argv
            client.request(CMD_BLOCK_STATUS, 0, 4096, cookie=9)
            assert client.reply(9)[0] == 0


@pytest.mark.parametrize("peer", ["pynbd", "nbdkit"])
def test_bad_request_magic_disconnects(start_pynbd, start_nbdkit, disk, peer):
    server = start_peer(peer, start_pynbd, start_nbdkit, disk)
    watcher = Witness(server)
    with raw(server) as client:
        client.go()
        client.send(struct.pack(">IHHQQI", 0x12345678, 0, CMD_READ, 1, 0, 512))
        assert client.disconnected()
    watcher.verify()
    if peer == "pynbd":
        assert "bad request magic 0x12345678" in server.log()


@pytest.mark.parametrize("peer", ["pynbd", "nbdkit"])
def test_read_only_export_refuses_writes_with_eperm(start_pynbd, start_nbdkit, disk, peer):
    server = start_peer(peer, start_pynbd, start_nbdkit, disk, "--read-only" if peer == "pynbd" else "-r")
    with open(disk, "rb") as f:
        before = f.read(MiB)
    with raw(server) as client:
        _, flags = client.go()
        assert flags & 2  # READ_ONLY
        cases = [
            (CMD_WRITE, 0, 4096, 0),
            (CMD_WRITE, 0, 4096, CMD_FLAG_FUA),
            (CMD_WRITE_ZEROES, 0, 4096, 0),
            (CMD_WRITE_ZEROES, 0, 4096, CMD_FLAG_NO_HOLE),
            (CMD_TRIM, 0, 4096, 0),
        ]
        for cookie, (cmd, offset, length, flags) in enumerate(cases, start=1):
            expect_error(client, cmd, offset, length, flags, EPERM, cookie)
        assert client.read(0, MiB) == before  # the WRITE payloads were consumed, not applied
    if peer == "pynbd":
        assert "read-only" in server.log()


# --- oversized requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_payloads_up_to_32_mib_are_served(pynbd, witness, structured):
    data = os.urandom(32 * MiB)
    with raw(pynbd) as client:
        client.go(structured=structured)
        client.request(CMD_WRITE, 16 * MiB, len(data), payload=data)
        assert client.reply()[0] == 0
        assert client.read(16 * MiB, len(data)) == data


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_oversized_read_is_refused_and_connection_stays_usable(pynbd, witness, structured):
    with raw(pynbd) as client:
        client.go(structured=structured)
        client.request(CMD_READ, 0, 32 * MiB + 512)
        assert client.reply()[0] == EINVAL
        assert client.read(WITNESS_OFFSET, WITNESS_LENGTH, cookie=2) == witness.pattern
    assert "over the 32 MiB limit" in pynbd.log()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_oversized_write_is_refused_after_consuming_its_payload(pynbd, witness, structured):
    data = b"\xab" * (32 * MiB + 512)
    with raw(pynbd) as client:
        client.go(structured=structured)
        client.request(CMD_WRITE, ABUSE_OFFSET, len(data), payload=data)
        assert client.reply()[0] == EINVAL
        # the stream is still in sync: the next request's reply comes back, and nothing was written
        assert client.read(ABUSE_OFFSET, MiB, cookie=2) == bytes(MiB)
        assert client.read(WITNESS_OFFSET, WITNESS_LENGTH, cookie=3) == witness.pattern
    assert "over the 32 MiB limit" in pynbd.log()


def test_oversized_requests_through_libnbd(pynbd, witness):
    handle = connect(pynbd, strict=False)
    with pytest.raises(nbd.Error) as err:
        handle.pread(33 * MiB, 0)
    assert err.value.errnum == EINVAL
    with pytest.raises(nbd.Error) as err:
        handle.pwrite(b"\1" * (33 * MiB), 0)
    assert err.value.errnum == EINVAL
    assert handle.pread(WITNESS_LENGTH, WITNESS_OFFSET) == witness.pattern
    handle.shutdown()


# --- the same abuse through libnbd with its checks off ---------------------------------------------


LIBNBD_CASES = [
    ("pread-past-end", lambda h: h.pread(512, END), EINVAL),
    ("pread-straddling", lambda h: h.pread(1024, END - 512), EINVAL),
    ("pwrite-past-end", lambda h: h.pwrite(b"x" * 1024, END - 512), ENOSPC),
    ("zero-past-end", lambda h: h.zero(1024, END - 512), ENOSPC),
    ("zero-no-hole-past-end", lambda h: h.zero(1024, END, nbd.CMD_FLAG_NO_HOLE), ENOSPC),
    ("trim-past-end", lambda h: h.trim(1024, END - 512), EINVAL),
    ("cache-past-end", lambda h: h.cache(1024, END), EINVAL),
    ("pread-unknown-flag", lambda h: h.pread(512, 0, 1 << 9), EINVAL),
    ("pwrite-no-hole", lambda h: h.pwrite(b"x" * 512, ABUSE_OFFSET, nbd.CMD_FLAG_NO_HOLE), EINVAL),
    ("flush-req-one", lambda h: h.flush(nbd.CMD_FLAG_REQ_ONE), EINVAL),
    ("block-status-no-context", lambda h: h.block_status(4096, 0, lambda *a: 0), EINVAL),
]


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("peer", ["pynbd", "nbdkit"])
def test_libnbd_non_strict_errors(start_pynbd, start_nbdkit, disk, peer, structured):
    server = start_peer(peer, start_pynbd, start_nbdkit, disk)
    watcher = Witness(server)
    handle = connect(server, strict=False, structured=structured)
    seen = {}
    for name, call, _ in LIBNBD_CASES:
        if name == "block-status-no-context" and not structured:
            continue  # without SR there is no block status at all
        try:
            call(handle)
            seen[name] = 0
        except nbd.Error as exc:
            seen[name] = exc.errnum
    expected = {name: error for name, _, error in LIBNBD_CASES if name in seen}
    assert seen == expected
    assert handle.pread(WITNESS_LENGTH, WITNESS_OFFSET) == watcher.pattern
    assert handle.pread(MiB, END - MiB) == bytes(MiB)
    handle.shutdown()
    watcher.verify()


@pytest.mark.parametrize("peer", ["pynbd", "nbdkit"])
def test_libnbd_block_status_past_end_with_context(start_pynbd, start_nbdkit, disk, peer):
    server = start_peer(peer, start_pynbd, start_nbdkit, disk)
    handle = connect(server, strict=False, meta=True)
    with pytest.raises(nbd.Error) as err:
        handle.block_status(1024, END - 512, lambda *a: 0)
    assert err.value.errnum == EINVAL
    handle.shutdown()


@pytest.mark.parametrize("peer", ["pynbd", "nbdkit"])
def test_libnbd_writes_on_read_only_export(start_pynbd, start_nbdkit, disk, peer):
    server = start_peer(peer, start_pynbd, start_nbdkit, disk, "--read-only" if peer == "pynbd" else "-r")
    handle = connect(server, strict=False)
    assert handle.is_read_only()
    for call in (
        lambda: handle.pwrite(b"x" * 4096, 0),
        lambda: handle.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA),
        lambda: handle.zero(4096, 0),
        lambda: handle.trim(4096, 0),
    ):
        with pytest.raises(nbd.Error) as err:
            call()
        assert err.value.errnum == EPERM
    assert handle.pread(4096, 0) == bytes(4096)
    handle.shutdown()


def test_unaligned_requests_are_fine(pynbd, witness):
    """The advertised minimum block size is 1, so odd offsets and lengths must just work."""
    handle = connect(pynbd)
    handle.pwrite(b"abc", ABUSE_OFFSET + 1)
    assert handle.pread(5, ABUSE_OFFSET) == b"\0abc\0"
    handle.zero(1, ABUSE_OFFSET + 2)
    assert handle.pread(5, ABUSE_OFFSET) == b"\0a\0c\0"
    handle.shutdown()


# --- clients vanishing mid-request ------------------------------------------------------------------


def test_client_vanishing_mid_write_payload(pynbd, witness):
    """A WRITE whose payload never fully arrives must not be applied, and is logged."""
    with raw(pynbd) as client:
        client.go()
        client.request(CMD_WRITE, ABUSE_OFFSET, MiB)
        client.send(b"\xcd" * (MiB // 2))
        client.vanish_and_wait()
    handle = connect(pynbd)
    assert handle.pread(MiB, ABUSE_OFFSET) == bytes(MiB)
    handle.shutdown()
    assert "mid-message" in pynbd.log()


def test_client_vanishing_mid_request_header(pynbd, witness):
    with raw(pynbd) as client:
        client.go()
        client.send(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_READ))
        client.vanish_and_wait()
    assert "mid-message" in pynbd.log()


def test_client_vanishing_with_replies_pending(pynbd, witness):
    """Pipelined reads whose replies nobody reads: the server drops the client, not itself."""
    with raw(pynbd) as client:
        client.go()
        for cookie in range(64):
            client.request(CMD_READ, 0, MiB, cookie=cookie)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_many_abusers_at_once(pynbd, witness):
    """Several broken clients open at the same time as good traffic."""
    clients = [RawClient(pynbd) for _ in range(20)]
    try:
        for i, client in enumerate(clients):
            client.greeting()
            client.send([b"", b"\0", b"\xff\xff\xff\xff", struct.pack(">I", 3) + b"IHAVE"][i % 4])
        handle = connect(pynbd)
        data = os.urandom(MiB)
        handle.pwrite(data, ABUSE_OFFSET)
        assert handle.pread(MiB, ABUSE_OFFSET) == data
        handle.shutdown()
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_payloadless_commands_may_exceed_32_mib(pynbd, witness, structured):
    """TRIM, WRITE_ZEROES and BLOCK_STATUS carry no payload, so lengths over 32 MiB must be served."""
    with raw(pynbd) as client:
        client.go(structured=structured, contexts=("base:allocation",) if structured else ())
        big = 48 * MiB
        client.request(CMD_WRITE, ABUSE_OFFSET, MiB, payload=b"\x77" * MiB)
        assert client.reply()[0] == 0
        client.request(CMD_WRITE_ZEROES, 2 * MiB, big, CMD_FLAG_NO_HOLE, cookie=2)
        assert client.reply(2)[0] == 0
        client.request(CMD_TRIM, 2 * MiB, big, cookie=3)
        assert client.reply(3)[0] == 0
        if structured:
            client.request(CMD_BLOCK_STATUS, 0, DISK_SIZE, cookie=4)
            assert client.reply(4)[0] == 0
        assert client.read(ABUSE_OFFSET, MiB, cookie=5) == bytes(MiB)  # zeroed, then trimmed


def test_zero_length_requests_get_answers(pynbd, witness):
    """The spec leaves zero-length requests unspecified; whatever the answer, one must come and nothing break."""
    with raw(pynbd) as client:
        client.go(contexts=("base:allocation",))
        for cookie, cmd in enumerate([CMD_READ, CMD_WRITE, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS]):
            client.request(cmd, 0, 0, cookie=cookie)
            client.reply(cookie)
        assert client.read(WITNESS_OFFSET, WITNESS_LENGTH, cookie=99) == witness.pattern
    assert "crashed" not in pynbd.log()
