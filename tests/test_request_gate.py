"""The request gate and drain (pynbd/graph/io.py) on real nodes, without a daemon.

These pin down what the daemon scenarios (tests/test_drain.py) rely on: the checks every request
passes, that drain waits for requests in flight and holds off new ones, that a request held by a
drain goes where the link points afterwards, and that every wait is cancellation-safe (issue 10.6).
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from pynbd.errors import BlockError
from pynbd.graph.core import BlockGraph, GraphUser
from pynbd.graph.io import drained
from pynbd.graph.perms import ALL, Perm
from pynbd.nodes.cbw import CopyBeforeWriteNode
from pynbd.nodes.memory import MemoryNode
from pynbd.nodes.tracking import RangeLock
from pynbd.protocol.constants import State

WRITER = (Perm.CONSISTENT_READ | Perm.WRITE, ALL & ~Perm.RESIZE)
READER = (Perm.CONSISTENT_READ, ALL)
MiB = 1 << 20


class HeldNode(MemoryNode):
    """A memory disk whose writes wait for :attr:`release` (a request provably in flight)."""

    def __init__(self, size: int, node_name: str = "") -> None:
        super().__init__(size, node_name)
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, offset: int, data, fua: bool = False) -> None:
        self.arrived.set()
        await self.release.wait()
        await super().write(offset, data, fua)


async def settle() -> None:
    """Let every runnable task run until it blocks (no timer involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def read(node: MemoryNode, length: int) -> bytes:
    buf = bytearray(length)
    await node.read_into(0, memoryview(buf))
    return bytes(buf)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_gate_checks_range_and_write_permission():
    async def scenario():
        graph = BlockGraph()
        node = graph.add_node(MemoryNode(MiB, node_name="m"))
        reader = graph.attach_user(GraphUser("r"), node, *READER)
        writer = graph.attach_user(GraphUser("w"), node, *WRITER)
        with pytest.raises(BlockError) as exc:
            await reader.write(0, b"x")
        assert exc.value.errno == errno.EPERM
        with pytest.raises(BlockError) as exc:
            await writer.write(MiB - 1, b"xy")  # past the end, and the link may not resize
        assert exc.value.errno == errno.EINVAL
        await writer.write(MiB - 2, b"xy")
        buf = bytearray(b"\xff" * 8)
        await reader.read_into(MiB - 2, memoryview(buf))  # past the end reads as zeroes
        assert bytes(buf) == b"xy" + bytes(6)
        assert node.io.in_flight == 0

    run(scenario())


def test_gate_marks_dirty_bitmaps_only_for_changes_that_pass_the_checks():
    async def scenario():
        from pynbd.bitmap import NodeBitmap

        graph = BlockGraph()
        node = graph.add_node(MemoryNode(MiB, node_name="m"))
        node.dirty_bitmaps["b"] = NodeBitmap("b", MiB, 65536)
        writer = graph.attach_user(GraphUser("w"), node, *WRITER)
        await writer.write(65536, b"x")
        await writer.write_zeroes(3 * 65536, 10)
        with pytest.raises(BlockError):
            await writer.write(MiB, b"x")
        node.unmap = False
        await writer.discard(5 * 65536, 65536)  # discard=ignore: dropped, unmarked
        assert node.dirty_bitmaps["b"].bitmap.dirty_ranges() == [(65536, 65536), (3 * 65536, 65536)]

    run(scenario())


def test_drain_waits_for_requests_in_flight_and_holds_new_ones():
    async def scenario():
        graph = BlockGraph()
        node = graph.add_node(HeldNode(MiB, node_name="m"))
        export = graph.attach_user(GraphUser("e"), node, *WRITER)
        first = asyncio.create_task(export.write(0, b"a" * 512))
        await node.arrived.wait()
        drained_now = asyncio.Event()

        async def drain() -> None:
            async with drained([node]):
                drained_now.set()
                await settle()
                assert node.io.in_flight == 0  # the queued request did not start meanwhile

        draining = asyncio.create_task(drain())
        await settle()
        assert not drained_now.is_set()  # waits for the write in flight
        second = asyncio.create_task(export.write(512, b"b" * 512))
        await settle()
        node.release.set()
        await asyncio.gather(first, draining, second)
        buf = bytearray(1024)
        await export.read_into(0, memoryview(buf))
        assert bytes(buf) == b"a" * 512 + b"b" * 512

    run(scenario())


def test_a_request_held_by_a_drain_goes_where_the_link_points_afterwards():
    async def scenario():
        graph = BlockGraph()
        old = graph.add_node(MemoryNode(MiB, node_name="old"))
        new = graph.add_node(MemoryNode(MiB, node_name="new"))
        export = graph.attach_user(GraphUser("e"), old, *WRITER)
        async with drained([old, new]):
            writing = asyncio.create_task(export.write(0, b"z" * 512))
            await settle()
            graph.replace_node(old, new)  # a pivot
        await writing
        assert await read(new, 512) == b"z" * 512
        assert await read(old, 512) == bytes(512)

    run(scenario())


def test_a_drain_owner_and_its_busy_sections_are_not_held():
    async def scenario():
        graph = BlockGraph()
        node = graph.add_node(MemoryNode(MiB, node_name="m"))
        job = GraphUser("j", "block-job")
        link = graph.attach_user(job, node, *WRITER)
        export = graph.attach_user(GraphUser("e"), node, *WRITER)
        async with drained([node], owner=job):
            await link.write(0, b"j")  # the owner's own requests pass
            async with job.busy():
                await link.write(1, b"k")
            held = asyncio.create_task(export.write(2, b"e"))
            await settle()
            assert not held.done()
        await held

    run(scenario())


def test_a_busy_section_holds_a_drain_and_waits_for_one():
    async def scenario():
        graph = BlockGraph()
        node = graph.add_node(MemoryNode(MiB, node_name="m"))
        job = GraphUser("j", "block-job")
        graph.attach_user(job, node, *WRITER)
        entered = [asyncio.Event(), asyncio.Event()]
        leave = asyncio.Event()
        drained_now, undrain = asyncio.Event(), asyncio.Event()

        async def section(index: int) -> None:
            async with job.busy():
                entered[index].set()
                await leave.wait()

        async def drain() -> None:
            async with drained([node]):
                drained_now.set()
                await undrain.wait()

        first = asyncio.create_task(section(0))
        await entered[0].wait()
        draining = asyncio.create_task(drain())
        await settle()
        assert not drained_now.is_set()  # a chunk under way is waited for
        leave.set()
        await drained_now.wait()
        second = asyncio.create_task(section(1))
        await settle()
        assert not entered[1].is_set()  # no new chunk starts while drained
        undrain.set()
        await asyncio.gather(first, draining, second)
        assert entered[1].is_set()

    run(scenario())


def test_a_cancelled_serialising_request_leaves_nothing_behind():
    async def scenario():
        node = MemoryNode(MiB, node_name="m")
        io = node.io
        read = io.begin_now(0, 4096)
        serialising = asyncio.create_task(io.begin(0, 4096, serialising=True))
        await settle()
        assert not serialising.done()  # waits for the overlapping read
        serialising.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serialising
        assert io.begin_now(0, 4096) is not None  # later overlapping reads do not hang
        io.end(read)

    run(scenario())


def test_a_cancelled_cluster_lock_waiter_does_not_release_the_holder():
    async def scenario():
        graph = BlockGraph()
        disk = graph.add_node(MemoryNode(MiB, node_name="disk"))
        target = graph.add_node(MemoryNode(MiB, node_name="target"))
        cbw = graph.add_node(CopyBeforeWriteNode("cbw"))
        graph.attach_child(cbw, "file", disk)
        graph.attach_child(cbw, "target", target)
        holder_in, holder_out = asyncio.Event(), asyncio.Event()
        third_in = asyncio.Event()

        async def hold(entered: asyncio.Event, leave: asyncio.Event | None) -> None:
            async with cbw._locked(range(0, 1)):
                entered.set()
                if leave is not None:
                    await leave.wait()

        holder = asyncio.create_task(hold(holder_in, holder_out))
        await holder_in.wait()
        waiter = asyncio.create_task(hold(asyncio.Event(), None))
        await settle()
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        third = asyncio.create_task(hold(third_in, None))
        await settle()
        assert not third_in.is_set()  # the holder still holds the cluster
        holder_out.set()
        await asyncio.gather(holder, third)
        assert third_in.is_set() and not cbw._locks

    run(scenario())


def test_a_cancelled_range_lock_waiter_leaves_the_range_to_others():
    async def scenario():
        lock = RangeLock()
        async with lock.hold(0, 10):
            waiter = asyncio.create_task(lock.hold(5, 15).__aenter__())
            await settle()
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        async with lock.hold(0, 20):  # nothing left held
            pass

    run(scenario())


def test_a_cancelled_file_request_waits_for_its_worker_thread():
    """The thread may still be filling the caller's buffer: the request ends only when it is done."""
    import threading

    from pynbd.nodes.file import _blocking

    async def scenario():
        started, release = threading.Event(), threading.Event()

        def slow_read() -> None:
            started.set()
            release.wait(30)

        task = asyncio.create_task(_blocking(slow_read))
        await asyncio.to_thread(started.wait, 30)
        task.cancel()
        await settle()
        assert not task.done()  # still waiting for the thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())


def test_status_and_reads_wholly_past_the_end_are_zero_holes():
    async def scenario():
        graph = BlockGraph()
        node = graph.add_node(MemoryNode(MiB, node_name="m"))
        reader = graph.attach_user(GraphUser("r"), node, *READER)
        assert await reader.block_status(MiB + 4096, 8192) == [(8192, int(State.HOLE | State.ZERO))]
        assert await reader.block_status(MiB - 4096, 8192) == [(8192, int(State.HOLE | State.ZERO))]
        buf = bytearray(b"\xff" * 4096)
        await reader.read_into(2 * MiB, memoryview(buf))
        assert bytes(buf) == bytes(4096)

    run(scenario())
