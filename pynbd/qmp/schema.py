"""Argument checking for QMP commands, in the spirit of QAPI schemas.

A spec maps argument names to types; a leading ``*`` marks an optional argument, as in QAPI's
JSON. Types: ``str``, ``int`` (int64), ``uint`` (uint64), ``uint32``, ``bool``, ``number``, ``any``,
a ``[T]`` list, a nested spec dict, or a tuple of allowed strings (an enum). Integers are checked
against their type's range, as QAPI's visitors check them (a JSON integer past the 64-bit ranges
arrives as a float, as in qemu: pynbd.qmp.protocol). Errors read like qemu's, so users of
qemu-storage-daemon recognise them. With ``keyval=True`` (command-line ``key=value`` options)
scalar strings are converted to the type the spec asks for, as qemu's keyval visitor does.
"""

from __future__ import annotations

from typing import Any

from pynbd.qmp.protocol import QMPError

Spec = dict[str, Any]
_TYPE_NAMES = {
    "str": "string",
    "int": "integer",
    "uint": "integer",
    "uint32": "integer",
    "bool": "boolean",
    "number": "number",
}
_INT64 = range(-(1 << 63), 1 << 63)
_UINT64 = range(1 << 64)
_UINT32 = range(1 << 32)


def check(spec: Spec, args: Any, path: str = "", keyval: bool = False, extra_ok: bool = False) -> dict:
    """Validate ``args`` against ``spec``; return them with keyval strings converted."""
    if not isinstance(args, dict):
        raise QMPError(f"Invalid parameter type for '{path or 'arguments'}', expected: object")
    out = dict(args)
    known = {}
    for key, kind in spec.items():
        optional = key.startswith("*")
        known[key.lstrip("*")] = (kind, optional)
    for name, (kind, optional) in known.items():
        full = f"{path}.{name}" if path else name
        if name not in args:
            if not optional:
                raise QMPError(f"Parameter '{full}' is missing")
            continue
        out[name] = check_value(kind, args[name], full, keyval)
    if not extra_ok:
        for name in args:
            if name not in known:
                full = f"{path}.{name}" if path else name
                raise QMPError(f"Parameter '{full}' is unexpected")
    return out


def check_value(kind: Any, value: Any, path: str, keyval: bool = False) -> Any:
    if kind == "any":
        return value
    if isinstance(kind, tuple):  # enum
        if not isinstance(value, str) or value not in kind:
            raise QMPError(f"Parameter '{path}' does not accept value '{value}'")
        return value
    if isinstance(kind, list):
        if keyval and isinstance(value, dict) and all(k.isdigit() for k in value):
            value = [value[k] for k in sorted(value, key=int)]
        if not isinstance(value, list):
            raise QMPError(f"Invalid parameter type for '{path}', expected: array")
        return [check_value(kind[0], item, f"{path}[{i}]", keyval) for i, item in enumerate(value)]
    if isinstance(kind, dict):
        return check(kind, value, path, keyval)
    if callable(kind):
        return kind(value, path, keyval)
    if keyval and isinstance(value, str):
        value = _from_keyval(kind, value, path)
    expected = _TYPE_NAMES.get(kind, kind)
    if kind == "str" and isinstance(value, str):
        return value
    if kind in ("int", "uint", "uint32") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _check_integer(kind, value, path)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise QMPError(f"Invalid parameter type for '{path}', expected: {expected}")


def _check_integer(kind: str, value: int | float, path: str) -> int:
    """A number for an integer parameter, in its type's range; the messages are qemu 7.2's
    (qemu also takes a negative number for an unsigned one, as 2^64 minus it: pynbd refuses it)."""
    if kind == "int":
        if isinstance(value, int) and value in _INT64:
            return value
        raise QMPError(f"Invalid parameter type for '{path}', expected: integer")
    if not isinstance(value, int):
        raise QMPError(f"Parameter '{path}' expects uint64")
    if kind == "uint32":
        if value not in _UINT32:  # qemu: a negative one wraps to 2^64 minus it, also too large
            raise QMPError(f"Parameter '{path}' expects uint32_t")
    elif value not in _UINT64:
        raise QMPError(f"Parameter '{path}' expects uint64")
    return value


def _from_keyval(kind: str, text: str, path: str) -> Any:
    if kind in ("int", "uint", "uint32"):
        try:
            return int(text, 0)
        except ValueError:
            raise QMPError(f"Parameter '{path}' expects a number") from None
    if kind == "bool":
        if text in ("on", "yes", "true"):
            return True
        if text in ("off", "no", "false"):
            return False
        raise QMPError(f"Parameter '{path}' expects 'on' or 'off'")
    if kind == "number":
        try:
            return float(text)
        except ValueError:
            raise QMPError(f"Parameter '{path}' expects a number") from None
    return text


def str_or_object(spec: Spec):
    """A QAPI alternate: a string (reference by name) or an object of ``spec`` (inline)."""

    def checker(value: Any, path: str, keyval: bool) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return check(spec, value, path, keyval, extra_ok=True)
        raise QMPError(f"Invalid parameter type for '{path}', expected: string or object")

    return checker


def nullable_str(value: Any, path: str, keyval: bool) -> Any:
    """A string, an inline object, or JSON null (e.g. qcow2's ``backing``)."""
    if value is None or isinstance(value, (str, dict)):
        return value
    raise QMPError(f"Invalid parameter type for '{path}', expected: string, object or null")
