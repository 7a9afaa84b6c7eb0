"""The server's payload buffers and byte budgets (pynbd/buffers.py), without a server.

The server-level effects (memory bounded under load, backpressure, memory given back) are in
tests/test_limits.py; here the rules those rest on: size classes, the pool's cache cap, and the
budget's order and progress guarantees.
"""

from __future__ import annotations

import asyncio
import mmap

import pytest

from pynbd.buffers import MMAP_CLASS, BufferPool, ByteBudget, size_class

KiB, MiB = 1024, 1024 * 1024


@pytest.mark.parametrize("size", [1, 511, 512, 513, 4095, 4096, 4097, 5000, 65535, 65536, 3 * MiB + 1, 32 * MiB])
def test_size_classes_waste_at_most_a_quarter(size):
    capacity = size_class(size)
    assert capacity >= size
    assert capacity <= max(512, size * 5 // 4 + 1)
    assert size_class(capacity) == capacity  # a class is its own class


def test_powers_of_two_are_their_own_class():
    for bits in range(9, 26):
        assert size_class(1 << bits) == 1 << bits


def test_pool_views_have_the_asked_size_and_reuse_one_buffer_per_class():
    pool = BufferPool()
    view = pool.get(5000)
    assert len(view) == 5000 and len(view.obj) == size_class(5000)
    view[:] = b"x" * 5000  # writable
    first = view.obj
    pool.put(view)
    assert pool.get(4500).obj is first  # same class (5120): the same buffer comes back
    large = pool.get(MMAP_CLASS)
    assert isinstance(large.obj, mmap.mmap)  # large classes are mmaps: freeing unmaps them


def test_pool_keeps_at_most_its_cache_limit_and_forgets_the_stalest_class_first():
    pool = BufferPool(cache_limit=2 * MiB)
    old = [pool.get(MiB) for _ in range(2)]
    for view in old:
        pool.put(view)
    assert pool.cached == 2 * MiB
    newer = pool.get(512 * KiB)  # another class: returning it must push out a 1 MiB buffer
    pool.put(pool.get(512 * KiB))
    pool.put(newer)
    assert pool.cached <= 2 * MiB
    assert pool.get(512 * KiB).obj is newer.obj  # the most recent class stayed
    pool.put(pool.get(4 * MiB))  # larger than the whole cache: not kept
    assert pool.cached <= 2 * MiB
    assert pool.cached <= 2 * MiB
    pool.clear()
    assert pool.cached == 0

def test_an_emptied_class_is_not_picked_to_make_room():
    pool = BufferPool(cache_limit=2 * MiB)
    views = [pool.get(MiB) for _ in range(2)]
    for view in views:
        pool.put(view)
    views = [pool.get(MiB) for _ in range(2)]  # the 1 MiB class (the stalest) is empty now
    pool.put(pool.get(512 * KiB))
    pool.put(pool.get(2 * MiB))  # room is made by dropping the 512 KiB buffer, the only one there
    assert pool.cached == 2 * MiB


def test_budget_serves_waiters_in_order_and_lets_an_oversized_request_through_alone():
    async def scenario():
        budget = ByteBudget(10)
        assert budget.try_take(8)
        order: list[str] = []

        async def take(name: str, size: int) -> None:
            await budget.take(size)
            order.append(name)

        big = asyncio.create_task(take("big", 30))  # larger than the limit: waits until nothing is in use
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 1))  # would fit now, but must not overtake "big"
        await asyncio.sleep(0)
        assert order == [] and not budget.try_take(1)
        budget.release(8)
        await big
        assert order == ["big"] and budget.used == 30
        budget.release(30)
        await small
        assert order == ["big", "small"] and budget.used == 1

    asyncio.run(scenario())


def test_a_cancelled_waiter_does_not_hold_up_the_queue():
    async def scenario():
        budget = ByteBudget(10)
        assert budget.try_take(10)
        first = asyncio.create_task(budget.take(10))
        second = asyncio.create_task(budget.take(1))
        await asyncio.sleep(0)
        first.cancel()
        budget.release(9)  # room for "second" only once "first" is out of the queue
        await second
        assert budget.used == 2
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(scenario())
