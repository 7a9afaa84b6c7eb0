"""The server side of fixed-newstyle negotiation as a sans-I/O state machine.

The asyncio layer reads one option at a time and hands it to :meth:`ServerNegotiation.handle_option`;
it gets back the bytes to send and what to do next. Everything the spec says about option
ordering, TLS modes and meta-context selection lives here, where tests can drive it without sockets.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.protocol.wire import (
    ProtocolError,
    decode_info_request,
    decode_meta_context_request,
    encode_export_name_reply,
    encode_greeting,
    encode_info_block_size,
    encode_info_description,
    encode_info_export,
    encode_info_name,
    encode_option_reply,
    encode_rep_meta_context,
    encode_rep_server,
)

log = logging.getLogger(__name__)

SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


class TLSMode(enum.Enum):
    OFF = "off"  # STARTTLS refused with ERR_POLICY
    ON = "on"  # client's choice (spec: SELECTIVETLS with no TLS-only exports)
    REQUIRED = "required"  # every option but STARTTLS and ABORT gets ERR_TLS_REQD until TLS is up


class ExportView(Protocol):
    """What negotiation needs to know about an export; the server's exports provide it."""

    name: str
    description: str

    @property
    def size(self) -> int: ...

    @property
    def block_size(self) -> tuple[int, int, int]: ...

    def transmission_flags(self, structured: bool) -> int: ...

    def context_names(self) -> list[str]: ...


class ExportCatalog(Protocol):
    def lookup(self, name: str) -> ExportView | None: ...

    def exports(self) -> Sequence[ExportView]: ...


class Action(enum.Enum):
    CONTINUE = "continue"  # send the replies, read the next option
    STARTTLS = "starttls"  # send the replies, then run the TLS handshake as server
    TRANSMISSION = "transmission"  # send the replies, then enter the transmission phase
    CLOSE = "close"  # send the replies (if any) and close the connection


@dataclass
class Outcome:
    replies: list[bytes]
    action: Action = Action.CONTINUE
    reason: str = ""  # why we close, for the log


@dataclass
class Session:
    """What negotiation settled, handed to the transmission phase."""

    export: ExportView
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)  # context id -> name


def match_meta_contexts(available: list[str], queries: list[str], listing: bool) -> list[str]:
    """Contexts a LIST (``listing``) or SET query selects, with qemu's wildcard rules.

    LIST with no queries returns everything; ``base:`` and ``qemu:`` and ``qemu:dirty-bitmap:``
    are namespace wildcards in LIST only. Unknown names are silently ignored.
    """
    if not queries:
        return list(available) if listing else []
    chosen: list[str] = []
    for query in queries:
        if ":" not in query:
            continue
        for name in available:
            if name == query:
                hit = True
            elif listing and query.endswith(":") and query in ("base:", "qemu:", DIRTY_BITMAP_PREFIX):
                hit = name.startswith(query)
            else:
                hit = False
            if hit and name not in chosen:
                chosen.append(name)
    return chosen


class ServerNegotiation:
    """One connection's negotiation, from greeting to the transmission phase."""

    def __init__(self, catalog: ExportCatalog, tls_mode: TLSMode = TLSMode.OFF) -> None:
        self.catalog = catalog
        self.tls_mode = tls_mode
        self.tls_active = False
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.shutting_down = False
        self._reset_state()

    def _reset_state(self) -> None:
        """Forget everything negotiated so far (at start, and after STARTTLS as the spec demands)."""
        self.structured = False
        self.meta_export: str | None = None
        self.meta_selected: dict[int, str] = {}

    # -- greeting -----------------------------------------------------------------------------

    def greeting(self) -> bytes:
        return encode_greeting(SERVER_HANDSHAKE_FLAGS)

    def receive_client_flags(self, flags: int) -> None:
        if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
            raise ProtocolError(f"client sent unknown handshake flags {flags:#x}")
        self.fixed_newstyle = bool(flags & ClientFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)

    def tls_established(self) -> None:
        self.tls_active = True
        self._reset_state()

    # -- options ------------------------------------------------------------------------------

    def handle_option(self, option: int, payload: bytes) -> Outcome:
        if option == Opt.EXPORT_NAME:
            return self._export_name(payload)
        if not self.fixed_newstyle:
            return Outcome([], Action.CLOSE, "non-fixed-newstyle client sent an option other than EXPORT_NAME")
        if option == Opt.ABORT:
            return Outcome([encode_option_reply(option, Rep.ACK)], Action.CLOSE, "client aborted")
        if self.shutting_down:
            return self._error(option, Rep.ERR_SHUTDOWN, "server is shutting down")
        if option == Opt.STARTTLS:
            return self._starttls(payload)
        if self.tls_mode is TLSMode.REQUIRED and not self.tls_active:
            return self._error(option, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        handlers: dict[int, Callable[[int, bytes], Outcome]] = {
            Opt.LIST: self._list,
            Opt.INFO: self._info_or_go,
            Opt.GO: self._info_or_go,
            Opt.STRUCTURED_REPLY: self._structured_reply,
            Opt.LIST_META_CONTEXT: self._meta_context,
            Opt.SET_META_CONTEXT: self._meta_context,
        }
        handler = handlers.get(option)
        if handler is None:
            return self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
        return handler(option, payload)

    @staticmethod
    def _error(option: int, reply: Rep, message: str) -> Outcome:
        return Outcome([encode_option_reply(option, reply, message.encode())])

    def _export_name(self, payload: bytes) -> Outcome:
        if self.tls_mode is TLSMode.REQUIRED and not self.tls_active:
            return Outcome([], Action.CLOSE, "NBD_OPT_EXPORT_NAME before STARTTLS with TLS required")
        if self.shutting_down:
            return Outcome([], Action.CLOSE, "server is shutting down")
        try:
            name = payload.decode("utf-8")
        except UnicodeDecodeError:
            return Outcome([], Action.CLOSE, "export name is not UTF-8")
        export = self.catalog.lookup(name)
        if export is None:
            return Outcome([], Action.CLOSE, f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")
        self.session = self._session(export, name)
        reply = encode_export_name_reply(export.size, export.transmission_flags(self.structured), self.no_zeroes)
        return Outcome([reply], Action.TRANSMISSION)

    def _starttls(self, payload: bytes) -> Outcome:
        if payload:
            return self._error(Opt.STARTTLS, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no payload")
        if self.tls_mode is TLSMode.OFF:
            return self._error(Opt.STARTTLS, Rep.ERR_POLICY, "TLS is not enabled on this server")
        if self.tls_active:
            return self._error(Opt.STARTTLS, Rep.ERR_INVALID, "TLS is already active")
        return Outcome([encode_option_reply(Opt.STARTTLS, Rep.ACK)], Action.STARTTLS)

    def _list(self, option: int, payload: bytes) -> Outcome:
        if payload:
            return self._error(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no payload")
        replies = [
            encode_option_reply(option, Rep.SERVER, encode_rep_server(e.name, e.description))
            for e in self.catalog.exports()
        ]
        replies.append(encode_option_reply(option, Rep.ACK))
        return Outcome(replies)

    def _structured_reply(self, option: int, payload: bytes) -> Outcome:
        if payload:
            return self._error(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no payload")
        if self.structured:
            return self._error(option, Rep.ERR_INVALID, "structured replies already negotiated")
        self.structured = True
        return Outcome([encode_option_reply(option, Rep.ACK)])

    def _info_or_go(self, option: int, payload: bytes) -> Outcome:
        try:
            name, _requested = decode_info_request(payload)
        except ProtocolError as exc:
            return self._error(option, Rep.ERR_INVALID, str(exc))
        export = self.catalog.lookup(name)
        if export is None:
            return self._error(option, Rep.ERR_UNKNOWN, f"export {name!r} not found")
        flags = export.transmission_flags(self.structured)
        infos = [encode_info_export(export.size, flags), encode_info_name(export.name)]
        if export.description:
            infos.append(encode_info_description(export.description))
        infos.append(encode_info_block_size(*export.block_size))
        replies = [encode_option_reply(option, Rep.INFO, info) for info in infos]
        replies.append(encode_option_reply(option, Rep.ACK))
        if option == Opt.INFO:
            return Outcome(replies)
        self.session = self._session(export, name)
        return Outcome(replies, Action.TRANSMISSION)

    def _session(self, export: ExportView, name: str) -> Session:
        contexts = self.meta_selected if self.meta_export == name else {}
        return Session(export, self.structured, dict(contexts))

    def _meta_context(self, option: int, payload: bytes) -> Outcome:
        setting = option == Opt.SET_META_CONTEXT
        if setting:  # SET replaces the selection even when it fails
            self.meta_export, self.meta_selected = None, {}
        if not self.structured:
            return self._error(option, Rep.ERR_INVALID, "negotiate structured replies first")
        try:
            name, queries = decode_meta_context_request(payload)
        except ProtocolError as exc:
            return self._error(option, Rep.ERR_INVALID, str(exc))
        export = self.catalog.lookup(name)
        if export is None:
            return self._error(option, Rep.ERR_UNKNOWN, f"export {name!r} not found")
        available = export.context_names()
        chosen = match_meta_contexts(available, queries, listing=not setting)
        replies = []
        for context in chosen:
            context_id = available.index(context) if setting else 0
            replies.append(encode_option_reply(option, Rep.META_CONTEXT, encode_rep_meta_context(context_id, context)))
        if setting:
            self.meta_export = name
            self.meta_selected = {available.index(c): c for c in chosen}
        replies.append(encode_option_reply(option, Rep.ACK))
        return Outcome(replies)


def default_transmission_flags(read_only: bool, structured: bool, multi_conn: bool = True) -> int:
    """The flags an export of a node that supports every command advertises."""
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
    flags |= TransmissionFlag.SEND_CACHE
    if read_only:
        flags |= TransmissionFlag.READ_ONLY
    else:
        flags |= TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
    if structured:
        flags |= TransmissionFlag.SEND_DF
    if multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return int(flags)


__all__ = [
    "Action",
    "BASE_ALLOCATION",
    "ExportCatalog",
    "ExportView",
    "Info",
    "Outcome",
    "ServerNegotiation",
    "Session",
    "TLSMode",
    "default_transmission_flags",
    "match_meta_contexts",
]
