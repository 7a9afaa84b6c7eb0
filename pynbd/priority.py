"""Clients before jobs: background copies wait their turn while client requests are in flight.

Everything runs on one event loop, so a backup or mirror that copies as fast as it can takes
turns with the guest's requests and stretches their latency. The NBD server marks each request
as foreground work; job copy workers call :meth:`ForegroundGate.wait_turn` before each chunk and
wait (a bounded time, so jobs always progress) while any client request is being served.
"""

from __future__ import annotations

import asyncio
import time

MAX_WAIT = 0.02  # a job is held back at most this long per chunk
COOLDOWN = 0.002  # ... and until clients have been quiet this long (a synchronous writer's gap)


class ForegroundGate:
    def __init__(self) -> None:
        self.active = 0
        self.last_seen = 0.0
        self._idle: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    def enter(self) -> None:
        self.active += 1
        self._event().clear()

    def leave(self) -> None:
        self.active -= 1
        self.last_seen = time.monotonic()
        if self.active == 0:
            self._event().set()

    async def wait_turn(self) -> None:
        deadline = time.monotonic() + MAX_WAIT
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            if self.active:
                try:
                    await asyncio.wait_for(self._event().wait(), deadline - now)
                except TimeoutError:
                    return
                continue
            quiet = self.last_seen + COOLDOWN - now
            if quiet <= 0:
                return
            await asyncio.sleep(min(quiet, deadline - now))


foreground = ForegroundGate()
