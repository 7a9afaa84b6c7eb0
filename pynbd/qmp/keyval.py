"""qemu's ``key=value,...`` option syntax (``--blockdev driver=file,node-name=f0,...``).

Dotted keys build nested objects (``addr.type=unix,addr.path=/s``), ``,,`` is a literal comma,
and a value-less first item may be an implied key (``--object tls-creds-x509,...``).
"""

from __future__ import annotations

import json
from typing import Any


class KeyvalError(ValueError):
    pass


def split_items(text: str) -> list[str]:
    items, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current))
    return items


def parse(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse keyval text into nested dicts of strings."""
    result: dict[str, Any] = {}
    for index, item in enumerate(split_items(text)):
        if not item:
            continue
        if "=" not in item:
            if index == 0 and implied_key:
                key, value = implied_key, item
            else:
                raise KeyvalError(f"Expected '=' after parameter '{item}'")
        else:
            key, value = item.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise KeyvalError(f"Invalid parameter '{key}'")  # qemu's words for '', 'a.' or 'a..b'
        target = result
        for part in parts[:-1]:
            nested = target.setdefault(part, {})
            if not isinstance(nested, dict):
                raise KeyvalError(f"Parameters '{part}.*' conflict with parameter '{part}'")
            target = nested
        if parts[-1] in target:
            raise KeyvalError(f"Parameter '{key}' given more than once")
        target[parts[-1]] = value
    return result


def parse_option(text: str, implied_key: str | None = None) -> tuple[dict[str, Any], bool]:
    """JSON if it starts with ``{`` (then values are typed), else keyval. Returns (options, is_keyval)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except RecursionError:
            raise KeyvalError("invalid JSON: nesting too deep") from None
        except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
            raise KeyvalError(f"invalid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise KeyvalError("expected a JSON object")
        return value, False
    return parse(text, implied_key), True
