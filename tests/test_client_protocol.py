"""How the client treats a server that breaks the protocol: a clear error, a closed connection, no hang.

No installed server can be told to send a bad magic or a chunk outside the request, so these
tests script one: a thread that negotiates correctly and then answers the first requests the
way each case says. The client must fail every pending request and close the socket, which the
script observes as EOF.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from pathlib import Path

import pytest

from pynbd.client import NBDConnectionError, NBDError, ProtocolViolation, connect
from pynbd.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    SIMPLE_REPLY_MAGIC,
    Chunk,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.protocol.wire import (
    OPTION_HEADER,
    REQUEST,
    decode_request,
    encode_block_status_chunk,
    encode_chunk_header,
    encode_error_chunk,
    encode_info_export,
    encode_none_chunk,
    encode_offset_data_header,
    encode_offset_hole,
    encode_option_reply,
    encode_rep_meta_context,
    encode_simple_reply,
)

pytestmark = pytest.mark.timeout(60)
SIZE = 1 << 20
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


class ScriptedServer:
    """Negotiates like a structured-reply server, then replies to each request with ``answer``.

    Subclasses script the transmission phase differently by overriding :meth:`_transmission`.
    """

    def __init__(self, workdir: Path, answer=None, flags: int = FLAGS) -> None:
        self.path = str(workdir / "fake.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.answer = answer
        self.flags = flags
        self.saw_eof = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                self._negotiate(conn)
                self._transmission(conn)
            except (EOFError, ConnectionError):
                self.saw_eof.set()

    def _negotiate(self, conn: socket.socket) -> None:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        _recv_exact(conn, 4)
        while True:
            _, option, length = OPTION_HEADER.unpack(_recv_exact(conn, OPTION_HEADER.size))
            _recv_exact(conn, length)
            if option == Opt.SET_META_CONTEXT:
                meta = encode_rep_meta_context(7, "base:allocation")
                conn.sendall(encode_option_reply(option, Rep.META_CONTEXT, meta))
            elif option == Opt.GO:
                conn.sendall(encode_option_reply(option, Rep.INFO, encode_info_export(SIZE, self.flags)))
            conn.sendall(encode_option_reply(option, Rep.ACK))
            if option == Opt.GO:
                return

    def _transmission(self, conn: socket.socket) -> None:
        while True:
            request = decode_request(_recv_exact(conn, REQUEST.size))
            reply = self.answer(request)
            if isinstance(reply, tuple):  # (bytes, "close"): send, then hang up
                conn.sendall(reply[0])
                conn.shutdown(socket.SHUT_WR)
                reply = b""
            conn.sendall(reply)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def read_data(r, offset: int, data: bytes, done: bool = True) -> bytes:
    return encode_offset_data_header(r.cookie, offset, len(data), done) + data


CASES = {
    "bad reply magic": lambda r: b"\x12\x34\x56\x78" + bytes(12),
    "unknown cookie": lambda r: encode_simple_reply(0, r.cookie + 1000) + bytes(r.length),
    "data chunk outside the request": lambda r: read_data(r, r.offset + r.length, b"x"),
    "hole chunk outside the request": lambda r: encode_offset_hole(r.cookie, r.offset + 512, r.length, True),
    "block status chunk to a read": lambda r: encode_block_status_chunk(r.cookie, 7, [(512, 0)], True),
    "read reply missing data": lambda r: read_data(r, r.offset, b"x" * (r.length // 2)),
    "overlapping data chunks": lambda r: read_data(r, r.offset, b"x" * r.length, False) + read_data(r, r.offset, b"y"),
    "unknown chunk type": lambda r: encode_chunk_header(1, 77, r.cookie, 0),
    "NONE chunk with payload": lambda r: encode_chunk_header(1, Chunk.NONE, r.cookie, 4) + bytes(4),
    "simple data reply after structured replies": lambda r: encode_simple_reply(0, r.cookie) + bytes(r.length),
    "connection closed mid-reply": lambda r: (read_data(r, r.offset, b"x" * r.length)[: 20 + 8 + 100], "close"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_protocol_violation_fails_all_pending_requests_and_closes(workdir, case):
    answer = CASES[case]
    server = ScriptedServer(workdir, lambda r: answer(r) if r.type == 0 else encode_none_chunk(r.cookie))

    async def main():
        client = await connect(server.uri, meta_contexts=["base:allocation"])
        reads = [asyncio.ensure_future(client.pread(4096, i * 4096)) for i in range(4)]
        results = await asyncio.gather(*reads, return_exceptions=True)
        with pytest.raises(NBDConnectionError):
            await client.pread(512, 0)
        await client.close()
        return results

    try:
        results = asyncio.run(main())
    finally:
        server.close()
    assert all(isinstance(r, NBDConnectionError) for r in results), results
    if case != "connection closed mid-reply":
        assert any(isinstance(r, ProtocolViolation) for r in results), results
    assert server.saw_eof.is_set()  # the client closed its end


def test_error_chunks_fail_only_their_request(workdir):
    def answer(r):
        if r.type != 0:
            return encode_simple_reply(0, r.cookie)
        if r.offset == 0:
            return encode_error_chunk(r.cookie, 28, "no space left here")
        if r.offset == 4096:
            # an error type this client does not know: the request fails, the stream stays in sync
            return encode_chunk_header(1, 0x8077, r.cookie, 6) + struct.pack(">IH", 5, 0)
        if r.offset == 8192:
            return encode_offset_hole(r.cookie, r.offset, r.length, True)
        return read_data(r, r.offset, b"d" * r.length)

    server = ScriptedServer(workdir, answer)

    async def main():
        async with await connect(server.uri) as client:
            first = await asyncio.gather(client.pread(4096, 0), client.pread(4096, 4096), return_exceptions=True)
            hole = await client.pread(4096, 8192)
            data = await client.pread(100, 12288)
            await client.flush()
            return first, hole, data

    try:
        first, hole, data = asyncio.run(main())
    finally:
        server.close()
    assert isinstance(first[0], NBDError) and first[0].errno == 28 and first[0].message == "no space left here"
    assert isinstance(first[1], NBDError) and first[1].errno == 5
    assert hole == bytes(4096) and data == b"d" * 100


def test_simple_reply_errors_without_structured_replies(workdir):
    server = ScriptedServer(workdir, lambda r: struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 1, r.cookie))

    async def main():
        async with await connect(server.uri, structured_replies=False) as client:
            assert not client.structured
            with pytest.raises(NBDError) as caught:
                await client.pread(512, 0)
            return caught.value.errno

    try:
        assert asyncio.run(main()) == 1
    finally:
        server.close()


def test_sans_io_option_replies():
    from pynbd.protocol.client_negotiation import (
        ExportInfoRequest,
        ListExports,
        OptionError,
        OptionRequest,
        valid_block_size,
    )
    from pynbd.protocol.wire import ProtocolError, encode_info_block_size, encode_rep_server

    listing = ListExports()
    assert not listing.feed(Opt.LIST, Rep.SERVER, encode_rep_server("a", "first"))
    assert listing.feed(Opt.LIST, Rep.ACK, b"") and listing.exports == [("a", "first")]
    go = ExportInfoRequest(Opt.GO, "a")
    go.feed(Opt.GO, Rep.INFO, encode_info_block_size(512, 256, 1 << 20))  # preferred < minimum: ignored
    with pytest.raises(ProtocolError, match="without NBD_INFO_EXPORT"):
        go.feed(Opt.GO, Rep.ACK, b"")
    assert go.info.block_size is None
    with pytest.raises(OptionError) as caught:
        OptionRequest(Opt.STRUCTURED_REPLY).feed(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, b"no thanks")
    assert caught.value.unsupported and caught.value.message == "no thanks"
    with pytest.raises(ProtocolError, match="while we wait"):
        OptionRequest(Opt.GO).feed(Opt.INFO, Rep.ACK, b"")
    assert valid_block_size(1, 4096, 32 << 20) and valid_block_size(512, 4096, 0xFFFFFFFF)
    assert not valid_block_size(3, 4096, 1 << 20) and not valid_block_size(4096, 4096, 5000)
