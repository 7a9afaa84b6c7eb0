"""Requests whose callers give up (cancelled, timed out) while the server still owes their replies.

The late reply must be received and dropped: the stream stays in step, nothing of it lands in
the caller's buffer (which the caller may already be using for something else: the daemon's
pooled reply buffers), and the request keeps its place among ``max_requests`` until the reply
has arrived, so the server never has more requests to answer than the limit.

A scripted server decides exactly when each reply goes out and counts what the client has on the
wire; nbdkit's pause filter holds real requests the same way, for the client and for the
daemon's ``nbd`` node.
"""

from __future__ import annotations

import asyncio
import os
import queue
import selectors
import socket
import threading

import pytest

from pynbd.buffers import BufferPool
from pynbd.client import NBDError, connect
from pynbd.client.uri import NBDURI
from pynbd.nodes.nbd import NBDNode
from pynbd.protocol.constants import BASE_ALLOCATION, Cmd, TransmissionFlag
from pynbd.protocol.wire import (
    REQUEST,
    decode_request,
    encode_block_status_chunk,
    encode_error_chunk,
    encode_offset_data_header,
    encode_offset_hole,
    encode_simple_reply,
)
from tests.test_client_protocol import SIZE, ScriptedServer, read_data

pytestmark = pytest.mark.timeout(60)
KiB = 1 << 10
IMAGE = os.urandom(SIZE)  # what the scripted server's export holds
SENTINEL = 0xEE
ALL_COMMANDS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_CACHE
)


def untouched(buf) -> bool:
    return bytes(buf) == bytes([SENTINEL]) * len(buf)


class GatedServer(ScriptedServer):
    """Holds every reply until the test sends it, and counts what the client has outstanding.

    Before it sends anything it takes in every request the client has already written (a Unix
    socket delivers a send at once), so :attr:`most_outstanding` is exact: the largest number of
    requests the client had sent that the server had not finished answering.
    """

    def __init__(self, workdir, flags: int = ALL_COMMANDS) -> None:
        self.requests: list = []  # in arrival order
        self.payloads: dict[int, bytes] = {}  # WRITE payloads by cookie
        self.arrived = threading.Condition()
        self.outstanding = 0
        self.most_outstanding = 0
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(workdir, flags=flags)

    # -- the test's side --------------------------------------------------------------------

    async def wait_requests(self, count: int) -> list:
        """Wait until ``count`` requests have arrived; all of them, in order."""

        def wait() -> bool:
            with self.arrived:
                return self.arrived.wait_for(lambda: len(self.requests) >= count, timeout=30)

        assert await asyncio.to_thread(wait), f"only {len(self.requests)} of {count} requests arrived"
        return self.requests[:count]

    async def send(self, data: bytes, completes: int = 1) -> None:
        """Send ``data`` (the replies, whole or in part, of ``completes`` requests) and wait until it is out."""
        sent = threading.Event()
        self._outbox.put((data, completes, sent))
        self._wake_writer.send(b"!")
        assert await asyncio.to_thread(sent.wait, 30), "the server did not send"

    def close(self) -> None:
        self._outbox.put((None, 0, None))
        self._wake_writer.send(b"!")
        super().close()

    # -- the server thread ----------------------------------------------------------------------

    def _transmission(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        received = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_reader:
                        self._wake_reader.recv(4096)
                self._take_requests(conn, received)
                while not self._outbox.empty():
                    data, completes, sent = self._outbox.get()
                    if data is None:
                        return
                    with self.arrived:
                        self.outstanding -= completes
                    conn.setblocking(True)
                    conn.sendall(data)
                    conn.setblocking(False)
                    sent.set()

    def _take_requests(self, conn: socket.socket, received: bytearray) -> None:
        while True:
            try:
                data = conn.recv(1 << 20)
            except BlockingIOError:
                return
            if not data:
                raise EOFError
            received += data
            while len(received) >= REQUEST.size:
                request = decode_request(bytes(received[: REQUEST.size]))
                payload = request.length if request.type == Cmd.WRITE else 0
                if len(received) < REQUEST.size + payload:
                    break
                if payload:
                    self.payloads[request.cookie] = bytes(received[REQUEST.size : REQUEST.size + payload])
                del received[: REQUEST.size + payload]
                if request.type == Cmd.DISC:
                    continue
                with self.arrived:
                    self.requests.append(request)
                    self.outstanding += 1
                    self.most_outstanding = max(self.most_outstanding, self.outstanding)
                    self.arrived.notify_all()


def data_reply(request, structured: bool = True) -> bytes:
    data = IMAGE[request.offset : request.offset + request.length]
    if structured:
        return read_data(request, request.offset, data)
    return encode_simple_reply(0, request.cookie) + data


@pytest.fixture
def gated(workdir):
    server = GatedServer(workdir)
    yield server
    server.close()


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_cancelled_reads_keep_their_slots_and_their_late_data_is_dropped(gated, structured):
    limit, size = 4, 64 * KiB

    async def main():
        client = await connect(gated.uri, max_requests=limit, structured_replies=structured)
        try:
            buffers = [bytearray([SENTINEL]) * size for _ in range(6)]
            reads = [asyncio.ensure_future(client.pread_into(buf, i * size)) for i, buf in enumerate(buffers)]
            on_wire = await gated.wait_requests(limit)
            assert [r.offset for r in on_wire] == [i * size for i in range(limit)]
            # the first two callers give up; the two reads waiting for a slot must go on waiting
            for task in reads[:2]:
                task.cancel()
            outcome = await asyncio.gather(*reads[:2], return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in outcome)
            assert client.in_flight == limit  # given up, still on the wire
            # late replies: all data for the first, a hole (or data) for the second
            await gated.send(data_reply(on_wire[0], structured))
            if structured:
                await gated.send(encode_offset_hole(on_wire[1].cookie, on_wire[1].offset, size, True))
            else:
                await gated.send(data_reply(on_wire[1], structured))
            # only now are their slots free: the two waiting reads go out
            for request in (await gated.wait_requests(limit + 2))[2:]:
                await gated.send(data_reply(request, structured))
            await asyncio.gather(*reads[2:])
            await client.wait_idle()
            assert client.in_flight == 0 and not client.closed
            # the stream is in step: a later read gets its own data
            later = asyncio.ensure_future(client.pread(8 * KiB, 5 * size))
            [request] = (await gated.wait_requests(limit + 3))[-1:]
            await gated.send(data_reply(request, structured))
            return buffers, await later
        finally:
            await client.close()

    buffers, later = asyncio.run(main())
    assert untouched(buffers[0]) and untouched(buffers[1])  # the late data and hole went nowhere
    for i in range(2, 6):
        assert buffers[i] == IMAGE[i * size : (i + 1) * size]
    assert later == IMAGE[5 * size : 5 * size + 8 * KiB]
    assert gated.most_outstanding == limit


def test_a_read_cancelled_between_and_inside_chunks_keeps_its_buffer(gated):
    """Cancelled after its first chunk, and again in the middle of a chunk's data: what arrives
    after the cancellation (the rest of the chunk, the next chunk) is not written."""
    size, half = 128 * KiB, 64 * KiB

    async def main():
        client = await connect(gated.uri)
        try:
            first, second = bytearray([SENTINEL]) * size, bytearray([SENTINEL]) * size
            read1 = asyncio.ensure_future(client.pread_into(first, 0))
            read2 = asyncio.ensure_future(client.pread_into(second, size))
            marker = asyncio.ensure_future(client.pread(4 * KiB, 4 * size))
            r1, r2, rm = await gated.wait_requests(3)
            # read1's first half, then all of the marker read: when the marker is done, so is that chunk
            await gated.send(read_data(r1, 0, IMAGE[:half], done=False) + data_reply(rm), completes=1)
            assert await marker == IMAGE[4 * size : 4 * size + 4 * KiB]
            read1.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read1
            await gated.send(read_data(r1, half, IMAGE[half:size]), completes=1)  # its second chunk, late
            # read2: a chunk header and a little of its data, then the caller gives up mid-chunk
            chunk = encode_offset_data_header(r2.cookie, size, size, True) + IMAGE[size : 2 * size]
            await gated.send(chunk[: 20 + 8 + 16 * KiB], completes=0)
            read2.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read2
            at_cancel = bytes(second)
            await gated.send(chunk[20 + 8 + 16 * KiB :], completes=1)
            await client.wait_idle()
            later = asyncio.ensure_future(client.pread(size, 2 * size))
            [request] = (await gated.wait_requests(4))[-1:]
            await gated.send(data_reply(request))
            return first, second, at_cancel, await later
        finally:
            await client.close()

    first, second, at_cancel, later = asyncio.run(main())
    assert first[:half] == IMAGE[:half] and untouched(first[half:])
    assert bytes(second) == at_cancel and untouched(second[16 * KiB :])
    assert later == IMAGE[2 * size : 3 * size]
    assert gated.most_outstanding == 3


def test_cancelled_writes_zeroes_and_block_status_take_their_late_replies_cleanly(gated):
    limit = 3

    async def main():
        client = await connect(gated.uri, max_requests=limit, meta_contexts=[BASE_ALLOCATION])
        try:
            payload = os.urandom(8 * KiB)
            given_up = [
                asyncio.ensure_future(client.pwrite(payload, 0)),
                asyncio.ensure_future(client.zero(64 * KiB, 64 * KiB)),
                asyncio.ensure_future(client.block_status(64 * KiB, 0)),
            ]
            waiting = [
                asyncio.ensure_future(client.trim(64 * KiB, 128 * KiB)),
                asyncio.ensure_future(client.flush()),
                asyncio.ensure_future(client.cache(64 * KiB, 0)),
            ]
            write, zero, status = await gated.wait_requests(limit)
            assert [r.type for r in (write, zero, status)] == [Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS]
            assert gated.payloads[write.cookie] == payload
            for task in given_up:
                task.cancel()
            outcome = await asyncio.gather(*given_up, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in outcome)
            assert client.in_flight == limit
            # late: an error for the write (nobody to tell), a simple reply, a block status chunk
            await gated.send(encode_error_chunk(write.cookie, 28, "late and full"))
            await gated.send(encode_simple_reply(0, zero.cookie))
            await gated.send(encode_block_status_chunk(status.cookie, 7, [(64 * KiB, 3)], True))
            for request in (await gated.wait_requests(2 * limit))[limit:]:
                await gated.send(encode_simple_reply(0, request.cookie))
            await asyncio.gather(*waiting)
            # the connection still serves: a block status and a refused write, each answered as its own
            status = asyncio.ensure_future(client.block_status(64 * KiB, 64 * KiB))
            [request] = (await gated.wait_requests(2 * limit + 1))[-1:]
            await gated.send(encode_block_status_chunk(request.cookie, 7, [(64 * KiB, 0)], True))
            extents = await status
            refused = asyncio.ensure_future(client.pwrite(payload, 4 * KiB))
            [request] = (await gated.wait_requests(2 * limit + 2))[-1:]
            assert gated.payloads[request.cookie] == payload
            await gated.send(encode_error_chunk(request.cookie, 1, "no"))
            with pytest.raises(NBDError) as caught:
                await refused
            await client.wait_idle()
            assert not client.closed
            return extents, caught.value.errno
        finally:
            await client.close()

    extents, error = asyncio.run(main())
    assert [(e.offset, e.length, e.flags) for e in extents[BASE_ALLOCATION]] == [(64 * KiB, 64 * KiB, 0)]
    assert error == 1
    assert gated.most_outstanding == limit


# -- a real server: nbdkit's pause filter holds the requests -------------------------------------------


class PauseControl:
    """nbdkit-pause-filter's control socket: 'p' answers 'P' once nothing is in flight, 'r' answers 'R'."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # the filter listens before nbdkit serves its first client
        self.sock.settimeout(30)

    def _say(self, command: bytes) -> None:
        self.sock.sendall(command)
        assert self.sock.recv(1) == command.upper()

    def pause(self) -> None:
        self._say(b"p")

    def resume(self) -> None:
        self._say(b"r")

    def close(self) -> None:
        self.sock.close()


def paused_nbdkit(start_nbdkit, workdir, size: int, *options: str):
    control = str(workdir / "pause.ctl")
    return start_nbdkit(*options, "--filter=pause", "memory", str(size), f"pause-control={control}"), control


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_reads_given_up_on_in_a_paused_nbdkit_leave_the_buffers_alone(start_nbdkit, workdir, tls_certs, tls):
    options = ("--tls=require", f"--tls-certificates={tls_certs.dir}") if tls else ()
    remote, control_path = paused_nbdkit(start_nbdkit, workdir, 1 << 20, *options)
    uri = f"nbds+unix:///?socket={remote.socket_path}&tls-certificates={tls_certs.ca_only_dir}" if tls else remote.uri
    size = 64 * KiB
    content = os.urandom(4 * size)

    async def main():
        client = await connect(uri, max_requests=2)
        assert client.tls is tls
        control = PauseControl(control_path)
        try:
            await client.pwrite(content, 0)
            control.pause()
            buffers = [bytearray([SENTINEL]) * size for _ in range(4)]
            # two callers with a timeout: nbdkit holds their reads, they give up
            timed_out = await asyncio.gather(
                *(asyncio.wait_for(client.pread_into(buffers[i], i * size), 0.2) for i in range(2)),
                return_exceptions=True,
            )
            assert all(isinstance(r, TimeoutError) for r in timed_out), timed_out
            assert client.in_flight == 2
            waiting = [asyncio.ensure_future(client.pread_into(buffers[i], i * size)) for i in (2, 3)]
            control.resume()
            await asyncio.gather(*waiting)
            await client.wait_idle()  # the two late replies have come and gone
            again = await client.pread(4 * size, 0)
            return buffers, again
        finally:
            control.close()
            await client.disconnect()

    buffers, again = asyncio.run(main())
    assert untouched(buffers[0]) and untouched(buffers[1])
    assert buffers[2] == content[2 * size : 3 * size] and buffers[3] == content[3 * size :]
    assert again == content


def test_a_node_read_given_up_on_hands_back_a_pooled_buffer_the_remote_cannot_reach(start_nbdkit, workdir):
    """The daemon's NBD server reads into pooled buffers through the nbd node. A read given up on
    returns its buffer to the pool at once; the remote's late reply must not land in it while
    another request is using it."""
    remote, control_path = paused_nbdkit(start_nbdkit, workdir, 1 << 20)
    size = 256 * KiB
    content = os.urandom(2 * size)

    async def main():
        node = NBDNode(NBDURI("unix", socket_path=remote.socket_path))
        await node.open()
        control = PauseControl(control_path)
        pool = BufferPool()
        try:
            await node.write(0, content)
            control.pause()
            buf = pool.get(size)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(node.read_into(0, memoryview(buf)), 0.2)
            pool.put(buf)
            reused = pool.get(size)
            assert reused.obj is buf.obj  # the same pooled memory (the pool hands out views of it)
            reused[:] = bytes([SENTINEL]) * size  # the next user's data
            control.resume()
            await node.client.wait_idle()
            kept = bytes(reused)
            await node.read_into(size, memoryview(reused))
            return kept, bytes(reused)
        finally:
            control.close()
            await node.close()

    kept, read_after = asyncio.run(main())
    assert untouched(kept)
    assert read_after == content[size:]
