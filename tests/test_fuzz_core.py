"""Property-based tests of the sans-I/O core: what comes off the wire is either understood or refused
cleanly, never a crash.

Each decoder is checked two ways: encoded values decode back to themselves (round trip), and
arbitrary bytes give a result or the module's own refusal (``ProtocolError``, ``OptionError``,
``KeyvalError``), never another exception. The server's negotiation is driven with arbitrary
options and payloads in any order. Example counts are bounded so the module runs in seconds; the
long-running socket-level fuzzing is ``scripts/fuzz``.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.nodes.memory import MemoryNode
from pynbd.protocol import wire
from pynbd.protocol.client_negotiation import (
    ExportInfoRequest,
    ListExports,
    MetaContextRequest,
    OptionError,
)
from pynbd.protocol.constants import ClientFlag, Opt
from pynbd.protocol.negotiation import Action, ServerNegotiation
from pynbd.protocol.wire import ProtocolError
from pynbd.qmp import keyval
from pynbd.server.export import Export, ExportRegistry

FAST = settings(max_examples=200, deadline=None, database=None)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
names = st.text(max_size=64)  # NBD strings: UTF-8, at most 4096 bytes
payloads = st.binary(max_size=256)


# -- wire: round trips ----------------------------------------------------------------------------


@FAST
@given(u16, u16, u64, u64, u32)
def test_request_round_trip(flags, cmd, cookie, offset, length):
    request = wire.decode_request(wire.encode_request(flags, cmd, cookie, offset, length))
    assert (request.flags, request.type, request.cookie, request.offset, request.length) == (
        flags,
        cmd,
        cookie,
        offset,
        length,
    )


@FAST
@given(u32, payloads)
def test_option_header_round_trip(option, payload):
    encoded = wire.encode_option(option, payload)
    assert wire.decode_option_header(encoded[: wire.OPTION_HEADER.size]) == (option, len(payload))
    assert encoded[wire.OPTION_HEADER.size :] == payload


@FAST
@given(u32, u32, payloads)
def test_option_reply_header_round_trip(option, reply, payload):
    encoded = wire.encode_option_reply(option, reply, payload)
    assert wire.decode_option_reply_header(encoded[: wire.OPTION_REPLY_HEADER.size]) == (option, reply, len(payload))


@FAST
@given(names, st.lists(u16, max_size=20))
def test_info_request_round_trip(name, infos):
    assert wire.decode_info_request(wire.encode_info_request(name, infos)) == (name, infos)


@FAST
@given(names, st.lists(names, max_size=10))
def test_meta_context_request_round_trip(export, queries):
    assert wire.decode_meta_context_request(wire.encode_meta_context_request(export, queries)) == (export, queries)


@FAST
@given(names, names)
def test_rep_server_round_trip(name, description):
    assert wire.decode_rep_server(wire.encode_rep_server(name, description)) == (name, description)


@FAST
@given(u32, st.lists(st.tuples(st.integers(1, 0xFFFFFFFF), u32), min_size=1, max_size=50), u64, st.booleans())
def test_block_status_chunk_round_trip(context_id, extents, cookie, done):
    encoded = wire.encode_block_status_chunk(cookie, context_id, extents, done)
    header = wire.decode_reply_header(encoded[: wire.CHUNK_HEADER_SIZE])
    assert (header.cookie, header.done, header.length) == (cookie, done, len(encoded) - wire.CHUNK_HEADER_SIZE)
    chunk = wire.decode_block_status_chunk(encoded[wire.CHUNK_HEADER_SIZE :])
    assert (chunk.context_id, chunk.extents) == (context_id, extents)


@FAST
@given(u64, st.integers(1, 0xFFFFFFFF), st.text(max_size=100))
def test_error_chunk_round_trip(cookie, error, message):
    encoded = wire.encode_error_chunk(cookie, error, message)
    header = wire.decode_reply_header(encoded[: wire.CHUNK_HEADER_SIZE])
    chunk = wire.decode_error_chunk(header.type, encoded[wire.CHUNK_HEADER_SIZE :])
    assert (chunk.error, chunk.message) == (error, message)


# -- wire: arbitrary bytes are decoded or refused with ProtocolError --------------------------------

DECODERS = [
    wire.decode_info_request,
    wire.decode_meta_context_request,
    wire.decode_rep_server,
    wire.decode_rep_meta_context,
    wire.decode_block_status_chunk,
    lambda data: wire.decode_error_chunk(0x8001, data),
    lambda data: wire.decode_error_chunk(0x8002, data),
    lambda data: wire.decode_info_reply(data, wire.ExportInfo()),
]


@FAST
@given(st.sampled_from(DECODERS), st.binary(max_size=300))
def test_decoders_refuse_garbage_cleanly(decode, data):
    try:
        decode(data)
    except ProtocolError:
        pass


@FAST
@given(st.binary(min_size=wire.REQUEST.size, max_size=wire.REQUEST.size))
def test_request_header_of_garbage(data):
    try:
        wire.decode_request(data)
    except ProtocolError as exc:
        assert "magic" in str(exc)


@FAST
@given(st.binary(min_size=4, max_size=4))
def test_reply_magic_of_garbage(data):
    try:
        size = wire.reply_header_size(data)
    except ProtocolError:
        return
    assert size in (wire.SIMPLE_REPLY_SIZE, wire.CHUNK_HEADER_SIZE)


# -- server negotiation: any option sequence ends in a reply or a clean close ----------------------

KNOWN_OPTIONS = [int(o) for o in Opt]


def _options():
    option = st.one_of(st.sampled_from(KNOWN_OPTIONS), u32)
    valid_payloads = st.one_of(
        st.builds(wire.encode_info_request, names, st.lists(u16, max_size=5)),
        st.builds(wire.encode_meta_context_request, names, st.lists(names, max_size=4)),
        st.builds(lambda name: name.encode(), names),
    )
    return st.lists(st.tuples(option, st.one_of(payloads, valid_payloads)), max_size=12)


def _catalog() -> ExportRegistry:
    return ExportRegistry([Export("", MemoryNode(1 << 20)), Export("disk", MemoryNode(4096), read_only=True)])


@FAST
@given(st.integers(0, 3), _options())
def test_server_negotiation_survives_any_options(client_flags, options):
    negotiation = ServerNegotiation(_catalog())
    try:
        negotiation.receive_client_flags(client_flags)
    except ProtocolError:
        return
    for option, payload in options:
        try:
            outcome = negotiation.handle_option(option, payload)
        except ProtocolError:
            return  # the server closes the connection: a clean refusal
        for reply in outcome.replies:
            assert isinstance(reply, bytes)
            if option != Opt.EXPORT_NAME:
                echoed, _, length = wire.decode_option_reply_header(reply[: wire.OPTION_REPLY_HEADER.size])
                assert echoed == option and length == len(reply) - wire.OPTION_REPLY_HEADER.size
        if outcome.action in (Action.CLOSE, Action.TRANSMISSION, Action.STARTTLS):
            return


@FAST
@given(u32)
def test_server_refuses_unknown_handshake_flags(flags):
    negotiation = ServerNegotiation(_catalog())
    known = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
    try:
        negotiation.receive_client_flags(flags)
    except ProtocolError:
        assert flags & ~known
    else:
        assert not flags & ~known


# -- client negotiation: any server replies are understood or refused ------------------------------


def _requests():
    return st.sampled_from(
        [
            lambda: ListExports(),
            lambda: ExportInfoRequest(Opt.GO, "disk"),
            lambda: ExportInfoRequest(Opt.INFO, ""),
            lambda: MetaContextRequest(Opt.SET_META_CONTEXT, "", ["base:allocation"]),
        ]
    )


@FAST
@given(_requests(), st.lists(st.tuples(st.booleans(), u32, payloads), max_size=8))
def test_client_option_replies_never_crash(make_request, replies):
    request = make_request()
    for same_option, reply, payload in replies:
        option = request.option if same_option else (request.option + 1) & 0xFFFFFFFF
        try:
            if request.feed(option, reply, payload):
                return
        except (ProtocolError, OptionError):
            return


# -- keyval (the command line's key=value syntax) -------------------------------------------------


@FAST
@given(st.text(alphabet=st.sampled_from("ab.=,x1 {}[]\"'"), max_size=40), st.sampled_from([None, "driver"]))
def test_keyval_parses_or_refuses(text, implied):
    try:
        result = keyval.parse(text, implied)
    except keyval.KeyvalError:
        return
    assert isinstance(result, dict)


@FAST
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), st.text(max_size=12), max_size=6))
def test_keyval_round_trip(options):
    text = ",".join(f"{key}={value.replace(',', ',,')}" for key, value in options.items())
    assert keyval.parse(text) == options


@FAST
@given(st.text(max_size=60))
def test_keyval_option_json_or_keyval(text):
    try:
        value, _ = keyval.parse_option(text)
    except keyval.KeyvalError:
        return
    assert isinstance(value, dict)


def test_struct_sizes_match_the_spec():
    # the fixed layouts the fuzzers rely on, as doc/proto.md gives them
    assert (wire.REQUEST.size, wire.SIMPLE_REPLY_SIZE, wire.CHUNK_HEADER_SIZE) == (28, 16, 20)
    assert struct.calcsize(">QII") == wire.OPTION_HEADER.size == 16


def test_keyval_refuses_what_qemu_refuses():
    # qemu-storage-daemon --blockdev '=x' says "Invalid parameter ''"; 'a..b=1': "Invalid parameter 'a..b'"
    for text, key in (("=x", ""), ("driver=file,a..b=1", "a..b"), ("a.=1", "a.")):
        try:
            keyval.parse(text)
        except keyval.KeyvalError as exc:
            assert str(exc) == f"Invalid parameter '{key}'"
        else:
            raise AssertionError(f"{text!r} was accepted")


def test_keyval_json_with_huge_numbers_or_nesting_is_refused():
    for text in ('{"a": ' + "9" * 5000 + "}", "{" + '"a":[' * 100000 + "]" * 100000 + "}"):
        try:
            keyval.parse_option(text)
        except keyval.KeyvalError as exc:
            assert str(exc).startswith("invalid JSON")
        else:
            raise AssertionError("accepted")
