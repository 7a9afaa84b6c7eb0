"""The ``--pid-file`` of the long-running commands (serve, daemon)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def pid_file(path: str | None):
    """Write our pid atomically once listening (callers poll for the file), remove it on exit."""
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(path + ".tmp", path)
    try:
        yield
    finally:
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
