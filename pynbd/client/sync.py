"""A blocking facade over the asyncio client, for scripts.

The async client runs on a private event loop in a daemon thread; every method submits a
coroutine there and waits for its result, so a script needs no ``async``/``await``::

    from pynbd.client.sync import connect

    with connect("nbd+unix:///?socket=/tmp/nbd.sock", meta_contexts=["base:allocation"]) as h:
        data = h.pread(4096, 0)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

from pynbd.client.client import Client, Extent
from pynbd.client.client import connect as async_connect
from pynbd.protocol.wire import ExportInfo


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pynbd-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class SyncClient:
    """The methods of :class:`pynbd.client.Client`, blocking."""

    def __init__(self, client: Client, runner: _LoopThread) -> None:
        self._client = client
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        # properties: size, flags, contexts, block_size, can_*, protocol, tls, structured, ...
        return getattr(self._client, name)

    def _run(self, coro: Coroutine) -> Any:
        return self._runner.run(coro)

    def pread(self, count: int, offset: int, *, fua: bool = False) -> bytes:
        return self._run(self._client.pread(count, offset, fua=fua))

    def pread_into(self, buf: bytearray | memoryview, offset: int, *, fua: bool = False) -> None:
        self._run(self._client.pread_into(buf, offset, fua=fua))

    def pwrite(self, buf: bytes | bytearray | memoryview, offset: int, *, fua: bool = False) -> None:
        self._run(self._client.pwrite(buf, offset, fua=fua))

    def zero(self, count: int, offset: int, *, no_hole: bool = False, fast: bool = False, fua: bool = False) -> None:
        self._run(self._client.zero(count, offset, no_hole=no_hole, fast=fast, fua=fua))

    def trim(self, count: int, offset: int, *, fua: bool = False) -> None:
        self._run(self._client.trim(count, offset, fua=fua))

    def flush(self) -> None:
        self._run(self._client.flush())

    def cache(self, count: int, offset: int) -> None:
        self._run(self._client.cache(count, offset))

    def block_status(
        self, count: int, offset: int, contexts: Sequence[str] | None = None, *, req_one: bool = False
    ) -> dict[str, list[Extent]]:
        return self._run(self._client.block_status(count, offset, contexts, req_one=req_one))

    def map_extents(
        self, contexts: Sequence[str] | None = None, offset: int = 0, count: int | None = None, *, req_one: bool = False
    ) -> dict[str, list[Extent]]:
        return self._run(self._client.map_extents(contexts, offset, count, req_one=req_one))

    def opt_list(self) -> list[tuple[str, str]]:
        return self._run(self._client.opt_list())

    def opt_info(self, export: str | None = None) -> ExportInfo:
        return self._run(self._client.opt_info(export))

    def opt_list_meta_context(self, export: str | None = None, queries: Sequence[str] = ()) -> list[str]:
        return self._run(self._client.opt_list_meta_context(export, queries))

    def opt_go(self, export: str | None = None, meta_contexts: Sequence[str] = ()) -> None:
        self._run(self._client.opt_go(export, meta_contexts))

    def opt_abort(self) -> None:
        try:
            self._run(self._client.opt_abort())
        finally:
            self._runner.stop()

    def disconnect(self) -> None:
        """Finish pending requests, send NBD_CMD_DISC and close."""
        try:
            self._run(self._client.disconnect())
        finally:
            self._runner.stop()

    def close(self) -> None:
        """Close at once."""
        if self._runner.thread.is_alive():
            try:
                self._run(self._client.close())
            finally:
                self._runner.stop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc) -> None:
        if not self._runner.thread.is_alive():
            return
        if exc[0] is None:
            self.disconnect()
        else:
            self.close()


def connect(target, **kwargs) -> SyncClient:
    """Blocking :func:`pynbd.client.connect`: same arguments, returns a :class:`SyncClient`."""
    runner = _LoopThread()
    try:
        client = runner.run(async_connect(target, **kwargs))
    except BaseException:
        runner.stop()
        raise
    return SyncClient(client, runner)
