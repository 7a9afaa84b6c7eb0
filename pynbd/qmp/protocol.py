"""QMP framing and messages, without I/O.

A client may send several JSON objects back to back, split anywhere across reads; the server
answers each with one line. :class:`MessageDecoder` turns bytes into complete objects and reports
garbage precisely, so the server can answer it and go on as qemu does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 16 * 1024 * 1024


@dataclass
class QMPError(Exception):
    """An error reply: ``{"error": {"class": ..., "desc": ...}}``."""

    desc: str
    error_class: str = "GenericError"

    def __str__(self) -> str:
        return self.desc


class MessageDecoder:
    def __init__(self) -> None:
        self._buf = ""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[Any]:
        """Return every complete message (or a :class:`QMPError` for unparsable input)."""
        self._buf += data.decode("utf-8", "replace")
        out: list[Any] = []
        while True:
            stripped = self._buf.lstrip()
            if not stripped:
                self._buf = ""
                return out
            try:
                obj, end = self._decoder.raw_decode(stripped)
            except json.JSONDecodeError as exc:
                if exc.pos >= len(stripped) - 1 or _incomplete(stripped):
                    self._buf = stripped
                    if len(self._buf) > MAX_MESSAGE:
                        self._buf = ""
                        out.append(QMPError("JSON message too large"))
                    return out
                # Skip to the next line: qemu's parser also resynchronises after bad input.
                newline = stripped.find("\n", exc.pos)
                self._buf = "" if newline < 0 else stripped[newline + 1 :]
                out.append(QMPError(f"JSON parse error, {exc.msg}"))
                continue
            self._buf = stripped[end:]
            out.append(obj)


def _incomplete(text: str) -> bool:
    """Whether ``text`` could still become valid JSON with more input (unbalanced brackets)."""
    depth, in_string, escape = 0, False, False
    for ch in text:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return depth > 0 or in_string


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"


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
