"""All-or-nothing changes: every step registers how to undo itself.

Like QEMU's ``tran_add``/``tran_finalize``: graph edits, permission updates and QMP transaction
actions record an ``abort`` (undo, run in reverse order on failure) and a ``commit`` (run in order
when everything succeeded, and which must not fail).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("pynbd.graph")

Step = Callable[[], None]


class Transaction:
    def __init__(self) -> None:
        self._steps: list[tuple[Step | None, Step | None]] = []
        self.finished = False

    def add(self, abort: Step | None = None, commit: Step | None = None) -> None:
        self._steps.append((abort, commit))

    def commit(self) -> None:
        self.finished = True
        for _, commit in self._steps:
            if commit is not None:
                commit()

    def abort(self) -> None:
        self.finished = True
        for abort, _ in reversed(self._steps):
            if abort is not None:
                try:
                    abort()
                except Exception:  # an undo must not stop the other undos
                    log.exception("undoing a graph change failed")

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.finished:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()
