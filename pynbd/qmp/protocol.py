"""QMP framing and messages, without I/O.

A client may send several JSON objects back to back, split anywhere across reads; the server
answers each with one line. :class:`MessageDecoder` turns bytes into complete objects and reports
garbage precisely, so the server can answer it and go on as qemu does.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 16 * 1024 * 1024  # characters in one JSON value (qemu's token limit is 64 MiB)
_INT_RANGE = range(-(1 << 63), 1 << 64)  # what qemu's parser keeps as an integer (int64 or uint64)
_INT_DIGITS = 21  # longer integer text is surely outside _INT_RANGE


@dataclass
class QMPError(Exception):
    """An error reply: ``{"error": {"class": ..., "desc": ...}}``."""

    desc: str
    error_class: str = "GenericError"

    def __str__(self) -> str:
        return self.desc


class MessageDecoder:
    """Splits a byte stream into JSON values the way qemu's JSON streamer does: a value ends when
    its brackets balance (strings and escapes respected), a bare scalar at whitespace or a bracket.

    Each piece of input is scanned once, jumping between interesting characters with a regular
    expression, and kept until its value is complete: a message costs time linear in its size
    however it is split, so a client trickling in a huge unterminated string cannot stall the
    event loop that also serves the NBD clients.
    """

    _IN_STRING = re.compile(r'["\\]')
    _STRUCTURE = re.compile(r'["\[\]{}]')
    _SCALAR_END = re.compile(r'[\s"\[\]{},:]')

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._parts: list[str] = []  # the value scanned so far
        self._size = 0
        self._kind = ""  # "" (between values), "scalar" or "nested"
        self._depth = 0
        self._in_string = False
        self._escaped = False  # the previous piece ended with a backslash inside a string
        self._skipping = False  # discarding the rest of an oversized message, up to a newline

    def feed(self, data: bytes) -> list[Any]:
        """Return every complete message (or a :class:`QMPError` for unparsable input)."""
        text = self._utf8.decode(data)
        out: list[Any] = []
        while text:
            if self._skipping:
                newline = text.find("\n")
                if newline < 0:
                    break
                text, self._skipping = text[newline + 1 :], False
                continue
            if not self._kind:
                text = text.lstrip()
                if not text:
                    break
                if text[0] in "]}":  # a stray closing bracket: an error of its own
                    out.append(_parse(text[0]))
                    text = text[1:]
                    continue
                self._kind = "nested" if text[0] in '[{"' else "scalar"
            end = self._scan(text)
            if end is None:
                self._parts.append(text)
                self._size += len(text)
                if self._size > self.max_message:
                    self._reset()
                    self._skipping = True
                    out.append(QMPError("JSON message too large"))
                break
            value = "".join(self._parts) + text[:end]
            self._reset()
            out.append(_parse(value))
            text = text[end:]
        return out

    def _reset(self) -> None:
        self._parts, self._size, self._kind, self._depth = [], 0, "", 0
        self._in_string = self._escaped = False

    def _scan(self, text: str) -> int | None:
        """Continue scanning the current value through ``text``: where it ends, or None."""
        if self._kind == "scalar":
            match = self._SCALAR_END.search(text, 0 if self._parts else 1)
            return match.start() if match else None
        pos = 0
        if self._escaped:
            pos, self._escaped = 1, False
        while True:
            if self._in_string:
                match = self._IN_STRING.search(text, pos)
                if match is None:
                    return None
                if match.group() == "\\":
                    if match.end() >= len(text):
                        self._escaped = True  # the escaped character comes with the next piece
                        return None
                    pos = match.end() + 1
                    continue
                self._in_string, pos = False, match.end()
                if self._depth == 0:
                    return pos
                continue
            match = self._STRUCTURE.search(text, pos)
            if match is None:
                return None
            char, pos = match.group(), match.end()
            if char == '"':
                self._in_string = True
            elif char in "[{":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth <= 0:
                    return pos


class _NumberError(ValueError):
    pass


def _integer(text: str) -> int | float:
    """A JSON integer as qemu's parser reads it: outside int64/uint64 it becomes a float (so a
    parameter refuses it with qemu's message); one that is not even a finite float is an error.
    Long text never reaches ``int()``, which refuses more than 4300 digits with a ValueError."""
    if len(text) <= _INT_DIGITS:
        value = int(text)
        if value in _INT_RANGE:
            return value
    return _finite(text)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NumberError(f"number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise _NumberError(f"{name} is not JSON")


def _parse(text: str) -> Any:
    """One JSON value, or a QMPError saying what is wrong with it. NaN and Infinity are refused
    (they are not JSON: echoing them back as an id would make the reply invalid JSON)."""
    try:
        return json.loads(text, parse_int=_integer, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        return QMPError("JSON parse error, nesting too deep")
    except json.JSONDecodeError as exc:
        return QMPError(f"JSON parse error, {exc.msg}")
    except _NumberError as exc:
        return QMPError(f"JSON parse error, {exc}")


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(", ", ": "), allow_nan=False).encode() + b"\r\n"


def greeting(version: tuple[int, int, int], package: str) -> dict:
    major, minor, micro = version
    return {
        "QMP": {
            "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package},
            "capabilities": ["oob"],
        }
    }


def response(result: Any, msg_id: Any = None) -> dict:
    reply: dict = {"return": result}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


def error_response(error: QMPError, msg_id: Any = None) -> dict:
    reply: dict = {"error": {"class": error.error_class, "desc": error.desc}}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


def event(name: str, data: dict | None = None) -> dict:
    now = time.time()
    message = {"event": name, "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)}}
    if data is not None:
        message["data"] = data
    return message
