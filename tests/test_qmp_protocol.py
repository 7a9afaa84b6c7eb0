"""QMP framing without sockets: how a byte stream is cut into messages, and keyval options."""

from __future__ import annotations

import time

import pytest

from pynbd.qmp.keyval import KeyvalError, parse, parse_option
from pynbd.qmp.protocol import MessageDecoder, QMPError
from pynbd.qmp.schema import check

STREAM = (
    b'{"execute": "a\\"b\\\\", "arguments": {"x": [1, {"y": "}]"}]}}  42 "s" [1] null\n'
    b' ]{"execute": "q", "id": "\xc3\xa9"}\r\n'
)
EXPECTED = [
    {"execute": 'a"b\\', "arguments": {"x": [1, {"y": "}]"}]}},
    42,
    "s",
    [1],
    None,
    "error",
    {"execute": "q", "id": "é"},
]


def decode(pieces) -> list:
    decoder = MessageDecoder()
    out = []
    for piece in pieces:
        out += decoder.feed(piece)
    return ["error" if isinstance(m, QMPError) else m for m in out]


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(STREAM)])
def test_messages_split_anywhere_decode_the_same(step):
    assert decode(STREAM[i : i + step] for i in range(0, len(STREAM), step)) == EXPECTED


def test_garbage_costs_one_error_and_the_next_message_still_parses():
    assert decode([b"{garbage}", b'{"execute": "x"}']) == ["error", {"execute": "x"}]
    assert decode([b"\xff\xfe", b'{"execute": "x"}']) == ["error", {"execute": "x"}]
    assert decode([b"[" * 50_000 + b"]" * 50_000 + b'{"execute": "x"}']) == ["error", {"execute": "x"}]


def test_an_oversized_message_is_refused_up_to_the_next_line():
    decoder = MessageDecoder()
    out = decoder.feed(b'{"a": "')
    for _ in range(17):
        out += decoder.feed(b"x" * (1 << 20))
    assert [str(m) for m in out] == ["JSON message too large"]
    assert decoder.feed(b'still the same line"}\n{"execute": "x"}') == [{"execute": "x"}]


@pytest.mark.parametrize("opening", [b'{"a": "', b'{"a": [', b"word"])
def test_time_is_linear_in_the_size_however_it_trickles_in(opening):
    """8 MiB in 64 KiB pieces: an O(n^2) rescan would take minutes and stall the event loop."""
    decoder = MessageDecoder()
    start = time.monotonic()
    decoder.feed(opening)
    for _ in range(128):
        decoder.feed(b"s" * 65536)
    assert time.monotonic() - start < 2


def test_keyval_options():
    assert parse("driver=file,node-name=f0,filename=/a,,b,cache.direct=on") == {
        "driver": "file",
        "node-name": "f0",
        "filename": "/a,b",
        "cache": {"direct": "on"},
    }
    assert parse("tls-creds-x509,id=t0", implied_key="qom-type") == {"qom-type": "tls-creds-x509", "id": "t0"}
    assert parse_option('{"driver": "null-co", "size": 512}') == ({"driver": "null-co", "size": 512}, False)
    for bad in ("a=1,a=2", "a=1,a.b=2", "a,b=1"):
        with pytest.raises(KeyvalError):
            parse(bad)
    with pytest.raises(KeyvalError):
        parse_option("{not json")


def test_schema_converts_keyval_strings_and_names_the_bad_parameter():
    spec = {"size": "uint", "*read-zeroes": "bool", "*mode": ("safe", "hard"), "*list": ["int"]}
    assert check(spec, {"size": "0x200", "read-zeroes": "on", "list": {"0": "1", "1": "2"}}, keyval=True) == {
        "size": 512,
        "read-zeroes": True,
        "list": [1, 2],
    }
    for args, message in (
        ({}, "Parameter 'size' is missing"),
        ({"size": "1"}, "Invalid parameter type for 'size', expected: integer"),
        ({"size": -1}, "Parameter 'size' expects uint64"),
        ({"size": 1, "mode": "soft"}, "Parameter 'mode' does not accept value 'soft'"),
        ({"size": 1, "extra": 1}, "Parameter 'extra' is unexpected"),
        ({"size": True}, "Invalid parameter type for 'size', expected: integer"),
    ):
        with pytest.raises(QMPError, match=message):
            check(spec, args)
