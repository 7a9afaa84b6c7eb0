"""The sans-I/O protocol core on its own: wire encoders/decoders and the server negotiation machine.

No sockets here: these pin down byte layouts and the option rules of the spec so that a regression
shows up as a precise failure rather than as a peer hanging up somewhere in an interop test.
"""

from __future__ import annotations

import struct

import pytest

from pynbd.nodes.memory import MemoryNode
from pynbd.protocol import wire
from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    TransmissionFlag,
)
from pynbd.protocol.negotiation import Action, Outcome, ServerNegotiation, TLSMode, match_meta_contexts
from pynbd.protocol.wire import ProtocolError
from pynbd.server.export import Export, ExportRegistry

SIZE = 1 << 20
BITMAP = "qemu:dirty-bitmap:b0"
DEPTH = "qemu:allocation-depth"


# --- wire: handshake ---------------------------------------------------------------------------


def test_greeting_round_trip():
    data = wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
    assert len(data) == 18
    assert data[:8] == b"NBDMAGIC" and data[8:16] == b"IHAVEOPT"
    assert wire.decode_greeting_start(data[:16]) == (False, 0)
    assert struct.unpack(">H", data[16:])[0] == 3


def test_oldstyle_greeting_is_152_bytes_and_recognised():
    data = wire.encode_oldstyle_greeting(SIZE, TransmissionFlag.HAS_FLAGS)
    assert len(data) == 152
    assert wire.decode_greeting_start(data[:16]) == (True, 0)
    assert struct.unpack(">Q", data[16:24])[0] == SIZE
    assert data[28:] == bytes(124)


@pytest.mark.parametrize(
    "data",
    [struct.pack(">QQ", 0x1234, IHAVEOPT), struct.pack(">QQ", NBDMAGIC, 0x1234)],
    ids=["bad-magic", "unknown-style"],
)
def test_greeting_start_rejects_garbage(data):
    with pytest.raises(ProtocolError):
        wire.decode_greeting_start(data)


@pytest.mark.parametrize("option", list(Opt) + [0x1234])
@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 3])
def test_option_round_trip(option, payload):
    data = wire.encode_option(option, payload)
    assert data[:8] == b"IHAVEOPT"
    header = data[: wire.OPTION_HEADER.size]
    assert wire.decode_option_header(header) == (option, len(payload))
    assert data[wire.OPTION_HEADER.size :] == payload


def test_option_header_with_bad_magic_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="option magic"):
        wire.decode_option_header(struct.pack(">QII", NBDMAGIC, Opt.GO, 0))


@pytest.mark.parametrize("reply", list(Rep))
def test_option_reply_round_trip(reply):
    payload = b"why" if reply.is_error else b""
    data = wire.encode_option_reply(Opt.INFO, reply, payload)
    assert struct.unpack(">Q", data[:8])[0] == OPTION_REPLY_MAGIC
    assert wire.decode_option_reply_header(data[:20]) == (Opt.INFO, reply, len(payload))
    assert data[20:] == payload
    assert reply.is_error == (reply >= 0x80000000)


def test_option_reply_with_bad_magic_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        wire.decode_option_reply_header(struct.pack(">QIII", IHAVEOPT, 1, 1, 0))


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply_padding(no_zeroes):
    data = wire.encode_export_name_reply(SIZE, 0x1234, no_zeroes)
    assert wire.EXPORT_NAME_REPLY.unpack(data[:10]) == (SIZE, 0x1234)
    assert data[10:] == (b"" if no_zeroes else bytes(EXPORT_NAME_PADDING))


@pytest.mark.parametrize("name", ["", "disk", "ünïcødé/name", "x" * MAX_STRING])
@pytest.mark.parametrize("infos", [[], [Info.NAME], [Info.BLOCK_SIZE, Info.DESCRIPTION, Info.NAME, 77]])
def test_info_request_round_trip(name, infos):
    payload = wire.encode_info_request(name, infos)
    assert wire.decode_info_request(payload) == (name, infos)


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"\0\0\0\0\0", "too short"),
        (struct.pack(">I", 10) + b"abc" + struct.pack(">H", 0), "overruns"),
        (struct.pack(">I", 3) + b"abc" + struct.pack(">H", 2) + struct.pack(">H", 1), "does not match"),
        (struct.pack(">I", 3) + b"abc" + struct.pack(">H", 0) + b"extra", "does not match"),
        (struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0), "UTF-8"),
        (struct.pack(">I", MAX_STRING + 1) + b"n" * (MAX_STRING + 1) + struct.pack(">H", 0), "longer than"),
    ],
    ids=["short", "name-overrun", "count-too-big", "trailing", "not-utf8", "name-too-long"],
)
def test_info_request_malformed(payload, why):
    with pytest.raises(ProtocolError, match=why):
        wire.decode_info_request(payload)


def test_info_replies_round_trip():
    info = wire.ExportInfo()
    flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
    wire.decode_info_reply(wire.encode_info_export(SIZE, flags), info)
    wire.decode_info_reply(wire.encode_info_name("canon"), info)
    wire.decode_info_reply(wire.encode_info_description("a disk"), info)
    wire.decode_info_reply(wire.encode_info_block_size(1, 4096, 4 << 20), info)
    wire.decode_info_reply(struct.pack(">H", 99) + b"future info type", info)  # ignored
    assert (info.size, info.flags) == (SIZE, flags)
    assert info.canonical_name == "canon"
    assert info.description == "a disk"
    assert info.block_size == (1, 4096, 4 << 20)
    assert len(wire.encode_info_export(SIZE, flags)) == 12
    assert len(wire.encode_info_block_size(1, 2, 3)) == 14


@pytest.mark.parametrize(
    "payload",
    [
        b"\0",
        wire.encode_info_export(SIZE, 1)[:-1],
        wire.encode_info_export(SIZE, 1) + b"\0",
        wire.encode_info_block_size(1, 2, 3)[:-1],
    ],
    ids=["short", "export-short", "export-long", "block-size-short"],
)
def test_info_reply_of_wrong_length(payload):
    with pytest.raises(ProtocolError):
        wire.decode_info_reply(payload, wire.ExportInfo())


@pytest.mark.parametrize("name, description", [("", ""), ("disk", "the disk"), ("ü", "ö")])
def test_rep_server_round_trip(name, description):
    assert wire.decode_rep_server(wire.encode_rep_server(name, description)) == (name, description)


@pytest.mark.parametrize("payload", [b"\0\0\0", struct.pack(">I", 5) + b"abcd"], ids=["short", "overrun"])
def test_rep_server_malformed(payload):
    with pytest.raises(ProtocolError):
        wire.decode_rep_server(payload)


@pytest.mark.parametrize(
    "export, queries", [("", []), ("disk", [BASE_ALLOCATION]), ("d", ["base:", "qemu:", BITMAP, "ü:x"])]
)
def test_meta_context_request_round_trip(export, queries):
    payload = wire.encode_meta_context_request(export, queries)
    assert wire.decode_meta_context_request(payload) == (export, queries)


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"\0" * 7, "too short"),
        (struct.pack(">I", 9) + b"ab" + struct.pack(">I", 0), "overruns"),
        (struct.pack(">II", 0, 1), "query overruns"),
        (struct.pack(">III", 0, 1, 20) + b"base:allocation", "query overruns"),
        (wire.encode_meta_context_request("", [BASE_ALLOCATION]) + b"!", "trailing"),
    ],
    ids=["short", "name-overrun", "missing-query", "query-overrun", "trailing"],
)
def test_meta_context_request_malformed(payload, why):
    with pytest.raises(ProtocolError, match=why):
        wire.decode_meta_context_request(payload)


def test_rep_meta_context_round_trip():
    assert wire.decode_rep_meta_context(wire.encode_rep_meta_context(7, BITMAP)) == (7, BITMAP)
    with pytest.raises(ProtocolError):
        wire.decode_rep_meta_context(b"\0\0")


# --- wire: transmission ------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", range(9))
def test_request_round_trip(cmd):
    data = wire.encode_request(0x1F, cmd, 0xFEEDFACECAFEBEEF, (1 << 63) + 5, 0xFFFFFFFF)
    assert len(data) == 28
    assert struct.unpack(">I", data[:4])[0] == REQUEST_MAGIC
    assert wire.decode_request(data) == wire.Request(0x1F, cmd, 0xFEEDFACECAFEBEEF, (1 << 63) + 5, 0xFFFFFFFF)
    assert wire.decode_request(memoryview(bytearray(data))).cookie == 0xFEEDFACECAFEBEEF


def test_request_with_bad_magic_is_a_protocol_error():
    data = bytearray(wire.encode_request(0, 0, 1, 0, 512))
    data[0] ^= 0xFF
    with pytest.raises(ProtocolError, match="request magic"):
        wire.decode_request(bytes(data))


@pytest.mark.parametrize("error", [0, 1, 5, 22, 28, 75])
def test_simple_reply_round_trip(error):
    data = wire.encode_simple_reply(error, 42)
    assert len(data) == wire.SIMPLE_REPLY_SIZE == 16
    assert struct.unpack(">I", data[:4])[0] == SIMPLE_REPLY_MAGIC
    assert wire.reply_header_size(data[:4]) == 16
    header = wire.decode_reply_header(data)
    assert (header.structured, header.cookie, header.error, header.done) == (False, 42, error, True)


def _chunk(data: bytes) -> tuple[wire.ReplyHeader, bytes]:
    """Split one encoded chunk into its decoded header and its payload, checking the framing."""
    assert wire.reply_header_size(data[:4]) == wire.CHUNK_HEADER_SIZE == 20
    header = wire.decode_reply_header(data[:20])
    assert header.structured
    payload = data[20:]
    assert len(payload) == header.length
    return header, payload


@pytest.mark.parametrize("done", [True, False])
def test_offset_data_chunk(done):
    data = b"abc" * 1000
    header, payload = _chunk(wire.encode_offset_data_header(9, 1 << 40, len(data), done) + data)
    assert (header.type, header.cookie, header.done) == (Chunk.OFFSET_DATA, 9, done)
    assert struct.unpack(">Q", payload[:8])[0] == 1 << 40
    assert payload[8:] == data


@pytest.mark.parametrize("done", [True, False])
def test_offset_hole_chunk(done):
    header, payload = _chunk(wire.encode_offset_hole(10, 4096, 65536, done))
    assert (header.type, header.cookie, header.done) == (Chunk.OFFSET_HOLE, 10, done)
    assert wire.OFFSET_HOLE.unpack(payload) == (4096, 65536)


def test_none_chunk():
    header, payload = _chunk(wire.encode_none_chunk(11))
    assert (header.type, header.cookie, header.flags, payload) == (Chunk.NONE, 11, ReplyFlag.DONE, b"")


@pytest.mark.parametrize("message", ["", "export is read-only", "é" * 3000])
def test_error_chunk_round_trip(message):
    header, payload = _chunk(wire.encode_error_chunk(12, 1, message))
    assert (header.type, header.cookie, header.done) == (Chunk.ERROR, 12, True)
    decoded = wire.decode_error_chunk(header.type, payload)
    assert decoded.error == 1 and decoded.offset is None
    # messages are cut to the spec's 4096-byte limit (possibly mid-character: decoded leniently)
    assert len(payload) - 6 == min(len(message.encode()), MAX_STRING)
    assert message.startswith(decoded.message.rstrip("\ufffd"))


def test_error_offset_chunk_decodes_offset():
    body = wire.ERROR_HEAD.pack(5, 3) + b"bad" + struct.pack(">Q", 8192)
    decoded = wire.decode_error_chunk(Chunk.ERROR_OFFSET, body)
    assert (decoded.error, decoded.message, decoded.offset) == (5, "bad", 8192)
    with pytest.raises(ProtocolError):
        wire.decode_error_chunk(Chunk.ERROR_OFFSET, body[:-1])


@pytest.mark.parametrize(
    "payload", [b"\0\0\0\x16\0", wire.ERROR_HEAD.pack(22, 10) + b"short"], ids=["short", "message-overrun"]
)
def test_error_chunk_malformed(payload):
    with pytest.raises(ProtocolError):
        wire.decode_error_chunk(Chunk.ERROR, payload)


def test_error_chunk_with_error_zero_reads_as_einval():
    assert wire.decode_error_chunk(Chunk.ERROR, wire.ERROR_HEAD.pack(0, 0)).error == 22


@pytest.mark.parametrize("done", [True, False])
def test_block_status_chunk_round_trip(done):
    extents = [(4096, 0), (65536, 3), (1 << 31, 1)]
    header, payload = _chunk(wire.encode_block_status_chunk(13, 2, extents, done))
    assert (header.type, header.cookie, header.done) == (Chunk.BLOCK_STATUS, 13, done)
    decoded = wire.decode_block_status_chunk(payload)
    assert (decoded.context_id, decoded.extents) == (2, extents)


@pytest.mark.parametrize(
    "payload",
    [struct.pack(">I", 1), struct.pack(">III", 1, 512, 0) + b"\0", struct.pack(">III", 1, 0, 3)],
    ids=["no-extent", "ragged", "zero-length"],
)
def test_block_status_chunk_malformed(payload):
    with pytest.raises(ProtocolError):
        wire.decode_block_status_chunk(payload)


@pytest.mark.parametrize("magic", [0x6E8A278C, 0xDEADBEEF], ids=["extended", "garbage"])
def test_reply_header_with_unexpected_magic(magic):
    with pytest.raises(ProtocolError):
        wire.reply_header_size(struct.pack(">I", magic))
    with pytest.raises(ProtocolError):
        wire.decode_reply_header(struct.pack(">I", magic) + bytes(16))


def test_structured_magic_constant_matches_the_spec():
    assert wire.encode_none_chunk(0)[:4] == struct.pack(">I", STRUCTURED_REPLY_MAGIC) == b"\x66\x8e\x33\xef"


# --- ServerNegotiation -------------------------------------------------------------------------


def make_registry(read_only: bool = False) -> ExportRegistry:
    """Two real exports on memory nodes; the named one also offers qemu-namespace contexts."""

    async def no_extents(offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    plain = Export("", MemoryNode(SIZE), read_only=read_only)
    rich = Export(
        "disk",
        MemoryNode(2 * SIZE),
        description="second disk",
        contexts={DEPTH: no_extents, BITMAP: no_extents},
    )
    return ExportRegistry([plain, rich])


def replies(outcome: Outcome) -> list[tuple[int, int, bytes]]:
    """Decode every option reply of an outcome into (option, reply type, payload)."""
    decoded = []
    for data in outcome.replies:
        option, reply, length = wire.decode_option_reply_header(data[:20])
        assert len(data) == 20 + length
        decoded.append((option, reply, data[20:]))
    return decoded


def started(tls_mode: TLSMode = TLSMode.OFF, flags: int = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
    negotiation = ServerNegotiation(make_registry(), tls_mode)
    negotiation.receive_client_flags(flags)
    return negotiation


def only_reply(outcome: Outcome) -> tuple[int, int, bytes]:
    [reply] = replies(outcome)
    return reply


def test_greeting_advertises_fixed_newstyle_and_no_zeroes():
    greeting = ServerNegotiation(make_registry()).greeting()
    assert wire.GREETING.unpack(greeting) == (NBDMAGIC, IHAVEOPT, 3)


def test_unknown_client_flags_are_a_protocol_error():
    with pytest.raises(ProtocolError, match="unknown handshake flags"):
        ServerNegotiation(make_registry()).receive_client_flags(0x4)


@pytest.mark.parametrize("option", [Opt.PEEK_EXPORT, Opt.EXTENDED_HEADERS, 12, 0x7FFF, 0xFFFFFFFF])
def test_unsupported_options_get_err_unsup_and_negotiation_continues(option):
    negotiation = started()
    outcome = negotiation.handle_option(option, b"payload ignored")
    assert outcome.action is Action.CONTINUE
    assert only_reply(outcome)[:2] == (option, Rep.ERR_UNSUP)
    # still negotiating: a GO after it works
    go = negotiation.handle_option(Opt.GO, wire.encode_info_request("", []))
    assert go.action is Action.TRANSMISSION


def test_flood_of_unknown_options_never_ends_negotiation():
    negotiation = started()
    for i in range(1000):
        assert only_reply(negotiation.handle_option(100 + i, b""))[1] == Rep.ERR_UNSUP
    assert negotiation.handle_option(Opt.GO, wire.encode_info_request("", [])).action is Action.TRANSMISSION


def test_list_names_every_export_then_acks():
    outcome = started().handle_option(Opt.LIST, b"")
    assert outcome.action is Action.CONTINUE
    got = replies(outcome)
    assert [r[:2] for r in got] == [(Opt.LIST, Rep.SERVER), (Opt.LIST, Rep.SERVER), (Opt.LIST, Rep.ACK)]
    assert [wire.decode_rep_server(p) for _, _, p in got[:2]] == [("", ""), ("disk", "second disk")]
    assert got[2][2] == b""


def test_list_with_payload_is_invalid():
    assert only_reply(started().handle_option(Opt.LIST, b"x"))[1] == Rep.ERR_INVALID


@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
def test_info_and_go_send_export_name_description_block_size(option):
    negotiation = started()
    outcome = negotiation.handle_option(option, wire.encode_info_request("disk", [Info.BLOCK_SIZE]))
    got = replies(outcome)
    assert all(r[0] == option for r in got)
    assert [r[1] for r in got] == [Rep.INFO] * 4 + [Rep.ACK]
    info = wire.ExportInfo()
    kinds = []
    for _, _, payload in got[:-1]:
        kinds.append(struct.unpack(">H", payload[:2])[0])
        wire.decode_info_reply(payload, info)
    assert sorted(kinds) == [Info.EXPORT, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]
    assert info.size == 2 * SIZE
    assert info.canonical_name == "disk" and info.description == "second disk"
    minimum, preferred, maximum = info.block_size
    assert minimum == 1 and preferred == 4096 and 4 << 20 <= maximum <= 8 << 20
    assert info.flags & TransmissionFlag.HAS_FLAGS
    assert info.flags & TransmissionFlag.CAN_MULTI_CONN
    assert not info.flags & TransmissionFlag.SEND_DF  # no structured replies negotiated
    if option == Opt.INFO:
        assert outcome.action is Action.CONTINUE
    else:
        assert outcome.action is Action.TRANSMISSION
        assert negotiation.session.export.name == "disk"
        assert negotiation.session.structured is False


def test_description_is_left_out_when_empty():
    got = replies(started().handle_option(Opt.INFO, wire.encode_info_request("", [])))
    kinds = [struct.unpack(">H", p[:2])[0] for _, r, p in got if r == Rep.INFO]
    assert Info.DESCRIPTION not in kinds and Info.EXPORT in kinds


def test_read_only_export_advertises_read_only_without_write_commands():
    negotiation = ServerNegotiation(make_registry(read_only=True))
    negotiation.receive_client_flags(ClientFlag.FIXED_NEWSTYLE)
    info = wire.ExportInfo()
    for _, reply, payload in replies(negotiation.handle_option(Opt.INFO, wire.encode_info_request("", []))):
        if reply == Rep.INFO:
            wire.decode_info_reply(payload, info)
    assert info.flags & TransmissionFlag.READ_ONLY
    assert not info.flags & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)


def test_structured_replies_turn_on_df_in_the_flags():
    negotiation = started()
    assert only_reply(negotiation.handle_option(Opt.STRUCTURED_REPLY, b""))[1] == Rep.ACK
    info = wire.ExportInfo()
    for _, reply, payload in replies(negotiation.handle_option(Opt.GO, wire.encode_info_request("", []))):
        if reply == Rep.INFO:
            wire.decode_info_reply(payload, info)
    assert info.flags & TransmissionFlag.SEND_DF
    assert negotiation.session.structured is True


@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
def test_unknown_export_gets_err_unknown_with_a_message(option):
    negotiation = started()
    outcome = negotiation.handle_option(option, wire.encode_info_request("nope", []))
    opt, reply, message = only_reply(outcome)
    assert (opt, reply, outcome.action) == (option, Rep.ERR_UNKNOWN, Action.CONTINUE)
    assert b"nope" in message and message.decode()
    assert negotiation.handle_option(option, wire.encode_info_request("", [])).replies  # and it goes on


@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
@pytest.mark.parametrize(
    "payload",
    [
        b"",
        wire.encode_info_request("", [Info.NAME])[:-1],
        wire.encode_info_request("", [Info.NAME]) + b"\0\0",
        struct.pack(">I", 100) + b"disk" + struct.pack(">H", 0),
    ],
    ids=["empty", "truncated", "extra-info", "name-overrun"],
)
def test_info_go_with_inconsistent_length_is_err_invalid(option, payload):
    negotiation = started()
    outcome = negotiation.handle_option(option, payload)
    assert (only_reply(outcome)[1], outcome.action) == (Rep.ERR_INVALID, Action.CONTINUE)
    assert not hasattr(negotiation, "session")


@pytest.mark.parametrize("option", [Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT])
def test_meta_context_before_structured_replies_is_err_invalid(option):
    outcome = started().handle_option(option, wire.encode_meta_context_request("", [BASE_ALLOCATION]))
    _, reply, message = only_reply(outcome)
    assert reply == Rep.ERR_INVALID and b"structured" in message


def test_repeated_structured_reply_is_err_invalid():
    negotiation = started()
    assert only_reply(negotiation.handle_option(Opt.STRUCTURED_REPLY, b""))[1] == Rep.ACK
    assert only_reply(negotiation.handle_option(Opt.STRUCTURED_REPLY, b""))[1] == Rep.ERR_INVALID
    assert negotiation.structured  # the first one still holds


def test_structured_reply_with_payload_is_err_invalid():
    negotiation = started()
    assert only_reply(negotiation.handle_option(Opt.STRUCTURED_REPLY, b"x"))[1] == Rep.ERR_INVALID
    assert not negotiation.structured


def meta(negotiation: ServerNegotiation, option: int, export: str, queries: list[str]) -> list[tuple[int, str]]:
    """Send a LIST/SET_META_CONTEXT and return the (id, name) pairs it answered, checking the final ACK."""
    got = replies(negotiation.handle_option(option, wire.encode_meta_context_request(export, queries)))
    assert got[-1][:2] == (option, Rep.ACK)
    assert all(r[:2] == (option, Rep.META_CONTEXT) for r in got[:-1])
    return [wire.decode_rep_meta_context(p) for _, _, p in got[:-1]]


def structured() -> ServerNegotiation:
    negotiation = started()
    negotiation.handle_option(Opt.STRUCTURED_REPLY, b"")
    return negotiation


@pytest.mark.parametrize(
    "queries, expected",
    [
        ([], [BASE_ALLOCATION, DEPTH, BITMAP]),  # no query: everything
        (["base:"], [BASE_ALLOCATION]),
        (["qemu:"], [DEPTH, BITMAP]),
        (["qemu:dirty-bitmap:"], [BITMAP]),
        ([BITMAP, "base:"], [BITMAP, BASE_ALLOCATION]),
        (["qemu:dirty-bitmap:nope", "nbdkit:", "no-colon"], []),
        (["qemu:allocation-depth", "qemu:allocation-depth"], [DEPTH]),
    ],
)
def test_list_meta_context_wildcards(queries, expected):
    listed = meta(structured(), Opt.LIST_META_CONTEXT, "disk", queries)
    assert [name for _, name in listed] == expected
    assert all(cid == 0 for cid, _ in listed)  # LIST carries no usable ids


@pytest.mark.parametrize(
    "queries, expected",
    [
        ([], []),  # SET with no query selects nothing
        (["base:"], []),  # no wildcards in SET
        (["qemu:"], []),
        (["qemu:dirty-bitmap:"], []),
        ([BASE_ALLOCATION], [BASE_ALLOCATION]),
        ([BITMAP, BASE_ALLOCATION, "qemu:nope"], [BITMAP, BASE_ALLOCATION]),
    ],
)
def test_set_meta_context_takes_exact_names_only(queries, expected):
    negotiation = structured()
    chosen = meta(negotiation, Opt.SET_META_CONTEXT, "disk", queries)
    assert [name for _, name in chosen] == expected
    ids = [cid for cid, _ in chosen]
    assert len(set(ids)) == len(ids)
    negotiation.handle_option(Opt.GO, wire.encode_info_request("disk", []))
    assert negotiation.session.contexts == dict(chosen)


def test_match_meta_contexts_directly():
    available = [BASE_ALLOCATION, DEPTH, BITMAP]
    assert match_meta_contexts(available, ["qemu:"], listing=True) == [DEPTH, BITMAP]
    assert match_meta_contexts(available, ["qemu:"], listing=False) == []
    assert match_meta_contexts(available, [], listing=False) == []


def test_set_meta_context_for_another_export_is_dropped_at_go():
    negotiation = structured()
    assert meta(negotiation, Opt.SET_META_CONTEXT, "disk", [BASE_ALLOCATION])
    negotiation.handle_option(Opt.GO, wire.encode_info_request("", []))
    assert negotiation.session.contexts == {}


def test_failed_set_meta_context_clears_the_previous_selection():
    negotiation = structured()
    meta(negotiation, Opt.SET_META_CONTEXT, "", [BASE_ALLOCATION])
    outcome = negotiation.handle_option(Opt.SET_META_CONTEXT, wire.encode_meta_context_request("missing", []))
    assert only_reply(outcome)[1] == Rep.ERR_UNKNOWN
    negotiation.handle_option(Opt.GO, wire.encode_info_request("", []))
    assert negotiation.session.contexts == {}


def test_malformed_meta_context_request_is_err_invalid():
    negotiation = structured()
    bad = wire.encode_meta_context_request("", [BASE_ALLOCATION]) + b"junk"
    assert only_reply(negotiation.handle_option(Opt.LIST_META_CONTEXT, bad))[1] == Rep.ERR_INVALID


def test_abort_acks_and_closes():
    outcome = started().handle_option(Opt.ABORT, b"")
    assert only_reply(outcome)[:2] == (Opt.ABORT, Rep.ACK)
    assert outcome.action is Action.CLOSE


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_pads_unless_no_zeroes(no_zeroes):
    flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
    negotiation = started(flags=flags)
    outcome = negotiation.handle_option(Opt.EXPORT_NAME, b"disk")
    assert outcome.action is Action.TRANSMISSION
    [data] = outcome.replies
    assert len(data) == (10 if no_zeroes else 134)
    size, tflags = wire.EXPORT_NAME_REPLY.unpack(data[:10])
    assert size == 2 * SIZE and tflags & TransmissionFlag.HAS_FLAGS
    assert data[10:] == bytes(len(data) - 10)
    assert negotiation.session.export.name == "disk"


def test_export_name_for_unknown_export_closes_without_a_reply():
    outcome = started().handle_option(Opt.EXPORT_NAME, b"missing")
    assert (outcome.replies, outcome.action) == ([], Action.CLOSE)
    assert "missing" in outcome.reason


def test_export_name_carries_the_negotiated_contexts():
    negotiation = structured()
    meta(negotiation, Opt.SET_META_CONTEXT, "disk", [BITMAP])
    negotiation.handle_option(Opt.EXPORT_NAME, b"disk")
    assert list(negotiation.session.contexts.values()) == [BITMAP]
    assert negotiation.session.structured


def test_non_fixed_newstyle_client_may_only_send_export_name():
    negotiation = started(flags=0)
    outcome = negotiation.handle_option(Opt.LIST, b"")
    assert (outcome.replies, outcome.action) == ([], Action.CLOSE)
    padded = started(flags=0).handle_option(Opt.EXPORT_NAME, b"")
    assert padded.action is Action.TRANSMISSION and len(padded.replies[0]) == 134


# --- TLS -----------------------------------------------------------------------------------------


def test_starttls_refused_when_tls_is_off():
    negotiation = started(TLSMode.OFF)
    outcome = negotiation.handle_option(Opt.STARTTLS, b"")
    assert (only_reply(outcome)[1], outcome.action) == (Rep.ERR_POLICY, Action.CONTINUE)
    # and TLS_REQD is never sent without TLS configured
    assert [r[1] for r in replies(negotiation.handle_option(Opt.LIST, b""))] == [Rep.SERVER, Rep.SERVER, Rep.ACK]


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRED])
def test_starttls_acks_then_upgrades(mode):
    negotiation = started(mode)
    outcome = negotiation.handle_option(Opt.STARTTLS, b"")
    assert only_reply(outcome)[:2] == (Opt.STARTTLS, Rep.ACK)
    assert outcome.action is Action.STARTTLS
    negotiation.tls_established()
    again = negotiation.handle_option(Opt.STARTTLS, b"")
    assert (only_reply(again)[1], again.action) == (Rep.ERR_INVALID, Action.CONTINUE)


@pytest.mark.parametrize("mode", [TLSMode.OFF, TLSMode.ON, TLSMode.REQUIRED])
def test_starttls_with_payload_is_err_invalid(mode):
    outcome = started(mode).handle_option(Opt.STARTTLS, b"x")
    assert (only_reply(outcome)[1], outcome.action) == (Rep.ERR_INVALID, Action.CONTINUE)


@pytest.mark.parametrize(
    "option, payload",
    [
        (Opt.LIST, b""),
        (Opt.INFO, wire.encode_info_request("", [])),
        (Opt.GO, wire.encode_info_request("", [])),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.LIST_META_CONTEXT, wire.encode_meta_context_request("", [])),
        (Opt.SET_META_CONTEXT, wire.encode_meta_context_request("", [BASE_ALLOCATION])),
        (Opt.EXTENDED_HEADERS, b""),
        (Opt.PEEK_EXPORT, b""),
        (999, b"x"),
    ],
)
def test_required_mode_answers_tls_reqd_before_starttls(option, payload):
    negotiation = started(TLSMode.REQUIRED)
    outcome = negotiation.handle_option(option, payload)
    opt, reply, message = only_reply(outcome)
    assert (opt, reply, outcome.action) == (option, Rep.ERR_TLS_REQD, Action.CONTINUE)
    assert b"TLS" in message
    assert not negotiation.structured
    negotiation.handle_option(Opt.STARTTLS, b"")
    negotiation.tls_established()
    after = negotiation.handle_option(option, payload)
    assert all(reply != Rep.ERR_TLS_REQD for _, reply, _ in replies(after))


def test_required_mode_still_honours_abort_and_drops_export_name():
    assert started(TLSMode.REQUIRED).handle_option(Opt.ABORT, b"").action is Action.CLOSE
    outcome = started(TLSMode.REQUIRED).handle_option(Opt.EXPORT_NAME, b"")
    assert (outcome.replies, outcome.action) == ([], Action.CLOSE)


def test_on_mode_serves_plaintext_options():
    negotiation = started(TLSMode.ON)
    assert replies(negotiation.handle_option(Opt.LIST, b""))[-1][1] == Rep.ACK
    assert negotiation.handle_option(Opt.GO, wire.encode_info_request("", [])).action is Action.TRANSMISSION


def test_tls_forgets_everything_negotiated_before_it():
    negotiation = started(TLSMode.ON)
    negotiation.handle_option(Opt.STRUCTURED_REPLY, b"")
    meta(negotiation, Opt.SET_META_CONTEXT, "", [BASE_ALLOCATION])
    negotiation.handle_option(Opt.STARTTLS, b"")
    negotiation.tls_established()
    assert not negotiation.structured
    # meta contexts need structured replies again ...
    outcome = negotiation.handle_option(Opt.SET_META_CONTEXT, wire.encode_meta_context_request("", []))
    assert only_reply(outcome)[1] == Rep.ERR_INVALID
    # ... and a GO right away gets no contexts and simple replies
    negotiation.handle_option(Opt.GO, wire.encode_info_request("", []))
    assert negotiation.session.contexts == {} and not negotiation.session.structured


def test_structured_reply_can_be_renegotiated_after_tls():
    negotiation = started(TLSMode.ON)
    negotiation.handle_option(Opt.STRUCTURED_REPLY, b"")
    negotiation.handle_option(Opt.STARTTLS, b"")
    negotiation.tls_established()
    assert only_reply(negotiation.handle_option(Opt.STRUCTURED_REPLY, b""))[1] == Rep.ACK


def test_shutting_down_server_refuses_options_but_acks_abort():
    negotiation = started()
    negotiation.shutting_down = True
    assert only_reply(negotiation.handle_option(Opt.GO, wire.encode_info_request("", [])))[1] == Rep.ERR_SHUTDOWN
    assert negotiation.handle_option(Opt.ABORT, b"").action is Action.CLOSE
