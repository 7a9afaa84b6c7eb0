"""A guest writer that remembers every write, and what a disk may hold because of them.

The race-prone scenarios (scripts/stress, tests/scenarios.py) check effects, not return codes: the
writer here runs in its own thread on a libnbd connection with several requests in flight, and
records every write it issues (when issued, when acknowledged, with FUA or not) and every flush.
From that history :class:`Model` answers three questions per 4 KiB block:

- after everything settled: what must the disk hold (the last acknowledged write);
- for a point-in-time copy taken between two moments (a backup's start, a fleecing snapshot):
  which contents are allowed (the last write acknowledged before, or any write in flight across);
- after a crash: which contents are allowed (the last write made durable by FUA or by a FLUSH
  acknowledged after it, or anything written later).

Every block a write covers holds a pattern naming the write and the block, so a block read back
says which write it came from (or that it is zeros, or garbage). Writes in flight never overlap,
so the writes to one block are totally ordered and each block has a simple history.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from dataclasses import dataclass, field

import nbd

BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)
#: the value of a block that holds zeros (never written, or written with WRITE_ZEROES)
ZEROS = None


def block_data(wid: int, block: int) -> bytes:
    """The content write ``wid`` puts in ``block``: (wid, block) repeated, so every sector says both."""
    return struct.pack("<QQ", wid, block) * (BLOCK // 16)


def identify(chunk: bytes | memoryview, block: int) -> int | None | str:
    """Which write's content ``chunk`` (one block read at ``block``) is: a write id, ZEROS, or a
    description of what it is instead (torn, misplaced, garbage)."""
    chunk = bytes(chunk)
    if chunk == ZERO_BLOCK:
        return ZEROS
    wid, at = struct.unpack_from("<QQ", chunk)
    if at == block and chunk == block_data(wid, block):
        return wid
    if chunk == block_data(wid, at):
        return f"write {wid}'s block {at} (misplaced)"
    return f"garbage starting {chunk[:16].hex()}"


@dataclass
class Write:
    wid: int
    block: int  # first block
    count: int  # blocks
    zero: bool  # WRITE_ZEROES instead of data
    fua: bool
    issued: int  # model clock
    acked: int | None = None
    failed: str | None = None

    def value(self) -> int | None:
        return ZEROS if self.zero else self.wid

    def describe(self, model: Model) -> str:
        kind = "zero" if self.zero else "write"
        state = f"acked@{self.acked}" if self.acked is not None else "never acked"
        if self.failed:
            state = f"failed ({self.failed})"
        durable = " durable" if model.durable(self) else ""
        fua = " FUA" if self.fua else ""
        where = f"[{self.block * BLOCK:#x}+{self.count * BLOCK:#x}]"
        return f"{kind} {self.wid} {where}{fua} issued@{self.issued} {state}{durable}"


@dataclass
class Flush:
    issued: int
    acked: int | None = None


@dataclass
class Model:
    """The history of one disk's writes. ``initial`` maps a block to the write id of its content
    before the run (blocks not in it hold zeros)."""

    size: int
    initial: dict[int, int] = field(default_factory=dict)
    clock: int = 0
    writes: list[Write] = field(default_factory=list)
    flushes: list[Flush] = field(default_factory=list)
    history: dict[int, list[Write]] = field(default_factory=dict)
    #: named moments of the run (model clock), e.g. "backup issued", "pivot"
    marks: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def blocks(self) -> int:
        return self.size // BLOCK

    def tick(self) -> int:
        with self.lock:
            self.clock += 1
            return self.clock

    def mark(self, name: str) -> int:
        """Record the moment ``name`` (a QMP command sent or answered, an event seen)."""
        moment = self.tick()
        self.marks[name] = moment
        return moment

    def issue(self, wid: int, block: int, count: int, zero: bool, fua: bool) -> Write:
        with self.lock:
            self.clock += 1
            write = Write(wid, block, count, zero, fua, self.clock)
            self.writes.append(write)
            for b in range(block, block + count):
                self.history.setdefault(b, []).append(write)
            return write

    def ack(self, op: Write | Flush, error: str | None = None) -> None:
        with self.lock:
            self.clock += 1
            if error is None:
                op.acked = self.clock
            elif isinstance(op, Write):
                op.failed = error

    def issue_flush(self) -> Flush:
        with self.lock:
            self.clock += 1
            flush = Flush(self.clock)
            self.flushes.append(flush)
            return flush

    # -- what a block may hold -------------------------------------------------------------------

    def durable(self, write: Write) -> bool:
        """Acknowledged with FUA, or acknowledged before a FLUSH was sent that was acknowledged."""
        if write.acked is None:
            return False
        if write.fua:
            return True
        return any(f.acked is not None and f.issued > write.acked for f in self.flushes)

    def _initial(self, block: int) -> int | None:
        return self.initial.get(block, ZEROS)

    def settled(self, block: int) -> set:
        """Every write answered: the last one's content, or the initial content."""
        allowed = {self._initial(block)}
        for write in self.history.get(block, []):
            if write.acked is not None:
                allowed = {write.value()}
            else:  # failed (already a problem of its own): it may or may not have landed
                allowed.add(write.value())
        return allowed

    def at_moment(self, block: int, start: int, end: int) -> set:
        """A point-in-time copy taken between clock ``start`` and ``end``: the last write
        acknowledged before ``start``, or a later one issued before ``end``."""
        history = self.history.get(block, [])
        allowed = {self._initial(block)}
        for write in history:
            if write.acked is not None and write.acked < start:
                allowed = {write.value()}
            elif write.issued < end:
                allowed.add(write.value())
        return allowed

    def after_crash(self, block: int) -> set:
        """The last durable write, or anything written after it (acknowledged or not)."""
        allowed = {self._initial(block)}
        for write in self.history.get(block, []):
            if self.durable(write):
                allowed = {write.value()}
            else:
                allowed.add(write.value())
        return allowed

    def check(self, data: bytes, allowed, what: str, limit: int = 6) -> list[str]:
        """Compare ``data`` (the whole disk) block by block with ``allowed(block) -> set``;
        return one line per wrong block (the first ``limit``) and a count."""
        assert len(data) == self.size, f"{what}: read {len(data)} bytes, expected {self.size}"
        view = memoryview(data)
        problems = []
        wrong = 0
        for block in range(self.blocks):
            chunk = view[block * BLOCK : (block + 1) * BLOCK]
            expected = allowed(block)
            if len(expected) == 1 and ZEROS not in expected:
                (wid,) = expected
                if chunk == block_data(wid, block):  # the common case, without decoding
                    continue
            found = identify(chunk, block)
            if found in expected:
                continue
            wrong += 1
            if len(problems) < limit:
                expectation = self.describe_allowed(block, expected)
                problems.append(f"{what}: block {block * BLOCK:#x} holds {self.name(found)}; expected {expectation}")
        if wrong > limit:
            problems.append(f"{what}: ... {wrong} wrong blocks in all")
        if problems:
            problems.append(f"{what}: moments of the run (model clock): {self.marks}")
        return problems

    def name(self, value) -> str:
        if value is ZEROS:
            return "zeros"
        if isinstance(value, str):
            return value
        if value < FIRST_WID:
            return f"initial layer {value}'s content"
        write = self.writes[value - FIRST_WID] if value - FIRST_WID < len(self.writes) else None
        return write.describe(self) if write else f"unknown write {value}"

    def describe_allowed(self, block: int, expected: set) -> str:
        names = [self.name(v) for v in expected if v is not ZEROS] + (["zeros"] if ZEROS in expected else [])
        history = self.history.get(block, [])
        return " or ".join(names) + f" ({len(history)} writes to the block)"

    def problems_settled(self, data: bytes, what: str) -> list[str]:
        return self.check(data, self.settled, what)


#: write ids below this are initial contents (image layers written before the run)
FIRST_WID = 16


def layer_bytes(size: int, wid: int, blocks: set[int], under: bytes | None = None) -> bytes:
    """A raw image of ``size`` bytes holding write ``wid``'s pattern in ``blocks``, ``under`` elsewhere."""
    data = bytearray(under if under is not None else bytes(size))
    for b in blocks:
        data[b * BLOCK : (b + 1) * BLOCK] = block_data(wid, b)
    return bytes(data)


class Writer(threading.Thread):
    """Random writes (4 KiB to 64 KiB, some FUA, some WRITE_ZEROES, a FLUSH now and then) with up
    to ``depth`` requests in flight, never two overlapping, at about ``rate`` requests per second
    (0: as fast as the server answers), until :meth:`stop`. Each write and flush goes into the
    model when issued and when answered.

    Failed requests are collected in :attr:`errors` (the writer goes on); after
    :meth:`expect_disconnect` (the server is about to be killed) they are not: whatever was in
    flight then stays "never acknowledged". Requests that failed before still count."""

    def __init__(
        self, uri: str, model: Model, seed: int, depth: int = 4, rate: float = 200, max_blocks: int = 16
    ) -> None:
        super().__init__(daemon=True, name=f"writer-{seed}")
        self.uri = uri
        self.model = model
        self.rng = random.Random(seed)
        self.depth = depth
        self.rate = rate
        self.max_blocks = max_blocks
        self.error: str | None = None  # the connection failed
        self.errors: list[str] = []  # requests that failed
        self._stop_requested = threading.Event()
        self._disconnect_expected = threading.Event()
        self._started = threading.Event()
        self.connected = threading.Event()
        self.inflight: dict[int, Write | Flush] = {}
        self.buffers: dict[int, nbd.Buffer] = {}
        self.busy: set[int] = set()
        self.next_wid = FIRST_WID
        self.issued = 0
        self.answered = 0
        self.progress = threading.Condition()
        self.finished = False

    # -- control from the scenario --------------------------------------------------------------

    def begin(self) -> Writer:
        self.start()
        self.connected.wait(60)
        if self.error:
            raise AssertionError(f"writer: {self.error}")
        return self

    def problems(self) -> list[str]:
        """What went wrong, one line each (empty when every request succeeded)."""
        out = [f"writer: {self.error}"] if self.error else []
        out += [f"writer: {e}" for e in self.errors[:5]]
        if len(self.errors) > 5:
            out.append(f"writer: ... {len(self.errors)} requests failed in all")
        return out

    def expect_disconnect(self) -> None:
        self._disconnect_expected.set()

    def stop(self, timeout: float = 120) -> list[str]:
        """Stop issuing, wait for every answer, flush; return :meth:`problems`."""
        self._stop_requested.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"writer: {len(self.inflight)} requests still unanswered after {timeout}s")
        return self.problems()

    def in_flight(self) -> int:
        return len(self.inflight)

    def wait_answers(self, count: int, timeout: float = 120) -> None:
        """Let ``count`` more requests be answered (the scenario's way to let the guest go on
        for a while: it scales with the machine's speed, unlike a sleep)."""
        with self.progress:
            target = self.answered + count
            done = self.progress.wait_for(lambda: self.answered >= target or self.finished, timeout)
        if self.finished and self.error and not self._disconnect_expected.is_set():
            raise AssertionError(f"writer: {self.error}")
        if not done:
            raise AssertionError(f"writer: {count} answers did not come within {timeout}s")

    def abandon(self) -> None:
        """Clean-up after a failed scenario: stop without judging."""
        self._disconnect_expected.set()
        self._stop_requested.set()
        self.join(30)

    # -- the thread -----------------------------------------------------------------------------

    def run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
        except nbd.Error as exc:
            self.error = f"connect: {exc}"
            self.finished = True
            self.connected.set()
            return
        self.connected.set()
        self.can_fua = h.can_fua()
        try:
            self._loop(h)
            if not self._disconnect_expected.is_set():
                try:
                    h.flush()
                except nbd.Error as exc:
                    self.errors.append(f"final flush: {exc}")
                h.shutdown()
        except nbd.Error as exc:
            if not self._disconnect_expected.is_set():
                self.error = f"{exc} ({len(self.inflight)} requests in flight)"
        finally:
            del h
            with self.progress:
                self.finished = True
                self.progress.notify_all()

    def _loop(self, h: nbd.NBD) -> None:
        began = time.monotonic()
        while True:
            stopping = self._stop_requested.is_set() or self._disconnect_expected.is_set()
            if stopping and not self.inflight:
                return
            wait_ms = 100
            if not stopping:
                while len(self.inflight) < self.depth:
                    due = began + self.issued / self.rate if self.rate else 0
                    now = time.monotonic()
                    if due > now:  # pacing, not synchronisation: the rate a guest writes at
                        wait_ms = max(1, int((due - now) * 1000))
                        break
                    if not self._issue(h):
                        break
            h.poll(min(wait_ms, 100))
            self._reap(h)

    def _pick(self) -> tuple[int, int] | None:
        blocks = self.model.blocks
        for _ in range(8):
            count = self.rng.randint(1, self.max_blocks)
            block = self.rng.randrange(0, blocks - count + 1)
            span = range(block, block + count)
            if not any(b in self.busy for b in span):
                return block, count
        return None

    def _issue(self, h: nbd.NBD) -> bool:
        self.issued += 1
        roll = self.rng.random()
        if roll < 0.04:
            op: Write | Flush = self.model.issue_flush()
            cookie = h.aio_flush()
            self.inflight[cookie] = op
            return True
        picked = self._pick()
        if picked is None:
            return False
        block, count = picked
        zero = roll < 0.12
        fua = self.can_fua and self.rng.random() < 0.15
        flags = nbd.CMD_FLAG_FUA if fua else 0
        wid = self.next_wid
        self.next_wid += 1
        write = self.model.issue(wid, block, count, zero, fua)
        assert write.wid - FIRST_WID == len(self.model.writes) - 1
        self.busy.update(range(block, block + count))
        if zero:
            cookie = h.aio_zero(count * BLOCK, block * BLOCK, flags=flags)
        else:
            data = b"".join(block_data(wid, b) for b in range(block, block + count))
            buffer = nbd.Buffer.from_bytearray(bytearray(data))
            cookie = h.aio_pwrite(buffer, block * BLOCK, flags=flags)
            self.buffers[cookie] = buffer
        self.inflight[cookie] = write
        return True

    def _reap(self, h: nbd.NBD) -> None:
        for cookie in list(self.inflight):
            op = self.inflight[cookie]
            try:
                if not h.aio_command_completed(cookie):
                    continue
                self.model.ack(op)
            except nbd.Error as exc:
                if self._disconnect_expected.is_set():
                    raise
                self.model.ack(op, str(exc))
                what = op.describe(self.model) if isinstance(op, Write) else "flush"
                self.errors.append(what if isinstance(op, Write) else f"flush: {exc}")
            del self.inflight[cookie]
            self.buffers.pop(cookie, None)
            if isinstance(op, Write):
                self.busy.difference_update(range(op.block, op.block + op.count))
            with self.progress:
                self.answered += 1
                self.progress.notify_all()
