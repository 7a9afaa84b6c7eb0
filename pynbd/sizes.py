"""Human sizes on the command line: ``1G``, ``512M``, ``64k``, plain bytes (powers of 1024, as qemu-img)."""

from __future__ import annotations

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str) -> int:
    raw = text.strip().upper()
    if raw.endswith("IB"):
        raw = raw[:-2]
    number = raw.rstrip("KMGTPEB")
    suffix = raw[len(number) :]
    if suffix not in _SUFFIXES or not number:
        raise ValueError(f"invalid size {text!r} (use e.g. 1G, 512M, 4096)")
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise ValueError(f"invalid size {text!r} (use e.g. 1G, 512M, 4096)") from None
    size = int(value * _SUFFIXES[suffix])
    if size < 0:
        raise ValueError(f"invalid size {text!r}: negative")
    return size
