"""Exceptions of the NBD client: refusals by the server versus a connection that is gone."""

from __future__ import annotations

import errno as _errno
import os

from pynbd.protocol.client_negotiation import OptionError
from pynbd.protocol.wire import ProtocolError


class NBDError(OSError):
    """The server refused one request; the connection is still usable.

    ``errno`` is the NBD error value (the spec fixes them to Linux errno numbers), ``message``
    the text of the server's error chunk, if it sent one.
    """

    def __init__(self, error: int, message: str = "") -> None:
        self.message = message
        text = os.strerror(error)
        super().__init__(error, f"{text}: {message}" if message else text)

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno or 0, str(self.errno))


class NBDConnectionError(ConnectionError):
    """The connection is closed (or was never fully opened); every pending request fails with this."""


class ProtocolViolation(NBDConnectionError, ProtocolError):
    """The server broke the protocol, so the client closed the connection."""


__all__ = ["NBDConnectionError", "NBDError", "OptionError", "ProtocolViolation"]
