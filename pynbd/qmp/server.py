"""The QMP monitor: greeting, capabilities negotiation, commands, asynchronous events.

QMP is a control channel, not a data path, so asyncio streams serve it well. Each client's
commands run one at a time, in order, as in qemu's monitor, and the daemon runs one command at a
time across all clients (:meth:`pynbd.daemon.core.Daemon.execute`); events go to every client that
has finished capabilities negotiation. A client sending garbage gets an error reply and stays
connected; one that vanishes only loses its own connection, and the holds it took.

Limits (docs/qmp.md, "The protocol"): one JSON value may be at most ``max_message`` characters
(beyond, an error reply and the rest of that line is skipped); a monitor that does not read keeps
at most ``event_buffer`` bytes of unsent output queued, and events that arrive while it is over
that are dropped (the oldest stay, in order); a monitor that does not read its replies stalls
only its own commands.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from pynbd.daemon.core import Monitor
from pynbd.qmp.protocol import MAX_MESSAGE, MessageDecoder, QMPError, encode, error_response, greeting, response
from pynbd.qmp.protocol import event as make_event

log = logging.getLogger("pynbd.qmp")

EVENT_BUFFER = 1024 * 1024  # unsent output a monitor may have queued before its events are dropped


class QMPServer:
    def __init__(self, daemon, max_message: int = MAX_MESSAGE, event_buffer: int = EVENT_BUFFER) -> None:
        self.daemon = daemon
        self.max_message = max_message
        self.event_buffer = event_buffer
        self._servers: list[asyncio.AbstractServer] = []
        self._clients: set[asyncio.Task] = set()
        self._paths: list[str] = []
        self._count = 0  # connections so far: names each client's monitor

    async def listen(self, spec: str) -> None:
        """``unix:PATH``, ``tcp:HOST:PORT`` or ``fd:N`` (an already listening socket)."""
        kind, _, rest = spec.partition(":")
        if kind == "unix":
            if os.path.exists(rest):
                os.unlink(rest)
            server = await asyncio.start_unix_server(self._client, rest)
            self._paths.append(rest)
        elif kind == "tcp":
            host, _, port = rest.rpartition(":")
            server = await asyncio.start_server(self._client, host or "127.0.0.1", int(port))
        elif kind == "fd":
            sock = socket.socket(fileno=int(rest))
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(self._client, sock=sock)
            else:
                server = await asyncio.start_server(self._client, sock=sock)
        else:
            raise ValueError(f"unknown QMP address {spec!r} (use unix:PATH or tcp:HOST:PORT)")
        self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        for path in self._paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio runs each client callback in a task
        self._clients.add(task)
        self._count += 1
        session = QMPSession(self.daemon, writer, Monitor(f"QMP client {self._count}"), self.event_buffer)
        try:
            await session.run(reader, MessageDecoder(self.max_message))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug: it costs this client its connection, logged once, not the daemon
            log.exception("%s: connection failed", session.monitor.name)
        finally:
            session.close()
            self._clients.discard(task)


class QMPSession:
    def __init__(
        self, daemon, writer: asyncio.StreamWriter, monitor: Monitor, event_buffer: int = EVENT_BUFFER
    ) -> None:
        self.daemon = daemon
        self.writer = writer
        self.monitor = monitor
        self.event_buffer = event_buffer
        self.negotiated = False
        self.dropped_events = 0  # since the monitor last had room
        self._unsubscribe = None

    def send(self, message: dict) -> None:
        if self.writer.is_closing():
            return
        try:
            data = encode(message)
        except ValueError:  # a value JSON cannot carry (NaN): a bug, but not one to kill the monitor
            log.exception("QMP reply cannot be encoded: %r", message)
            data = encode(error_response(QMPError("internal error: reply is not valid JSON"), message.get("id")))
        self.writer.write(data)

    def _on_event(self, name: str, data: dict) -> None:
        if not self.negotiated or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() >= self.event_buffer:
            self.dropped_events += 1
            if self.dropped_events == 1:
                log.warning(
                    "%s does not read its output (%d bytes queued): dropping events until it does",
                    self.monitor.name,
                    self.writer.transport.get_write_buffer_size(),
                )
            return
        if self.dropped_events:
            log.info("%s reads again; %d events were dropped", self.monitor.name, self.dropped_events)
            self.dropped_events = 0
        self.send(make_event(name, data))

    async def run(self, reader: asyncio.StreamReader, decoder: MessageDecoder) -> None:
        from pynbd.daemon.core import PACKAGE, VERSION

        self.send(greeting(VERSION, PACKAGE))
        self._unsubscribe = self.daemon.subscribe(self._on_event)
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for message in decoder.feed(data):
                reply = await self.handle(message)
                if reply is not None:
                    self.send(reply)
                    await self.writer.drain()

    async def handle(self, message: Any) -> dict | None:
        if isinstance(message, QMPError):
            return error_response(message)
        if not isinstance(message, dict):
            return error_response(QMPError("QMP input must be a JSON object"))
        msg_id = message.get("id")
        name = message.get("execute", message.get("exec-oob"))
        if name is None:
            return error_response(QMPError("QMP input lacks member 'execute'"), msg_id)
        if not isinstance(name, str):
            return error_response(QMPError("QMP input member 'execute' must be a string"), msg_id)
        for key in message:
            if key not in ("execute", "exec-oob", "arguments", "id", "control"):
                return error_response(QMPError(f"QMP input member '{key}' is unexpected"), msg_id)
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            return error_response(QMPError("QMP input member 'arguments' must be an object"), msg_id)
        if name == "qmp_capabilities":
            if self.negotiated:
                return error_response(
                    QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound"),
                    msg_id,
                )
            self.negotiated = True
            return response({}, msg_id)
        if not self.negotiated:
            return error_response(
                QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"), msg_id
            )
        try:
            result = await self.daemon.execute(name, arguments, monitor=self.monitor)
        except QMPError as exc:
            log.info("QMP %s refused: %s", name, exc.desc)
            return error_response(exc, msg_id)
        except Exception as exc:  # a bug in one command must not take the monitor down
            log.exception("QMP command %s crashed", name)
            return error_response(QMPError(f"internal error: {exc.__class__.__name__}: {exc}"), msg_id)
        return response(result, msg_id)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.monitor.release()
        self.writer.close()
