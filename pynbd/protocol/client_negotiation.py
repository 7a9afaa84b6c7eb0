"""The client side of NBD negotiation as sans-I/O pieces: what to send, and how to read the replies.

The asyncio client sends :meth:`OptionRequest.encode` and feeds every option reply it receives to
:meth:`OptionRequest.feed` until that returns True (the final ACK) or raises :class:`OptionError`
(an error reply, which is always final). Each option kind knows which replies it may get and what
they mean, so the order of options stays the only thing the I/O layer decides.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pynbd.protocol.constants import (
    EXPORT_NAME_PADDING,
    ClientFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.protocol.wire import (
    EXPORT_NAME_REPLY,
    ExportInfo,
    ProtocolError,
    decode_info_reply,
    decode_rep_meta_context,
    decode_rep_server,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
)

OLDSTYLE_REST = struct.Struct(">QI124x")  # after the two magics: size, 32-bit flags, zero padding
MAX_OPTION_REPLY = 64 * 1024 * 1024  # longer option replies are a broken or hostile server
DEFAULT_INFOS = (Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION)  # what nbdinfo asks for, too


def _rep_name(reply: int) -> str:
    try:
        return Rep(reply).name
    except ValueError:
        return f"reply {reply:#x}"


def _opt_name(option: int) -> str:
    try:
        return "NBD_OPT_" + Opt(option).name
    except ValueError:
        return f"option {option}"


class OptionError(Exception):
    """The server answered an option with an error reply (negotiation may go on)."""

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        self.option = option
        self.reply = reply
        self.message = message
        text = f"{_opt_name(option)}: server replied {_rep_name(reply)}"
        super().__init__(f"{text}: {message}" if message else text)

    @property
    def unsupported(self) -> bool:
        return self.reply == Rep.ERR_UNSUP

    @property
    def tls_required(self) -> bool:
        return self.reply == Rep.ERR_TLS_REQD


# --- greeting ----------------------------------------------------------------------------------


def client_flags_for(handshake_flags: int) -> int:
    """Echo what we understand of the server's handshake flags (as libnbd and qemu do)."""
    return handshake_flags & int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


def decode_oldstyle_rest(data: bytes) -> tuple[int, int]:
    """Size and transmission flags of an oldstyle greeting (the 136 bytes after the magics)."""
    size, flags = OLDSTYLE_REST.unpack(data)
    if flags >> 16:
        raise ProtocolError(f"oldstyle greeting has unknown flags {flags:#x}")
    return size, flags


def export_name_reply_size(no_zeroes: bool) -> int:
    return EXPORT_NAME_REPLY.size + (0 if no_zeroes else EXPORT_NAME_PADDING)


def decode_export_name_reply(data: bytes) -> tuple[int, int]:
    size, flags = EXPORT_NAME_REPLY.unpack_from(data)
    return size, flags


def sanitize_transmission_flags(flags: int, structured: bool) -> int:
    """Drop flags that contradict each other, as libnbd does (DF needs structured replies, ...)."""
    if not flags & TransmissionFlag.HAS_FLAGS:
        raise ProtocolError("server sent transmission flags without NBD_FLAG_HAS_FLAGS")
    if not structured:
        flags &= ~TransmissionFlag.SEND_DF
    if not flags & TransmissionFlag.SEND_WRITE_ZEROES:
        flags &= ~TransmissionFlag.SEND_FAST_ZERO
    return flags


def valid_block_size(minimum: int, preferred: int, maximum: int) -> bool:
    """Whether an NBD_INFO_BLOCK_SIZE obeys the spec's rules (libnbd ignores one that does not)."""

    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if not (power_of_two(minimum) and minimum <= 65536 and power_of_two(preferred)):
        return False
    if preferred < minimum:
        return False
    if maximum != 0xFFFFFFFF and (maximum < preferred or maximum % minimum):
        return False
    return True


# --- options -----------------------------------------------------------------------------------


class OptionRequest:
    """One option and its replies; the plain kind expects nothing but an ACK."""

    def __init__(self, option: int, payload: bytes = b"") -> None:
        self.option = option
        self.payload = payload
        self.done = False

    def encode(self) -> bytes:
        return encode_option(self.option, self.payload)

    def feed(self, option: int, reply: int, payload: bytes) -> bool:
        """Take one reply; True when it was the final one. Error replies raise :class:`OptionError`."""
        if self.done:
            raise ProtocolError(f"reply to {_opt_name(self.option)} after its final reply")
        if option != self.option:
            raise ProtocolError(f"server answered {_opt_name(option)} while we wait for {_opt_name(self.option)}")
        if reply & 0x80000000:
            self.done = True
            raise OptionError(option, reply, payload.decode("utf-8", "replace")[:4096])
        if reply == Rep.ACK:
            if payload:
                raise ProtocolError(f"ACK to {_opt_name(option)} carries a payload")
            self.done = True
            self.on_ack()
            return True
        self.on_reply(reply, payload)
        return False

    def on_reply(self, reply: int, payload: bytes) -> None:
        raise ProtocolError(f"unexpected {_rep_name(reply)} to {_opt_name(self.option)}")

    def on_ack(self) -> None:
        pass


class ListExports(OptionRequest):
    """NBD_OPT_LIST: every export the server is willing to name."""

    def __init__(self) -> None:
        super().__init__(Opt.LIST)
        self.exports: list[tuple[str, str]] = []  # (name, description)

    def on_reply(self, reply: int, payload: bytes) -> None:
        if reply != Rep.SERVER:
            super().on_reply(reply, payload)
        self.exports.append(decode_rep_server(payload))


class ExportInfoRequest(OptionRequest):
    """NBD_OPT_INFO or NBD_OPT_GO: the export's size, flags, block sizes, name and description."""

    def __init__(self, option: int, export: str, infos: tuple[int, ...] = DEFAULT_INFOS) -> None:
        if option not in (Opt.INFO, Opt.GO):
            raise ValueError("ExportInfoRequest is for NBD_OPT_INFO and NBD_OPT_GO")
        super().__init__(option, encode_info_request(export, list(infos)))
        self.info = ExportInfo(name=export)
        self._have_export = False

    def on_reply(self, reply: int, payload: bytes) -> None:
        if reply != Rep.INFO:
            super().on_reply(reply, payload)
        decode_info_reply(payload, self.info)
        if payload[:2] == b"\x00\x00":
            self._have_export = True
        if payload[:2] == b"\x00\x03" and self.info.block_size and not valid_block_size(*self.info.block_size):
            self.info.block_size = None  # as libnbd: an impossible constraint is ignored

    def on_ack(self) -> None:
        if not self._have_export:
            raise ProtocolError(f"{_opt_name(self.option)} ended without NBD_INFO_EXPORT")


class MetaContextRequest(OptionRequest):
    """NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT: context names (and ids for SET)."""

    def __init__(self, option: int, export: str, queries: list[str]) -> None:
        if option not in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            raise ValueError("MetaContextRequest is for LIST/SET_META_CONTEXT")
        super().__init__(option, encode_meta_context_request(export, queries))
        self.contexts: dict[str, int] = {}  # name -> id (ids mean nothing for LIST)

    def on_reply(self, reply: int, payload: bytes) -> None:
        if reply != Rep.META_CONTEXT:
            super().on_reply(reply, payload)
        context_id, name = decode_rep_meta_context(payload)
        if self.option == Opt.SET_META_CONTEXT and context_id in self.contexts.values():
            raise ProtocolError(f"server gave meta context id {context_id} twice")
        self.contexts[name] = context_id


@dataclass
class Negotiated:
    """Everything negotiation settled about a connection, for the transmission phase."""

    protocol: str  # "oldstyle", "newstyle" or "newstyle-fixed" (libnbd's names)
    info: ExportInfo
    structured: bool = False
    tls: bool = False
    contexts: dict[str, int] = field(default_factory=dict)  # selected meta contexts: name -> id


__all__ = [
    "DEFAULT_INFOS",
    "ExportInfoRequest",
    "ListExports",
    "MAX_OPTION_REPLY",
    "MetaContextRequest",
    "Negotiated",
    "OptionError",
    "OptionRequest",
    "client_flags_for",
    "decode_export_name_reply",
    "decode_oldstyle_rest",
    "export_name_reply_size",
    "sanitize_transmission_flags",
    "valid_block_size",
]
