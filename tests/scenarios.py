"""Race-prone daemon scenarios, each one run of one graph change under a live writer.

Shared by ``scripts/stress`` (many runs with the CPU kept busy) and tests/test_stress_smoke.py
(a few runs in CI). Every scenario starts a daemon (``pynbd daemon`` or ``qemu-storage-daemon``,
tests/daemons.py) on fresh images, runs a :class:`tests.model.Writer` against its export, changes
the graph (a mirror or commit pivot, a backup, fleecing, a cancel, a SIGKILL) and then checks
effects only:

- the bytes read back (through NBD, and from the image files after the daemon is gone) against
  the writer's model of acknowledged writes (tests/model.py);
- ``qemu-img check`` on every image (leaks fail a scenario, except after a SIGKILL, where they are
  counted apart: qemu-img's exit code 3 means leaks only, 2 corruption);
- the graph (``x-debug-query-block-graph``, ``query-block-exports``, ``query-jobs``) as expected
  after the job.

A scenario records every problem it finds in :attr:`Run.problems` and goes on checking, so one
failed run reports all it saw. QMP events are kept in a backlog (:class:`EventLog`), never dropped:
a scenario waiting for one job's event must not lose another job's.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import nbd

from tests.daemons import Daemon, start_daemon
from tests.model import BLOCK, Model, Writer, block_data, layer_bytes
from tests.peers import nbdkit_server, read_all, run

MiB = 1 << 20
EVENT_TIMEOUT = 180.0


class ScenarioError(AssertionError):
    """A run cannot go on (a job never finished, a command failed): the run fails with this."""


@dataclass
class Run:
    """One run of one scenario: its directory, seed, and what it found."""

    name: str
    kind: str
    seed: int
    index: int
    tmp: Path
    size: int = 16 * MiB
    stack: ExitStack = field(default_factory=ExitStack)
    problems: list[str] = field(default_factory=list)
    #: counts this run contributes to the scenario's summary (e.g. leaked clusters after a kill)
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def expect(self, condition: bool, message: str) -> bool:
        if not condition:
            self.problems.append(message)
        return condition

    def path(self, name: str) -> Path:
        return self.tmp / name


# -- QMP events, kept ---------------------------------------------------------------------------


class EventLog:
    """Every event a daemon sends, in order; :meth:`take` hands out the first unclaimed match and
    keeps the rest for later waits (tests/daemons.py's wait_event drops what it skips)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.backlog: list[dict] = []
        self.claimed: set[int] = set()

    def _pull(self, timeout: float) -> dict | None:
        try:
            event = self.daemon.qmp.pull_event(wait=float(timeout) if timeout > 0 else False)
        except TimeoutError:
            return None
        if event is not None:
            self.backlog.append(event)
        return event

    def drain(self) -> None:
        """Take in what has arrived, without waiting."""
        while self._pull(0) is not None:
            pass

    def _find(self, names: tuple[str, ...], job: str | None) -> dict | None:
        for i, event in enumerate(self.backlog):
            data = event.get("data", {})
            if i not in self.claimed and event["event"] in names and job in (None, data.get("device", data.get("id"))):
                self.claimed.add(i)
                return event
        return None

    def take(self, *names: str, job: str | None = None, timeout: float = EVENT_TIMEOUT) -> dict:
        """The first unclaimed event among ``names`` (for ``job``, if given), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            event = self._find(names, job)
            if event is not None:
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [(e["event"], e.get("data", {}).get("device", "")) for e in self.backlog]
                raise ScenarioError(
                    f"{self.daemon.kind}: no {'/'.join(names)} for {job} within {timeout:.0f}s; events: {seen}"
                )
            self._pull(min(remaining, 5.0))

    def has(self, name: str, job: str) -> bool:
        """Whether ``name`` for ``job`` has arrived (claimed or not)."""
        self.drain()
        return any(
            e["event"] == name and job in (e.get("data", {}).get("device"), e.get("data", {}).get("id"))
            for e in self.backlog
        )


# -- images ---------------------------------------------------------------------------------------


def qcow2_chain(r: Run, name: str, layers: int, fill: float = 0.25) -> tuple[list[Path], dict[int, int]]:
    """``layers`` qcow2 images ``name-0`` (base) .. ``name-N`` (top), each backed by the one before
    and holding its own pattern (write id 1, 2, ...) in random runs of blocks; the model's initial
    content (block -> write id) of the top's view."""
    blocks = r.size // BLOCK
    initial: dict[int, int] = {}
    paths: list[Path] = []
    for layer in range(layers):
        wid = layer + 1
        chosen: set[int] = set()
        while len(chosen) < blocks * fill / layers:
            start = r.rng.randrange(blocks)
            chosen.update(range(start, min(blocks, start + r.rng.randint(1, 32))))
        path = r.path(f"{name}-{layer}.qcow2")
        if layer == 0:
            raw = r.path(f"{name}-{layer}.raw")
            raw.write_bytes(layer_bytes(r.size, wid, chosen))
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
            raw.unlink()
        else:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(paths[-1]), "-F", "qcow2", str(path)])
            _write_blocks(r, path, wid, sorted(chosen))
        for b in chosen:
            initial[b] = wid
        paths.append(path)
    return paths, initial


def _write_blocks(r: Run, path: Path, wid: int, blocks: list[int]) -> None:
    """Write ``wid``'s pattern into ``blocks`` of the qcow2 image ``path`` (one qemu-io command per run)."""
    commands = []
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    for i, (start, count) in enumerate(runs):
        source = r.path(f"pattern-{wid}-{i}")
        source.write_bytes(b"".join(block_data(wid, start + k) for k in range(count)))
        commands += ["-c", f"write -s {source} {start * BLOCK} {count * BLOCK}"]
    run(["qemu-io", "-f", "qcow2", *commands, str(path)])
    for i in range(len(runs)):
        r.path(f"pattern-{wid}-{i}").unlink()


def blank_qcow2(r: Run, name: str) -> Path:
    path = r.path(name)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(r.size)])
    return path


def chain_options(paths: list[Path], names: list[str], read_only_below: bool = False) -> list[str]:
    """--blockdev options opening ``paths`` as an explicit chain of qcow2 nodes named ``names``
    (file nodes ``<name>-f``); ``read_only_below``: every layer but the top read-only, as backing
    files usually are (active commit then reopens its base read-write)."""
    options = []
    for i, (path, name) in enumerate(zip(paths, names, strict=True)):
        options += ["--blockdev", f"driver=file,node-name={name}-f,filename={path}"]
        spec = f"driver=qcow2,node-name={name},file={name}-f"
        if i:
            spec += f",backing={names[i - 1]}"
        if read_only_below and i < len(paths) - 1:
            spec += ",read-only=on"
        options += ["--blockdev", spec]
    return options


def check_image(r: Run, path: Path, after_kill: bool = False) -> None:
    """``qemu-img check``: corruption always fails; leaked clusters fail too unless ``after_kill``
    (then they are counted in the run's stats)."""
    result = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = {}
    leaks = report.get("leaks", 0)
    if result.returncode == 3 and after_kill:
        r.stats["images with leaks"] += 1
        r.stats["leaked clusters"] += leaks
    elif result.returncode != 0:
        r.problems.append(
            f"qemu-img check {path.name}: exit {result.returncode}, corruptions {report.get('corruptions')}, "
            f"leaks {leaks}, check-errors {report.get('check-errors')}: {result.stdout.strip()} {result.stderr.strip()}"
        )


def read_image(r: Run, path: Path) -> bytes:
    """The image's guest view (its backing chain included) as qemu reads it."""
    out = r.path(f"{path.stem}-view.raw")
    run(["qemu-img", "convert", "-O", "raw", str(path), str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


def read_uri(uri: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return read_all(h)
    finally:
        h.shutdown()


def backing_file(path: Path) -> str | None:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    return info.get("backing-filename")


# -- daemons and the graph ------------------------------------------------------------------------


def start(r: Run, *options: str) -> tuple[Daemon, EventLog]:
    daemon = start_daemon(r.kind, r.tmp, *options)
    r.stack.callback(daemon.stop)
    return daemon, EventLog(daemon)


def export(daemon: Daemon, node: str, name: str = "w", writable: bool = True) -> None:
    daemon.ok("block-export-add", type="nbd", id=name, **{"node-name": node}, name=name, writable=writable)


def writer(r: Run, daemon: Daemon, model: Model, **options) -> Writer:
    w = Writer(daemon.uri("w"), model, r.seed, **options)
    r.stack.callback(w.abandon)
    return w.begin()


def graph_shape(daemon: Daemon, perms: bool = True) -> dict:
    """The block-driver nodes, the edges between them (with their permissions if ``perms``), the
    exports and the jobs: what a graph change must leave as it was (or change as expected)."""
    graph = daemon.ok("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"] if n["type"] == "block-driver"}
    edges = []
    for e in graph["edges"]:
        if e["parent"] in names and e["child"] in names:
            edge = (names[e["parent"]], e["name"], names[e["child"]])
            if perms:
                edge += (tuple(sorted(e["perm"])), tuple(sorted(e["shared-perm"])))
            edges.append(edge)
    return {
        "nodes": sorted(names.values()),
        "edges": sorted(edges),
        "exports": sorted((e["id"], e["node-name"]) for e in daemon.ok("query-block-exports")),
        "jobs": [(j["id"], j["status"]) for j in daemon.ok("query-jobs")],
    }


def expect_graph(r: Run, daemon: Daemon, expected: dict, what: str, perms: bool = True) -> None:
    got = graph_shape(daemon, perms)
    for key in expected:
        if got[key] != expected[key]:
            missing = [x for x in expected[key] if x not in got[key]]
            extra = [x for x in got[key] if x not in expected[key]]
            r.problems.append(f"graph {what}: {key} differ: missing {missing}, unexpected {extra}")


def stop_daemon(r: Run, daemon: Daemon) -> None:
    code = daemon.stop()
    r.expect(code == 0, f"{daemon.kind} exited with {code} on quit; log tail:\n{daemon.log()[-2000:]}")


def pause_for_writes(r: Run, w: Writer, low: int, high: int) -> None:
    """Let the guest go on for a random number of answered requests: a random moment for the next
    step, measured in guest progress so it holds on a busy machine."""
    count = r.rng.randint(low, high)
    if count:
        w.wait_answers(count)


def wait_ready(r: Run, events: EventLog, job: str) -> None:
    """BLOCK_JOB_READY for ``job``; a job that ends instead fails the run at once, with why."""
    event = events.take("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", job=job)
    if event["event"] != "BLOCK_JOB_READY":
        errors = [e["data"] for e in events.backlog if e["event"] == "BLOCK_JOB_ERROR"]
        raise ScenarioError(f"job {job} ended before it was ready: {event['event']} {event['data']}; errors {errors}")


def complete(r: Run, daemon: Daemon, events: EventLog, job: str) -> None:
    """block-job-complete; a job that failed meanwhile fails the run with its error."""
    reply = daemon.cmd("block-job-complete", device=job)
    if "error" in reply:
        events.drain()
        ended = [e["data"] for e in events.backlog if e["event"] == "BLOCK_JOB_COMPLETED"]
        raise ScenarioError(f"block-job-complete {job}: {reply['error']['desc']}; job ended: {ended}")


def job_finished(r: Run, events: EventLog, job: str) -> None:
    """BLOCK_JOB_COMPLETED without error for ``job``. A job that failed ends the run: what its
    target holds then says nothing, the job's error is the finding."""
    done = events.take("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", job=job)
    if done["event"] != "BLOCK_JOB_COMPLETED" or "error" in done["data"]:
        raise ScenarioError(f"job {job} did not complete: {done['event']} {done['data']}")


# -- mirror and active commit pivots ---------------------------------------------------------------


def _pivot(r: Run, daemon: Daemon, events: EventLog, model: Model, w: Writer, job: str, command: str, **args) -> None:
    """Start ``command`` (a mirror or an active commit), let it become ready under the writer,
    complete it at a random moment and let the writer go on past the pivot."""
    model.mark("job issued")
    daemon.ok(command, **{"job-id": job}, **args)
    model.mark("job started")
    wait_ready(r, events, job)
    model.mark("ready seen")
    pause_for_writes(r, w, 0, 40)
    model.mark("complete issued")
    complete(r, daemon, events, job)
    model.mark("complete answered")
    job_finished(r, events, job)
    model.mark("completed seen")
    pause_for_writes(r, w, 1, 40)


def _after_pivot(r: Run, daemon: Daemon, model: Model, w: Writer, before: dict, target: str, images, active: Path):
    r.problems += w.stop()
    model.mark("writer stopped")
    r.problems += model.problems_settled(read_uri(daemon.uri("w")), "export after the pivot")
    expect_graph(r, daemon, {**before, "exports": [("w", target)], "jobs": []}, "after the pivot", perms=False)
    stop_daemon(r, daemon)
    for image in images:
        check_image(r, image)
    r.problems += model.problems_settled(read_image(r, active), f"{active.name} (the pivot's target) after quit")


def mirror_pivot(r: Run) -> None:
    """blockdev-mirror sync=full of a local qcow2 chain into a blank qcow2, completed under a writer."""
    paths, initial = qcow2_chain(r, "src", 2)
    target = blank_qcow2(r, "dst.qcow2")
    daemon, events = start(r, *chain_options(paths, ["src0", "src1"]))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "dst"}, file={"driver": "file", "filename": str(target)})
    export(daemon, "src1")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon, perms=False)
    pause_for_writes(r, w, 0, 30)
    _pivot(r, daemon, events, model, w, "m", "blockdev-mirror", device="src1", target="dst", sync="full")
    _after_pivot(r, daemon, model, w, before, "dst", [*paths, target], target)


def mirror_pivot_nbd(r: Run) -> None:
    """blockdev-mirror of a slow remote nbd node (nbdkit memory behind the delay filter) into a
    local qcow2, completed under a writer whose every write waits for the remote."""
    remote = nbdkit_server(r.tmp, "--filter=delay", "memory", str(r.size), "wdelay=2ms")
    r.stack.callback(remote.stop)
    target = blank_qcow2(r, "dst.qcow2")
    daemon, events = start(r)
    daemon.ok("blockdev-add", driver="nbd", **{"node-name": "src"}, server={"type": "unix", "path": remote.socket_path})
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "dst"}, file={"driver": "file", "filename": str(target)})
    export(daemon, "src")
    model = Model(r.size)
    w = writer(r, daemon, model, depth=8)
    before = graph_shape(daemon, perms=False)
    pause_for_writes(r, w, 0, 30)
    _pivot(r, daemon, events, model, w, "m", "blockdev-mirror", device="src", target="dst", sync="full")
    _after_pivot(r, daemon, model, w, before, "dst", [target], target)


def mirror_start_inflight(r: Run) -> None:
    """blockdev-mirror issued while the writer has many requests in flight (as fast as the daemon
    answers, 16 deep); the writer slows down afterwards so the mirror converges."""
    paths, initial = qcow2_chain(r, "src", 1)
    target = blank_qcow2(r, "dst.qcow2")
    daemon, events = start(r, *chain_options(paths, ["src"]))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "dst"}, file={"driver": "file", "filename": str(target)})
    export(daemon, "src")
    model = Model(r.size, initial)
    w = writer(r, daemon, model, depth=16, rate=0)
    before = graph_shape(daemon, perms=False)
    pause_for_writes(r, w, 16, 64)
    started = model.mark("job issued")
    daemon.ok("blockdev-mirror", device="src", target="dst", sync="full", **{"job-id": "m"})
    answered = model.mark("job started")
    w.rate = 200
    with model.lock:
        across = sum(1 for x in model.writes if x.issued < started and (x.acked is None or x.acked > answered))
    r.stats["writes in flight across blockdev-mirror"] += across
    wait_ready(r, events, "m")
    model.mark("ready seen")
    pause_for_writes(r, w, 0, 20)
    model.mark("complete issued")
    complete(r, daemon, events, "m")
    job_finished(r, events, "m")
    model.mark("completed seen")
    pause_for_writes(r, w, 1, 20)
    _after_pivot(r, daemon, model, w, before, "dst", [*paths, target], target)


def commit_pivot(r: Run) -> None:
    """Active block-commit of base <- mid <- top (base and mid read-only) into base, completed
    under a writer: the export moves to the base, which must then hold everything."""
    paths, initial = qcow2_chain(r, "disk", 3)
    daemon, events = start(r, *chain_options(paths, ["base", "mid", "top"], read_only_below=True))
    export(daemon, "top")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon, perms=False)
    pause_for_writes(r, w, 0, 30)
    _pivot(r, daemon, events, model, w, "c", "block-commit", device="top")
    _after_pivot(r, daemon, model, w, before, "base", paths, paths[0])


def commit_punch(r: Run) -> None:
    """commit-pivot with hole punching (pynbd's ``x-discard-committed``): the layers above the
    base give back what was committed as the job goes, guest writes over ranges they do not
    allocate go to the base alone. Afterwards the base holds everything and neither mid nor top
    holds a cluster any more (``qemu-img map``)."""
    paths, initial = qcow2_chain(r, "disk", 3)
    daemon, events = start(r, *chain_options(paths, ["base", "mid", "top"], read_only_below=True))
    export(daemon, "top")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon, perms=False)
    pause_for_writes(r, w, 0, 30)
    _pivot(r, daemon, events, model, w, "c", "block-commit", device="top", **{"x-discard-committed": True})
    _after_pivot(r, daemon, model, w, before, "base", paths, paths[0])
    for depth, path in ((1, paths[1]), (2, paths[2])):  # their base is at this depth of their chain
        extents = json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout)
        held = [e for e in extents if e["depth"] != depth]
        r.expect(not held, f"{path.name} still holds clusters after a hole-punching commit: {held[:3]}")


# -- backup and fleecing ---------------------------------------------------------------------------


def backup_full(r: Run) -> None:
    """blockdev-backup sync=full under a writer: the target is the disk as it was when the job
    started (copy-before-write), the disk has every write, the graph is as before."""
    paths, initial = qcow2_chain(r, "disk", 2)
    target = blank_qcow2(r, "bk.qcow2")
    daemon, events = start(r, *chain_options(paths, ["base", "disk"]))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "bk"}, file={"driver": "file", "filename": str(target)})
    export(daemon, "disk")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon)
    pause_for_writes(r, w, 0, 30)
    t0 = model.mark("backup issued")
    daemon.ok("blockdev-backup", device="disk", target="bk", sync="full", **{"job-id": "b"})
    t1 = model.mark("backup started")
    job_finished(r, events, "b")
    model.mark("completed seen")
    pause_for_writes(r, w, 1, 30)
    r.problems += w.stop()
    r.problems += model.problems_settled(read_uri(daemon.uri("w")), "export after the backup")
    expect_graph(r, daemon, before, "after the backup")
    stop_daemon(r, daemon)
    for image in [*paths, target]:
        check_image(r, image)
    r.problems += model.check(read_image(r, target), lambda b: model.at_moment(b, t0, t1), "backup target")
    r.problems += model.problems_settled(read_image(r, paths[-1]), "disk after quit")


def _read_fleece(r: Run, daemon: Daemon, model: Model, w: Writer, t0: int, t1: int, what: str) -> None:
    """Read the fleecing export twice while the writer goes on: both are the disk at [t0, t1]."""
    for attempt in (1, 2):
        data = read_uri(daemon.uri("fleece"))
        r.problems += model.check(data, lambda b: model.at_moment(b, t0, t1), f"{what} read {attempt}")
        pause_for_writes(r, w, 1, 30)


def fleecing_old(r: Run) -> None:
    """Old-way fleecing: a qcow2 overlay backed by the live disk, blockdev-backup sync=none into it
    (in a transaction), exported and read while the writer goes on; torn down to the graph before."""
    paths, initial = qcow2_chain(r, "disk", 1)
    overlay = blank_qcow2(r, "fleece.qcow2")
    daemon, events = start(r, *chain_options(paths, ["disk"]))
    export(daemon, "disk")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon)
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "tmp"},
        file={"driver": "file", "filename": str(overlay)},
        backing="disk",
    )
    pause_for_writes(r, w, 0, 30)
    t0 = model.mark("fleecing issued")
    action = {"device": "disk", "target": "tmp", "sync": "none", "job-id": "fl"}
    daemon.ok("transaction", actions=[{"type": "blockdev-backup", "data": action}])
    t1 = model.mark("fleecing started")
    export(daemon, "tmp", "fleece", writable=False)
    _read_fleece(r, daemon, model, w, t0, t1, "old-way fleece")
    daemon.ok("block-export-del", id="fleece")
    daemon.ok("block-job-cancel", device="fl")
    events.take("BLOCK_JOB_CANCELLED", job="fl")
    events.take("BLOCK_EXPORT_DELETED")
    daemon.ok("blockdev-del", **{"node-name": "tmp"})
    r.problems += w.stop()
    r.problems += model.problems_settled(read_uri(daemon.uri("w")), "export after fleecing")
    expect_graph(r, daemon, before, "after fleecing")
    stop_daemon(r, daemon)
    for image in [*paths, overlay]:
        check_image(r, image)
    r.problems += model.problems_settled(read_image(r, paths[-1]), "disk after quit")


def fleecing_new(r: Run) -> None:
    """New-way fleecing (pynbd): copy-before-write inserted under the live export in a
    transaction, snapshot-access exported and read while the writer goes on; torn down."""
    paths, initial = qcow2_chain(r, "disk", 1)
    scratch = blank_qcow2(r, "scratch.qcow2")
    daemon, events = start(r, *chain_options(paths, ["disk"]))
    export(daemon, "disk")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon)
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "tmp"}, file={"driver": "file", "filename": str(scratch)})
    daemon.ok("blockdev-add", driver="copy-before-write", file="disk", target="tmp", **{"node-name": "cbw"})
    pause_for_writes(r, w, 0, 30)
    t0 = model.mark("filter insert issued")
    daemon.ok("transaction", actions=[{"type": "blockdev-insert-filter", "data": {"filter": "cbw"}}])
    t1 = model.mark("filter inserted")
    daemon.ok("blockdev-add", driver="snapshot-access", file="cbw", **{"node-name": "snap"})
    export(daemon, "snap", "fleece", writable=False)
    _read_fleece(r, daemon, model, w, t0, t1, "new-way fleece")
    daemon.ok("block-export-del", id="fleece")
    events.take("BLOCK_EXPORT_DELETED")
    daemon.ok("blockdev-del", **{"node-name": "snap"})
    daemon.ok("blockdev-remove-filter", filter="cbw")
    daemon.ok("blockdev-del", **{"node-name": "cbw"})
    daemon.ok("blockdev-del", **{"node-name": "tmp"})
    r.problems += w.stop()
    r.problems += model.problems_settled(read_uri(daemon.uri("w")), "export after fleecing")
    expect_graph(r, daemon, before, "after fleecing")
    stop_daemon(r, daemon)
    for image in [*paths, scratch]:
        check_image(r, image)
    r.problems += model.problems_settled(read_image(r, paths[-1]), "disk after quit")


def _slow_target(r: Run, alongside: bool) -> None:
    """docs/slow-target.md under a writer: backup into a fast overlay backed by a slow remote,
    the overlay committed into the remote (``alongside`` the backup, or after it). The remote then
    holds the disk as it was at the backup's start."""
    paths, initial = qcow2_chain(r, "disk", 1)
    overlay = blank_qcow2(r, "overlay.qcow2")
    slow = nbdkit_server(r.tmp, "--filter=delay", "memory", str(r.size), "wdelay=2ms")
    r.stack.callback(slow.stop)
    daemon, events = start(r, *chain_options(paths, ["disk"]))
    export(daemon, "disk")
    daemon.ok("blockdev-add", driver="nbd", **{"node-name": "slow"}, server={"type": "unix", "path": slow.socket_path})
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon)
    daemon.ok(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "fast"},
        file={"driver": "file", "filename": str(overlay)},
        backing="slow",
    )
    pause_for_writes(r, w, 0, 30)
    t0 = model.mark("backup issued")
    daemon.ok("blockdev-backup", device="disk", target="fast", sync="full", **{"job-id": "bk"})
    t1 = model.mark("backup started")
    if alongside:
        daemon.ok("block-commit", device="fast", **{"job-id": "cm"})
        model.mark("commit started")
    job_finished(r, events, "bk")
    model.mark("backup completed seen")
    if not alongside:
        daemon.ok("block-commit", device="fast", **{"job-id": "cm"})
        model.mark("commit started")
    wait_ready(r, events, "cm")
    complete(r, daemon, events, "cm")
    job_finished(r, events, "cm")
    model.mark("commit completed seen")
    pause_for_writes(r, w, 1, 20)
    r.problems += w.stop()
    r.problems += model.check(read_uri(slow.uri), lambda b: model.at_moment(b, t0, t1), "slow target")
    r.problems += model.problems_settled(read_uri(daemon.uri("w")), "export after the backup")
    daemon.ok("blockdev-del", **{"node-name": "fast"})
    expect_graph(r, daemon, before, "after the backup and commit")
    stop_daemon(r, daemon)
    for image in [*paths, overlay]:
        check_image(r, image)
    r.problems += model.problems_settled(read_image(r, paths[-1]), "disk after quit")


def slow_target_later(r: Run) -> None:
    _slow_target(r, alongside=False)


def slow_target_alongside(r: Run) -> None:
    _slow_target(r, alongside=True)


# -- cancel mid-run --------------------------------------------------------------------------------


def _cancel(r: Run, daemon: Daemon, events: EventLog, w: Writer, job: str, mirror: bool = False) -> None:
    """Cancel ``job`` at a random moment while it runs (rate-limited, it is far from done)."""
    pause_for_writes(r, w, 1, 40)
    jobs = {j["id"]: j["status"] for j in daemon.ok("query-jobs")}
    r.expect(jobs.get(job) == "running", f"job {job} not running when cancelled: {jobs}")
    daemon.ok("block-job-cancel", device=job)
    ended = events.take("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED", job=job)
    if mirror and ended["event"] == "BLOCK_JOB_COMPLETED":
        r.stats["mirror ready before its cancel (completed without pivot)"] += 1
        r.expect("error" not in ended["data"], f"job {job}: {ended['data']}")
    else:
        r.expect(ended["event"] == "BLOCK_JOB_CANCELLED", f"job {job}: {ended['event']} after cancel")


def cancel_mirror(r: Run) -> None:
    paths, initial = qcow2_chain(r, "src", 2)
    target = blank_qcow2(r, "dst.qcow2")
    daemon, events = start(r, *chain_options(paths, ["src0", "src1"]))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "dst"}, file={"driver": "file", "filename": str(target)})
    export(daemon, "src1")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon)
    speed = r.size // 4
    daemon.ok("blockdev-mirror", device="src1", target="dst", sync="full", speed=speed, **{"job-id": "m"})
    _cancel(r, daemon, events, w, "m", mirror=True)
    _after_cancel(r, daemon, model, w, before, [*paths, target], paths[-1])


def cancel_backup(r: Run) -> None:
    paths, initial = qcow2_chain(r, "disk", 2)
    target = blank_qcow2(r, "bk.qcow2")
    daemon, events = start(r, *chain_options(paths, ["base", "disk"]))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "bk"}, file={"driver": "file", "filename": str(target)})
    export(daemon, "disk")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon)
    daemon.ok("blockdev-backup", device="disk", target="bk", sync="full", speed=r.size // 4, **{"job-id": "b"})
    _cancel(r, daemon, events, w, "b")
    _after_cancel(r, daemon, model, w, before, [*paths, target], paths[-1])


def cancel_stream(r: Run) -> None:
    paths, initial = qcow2_chain(r, "disk", 3)
    daemon, events = start(r, *chain_options(paths, ["base", "mid", "top"], read_only_below=True))
    export(daemon, "top")
    model = Model(r.size, initial)
    w = writer(r, daemon, model)
    before = graph_shape(daemon)
    daemon.ok("block-stream", device="top", speed=r.size // 4, **{"job-id": "s"})
    _cancel(r, daemon, events, w, "s")
    backing = backing_file(paths[-1])
    _after_cancel(r, daemon, model, w, before, paths, paths[-1])
    r.expect(backing == str(paths[1]), f"top's header names backing {backing!r} after a cancelled stream")


def _after_cancel(r: Run, daemon: Daemon, model: Model, w: Writer, before: dict, images, active: Path) -> None:
    expect_graph(r, daemon, before, "after the cancel")
    pause_for_writes(r, w, 1, 20)
    r.problems += w.stop()
    r.problems += model.problems_settled(read_uri(daemon.uri("w")), "export after the cancel")
    stop_daemon(r, daemon)
    for image in images:
        check_image(r, image)
    r.problems += model.problems_settled(read_image(r, active), f"{active.name} after quit")


# -- the SIGKILL loop ------------------------------------------------------------------------------

CRASH_OPS = ("backup", "mirror", "commit")
#: the moment of the kill, by how far the job got
CRASH_PHASES = {
    "backup": ("running", "completed"),
    "mirror": ("running", "ready", "completing", "completed"),
    "commit": ("running", "ready", "completing", "completed"),
}


def crash_loop(r: Run) -> None:
    """One round of the SIGKILL loop: a daemon on a qcow2 chain, a writer that keeps FUA and FLUSH
    acknowledgements, a backup, a mirror or an active commit (rotating with the seed), and a
    SIGKILL at a random moment (before the job is ready, while ready, right after
    block-job-complete, or after BLOCK_JOB_COMPLETED). Then every image passes qemu-img check
    (leaks counted apart) and every durably acknowledged write reads back from the chain that
    was active at the kill: the source's before the pivot, the target after BLOCK_JOB_COMPLETED
    was seen; in between (complete sent, event not yet seen) either may be."""
    _crash_round(r, CRASH_OPS[r.seed % len(CRASH_OPS)])


def crash_punch(r: Run) -> None:
    """The SIGKILL loop's active commit with hole punching (pynbd's ``x-discard-committed``) of
    base <- mid <- top: killed while clusters leave the layers, or after, every durable write
    must still read back through the top's chain (or the base's, after the pivot)."""
    _crash_round(r, "commit", punch=True)


def _crash_round(r: Run, op: str, punch: bool = False) -> None:
    phase = r.rng.choice(CRASH_PHASES[op])
    names = ["base", "mid", "top"] if punch else ["base", "top"]
    paths, initial = qcow2_chain(r, "disk", len(names))
    images = list(paths)
    options = chain_options(paths, names, read_only_below=op == "commit")
    target = None
    if op != "commit":
        target = blank_qcow2(r, "target.qcow2")
        images.append(target)
    daemon, events = start(r, *options)
    if target is not None:
        daemon.ok(
            "blockdev-add", driver="qcow2", **{"node-name": "tgt"}, file={"driver": "file", "filename": str(target)}
        )
    export(daemon, "top")
    model = Model(r.size, initial)
    w = writer(r, daemon, model, rate=300)
    pause_for_writes(r, w, 5, 30)
    state = "running"
    model.mark("job issued")
    if op == "backup":
        daemon.ok("blockdev-backup", device="top", target="tgt", sync="full", **{"job-id": "j"})
    elif op == "mirror":
        daemon.ok("blockdev-mirror", device="top", target="tgt", sync="full", **{"job-id": "j"})
    else:
        daemon.ok("block-commit", device="top", **{"job-id": "j"}, **({"x-discard-committed": True} if punch else {}))
    model.mark("job started")
    if phase != "running":
        if op != "backup":
            wait_ready(r, events, "j")
            state = "ready"
            model.mark("ready seen")
        if phase in ("completing", "completed") or op == "backup":
            if op != "backup":
                pause_for_writes(r, w, 0, 10)
                model.mark("complete issued")
                complete(r, daemon, events, "j")
                state = "completing"
                model.mark("complete answered")
            if phase == "completed":
                job_finished(r, events, "j")
                state = "completed"
                model.mark("completed seen")
    pause_for_writes(r, w, *{"running": (1, 40), "ready": (0, 20), "completing": (0, 3), "completed": (0, 40)}[phase])
    if state == "completing" and events.has("BLOCK_JOB_COMPLETED", "j"):
        state = "completed"
    w.expect_disconnect()
    model.mark("kill")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    r.problems += w.stop()
    r.stats[f"{op} killed {state}"] += 1
    r.stats["durable writes"] += sum(1 for x in model.writes if model.durable(x))
    for image in images:
        check_image(r, image, after_kill=True)
    if op == "backup" or state in ("running", "ready"):
        candidates = [paths[-1]]
    elif state == "completing":
        candidates = [paths[-1], target if op == "mirror" else paths[0]]
    else:
        candidates = [target if op == "mirror" else paths[0]]
    found = {}
    for candidate in candidates:
        found[candidate.name] = model.check(
            read_image(r, candidate), model.after_crash, f"{candidate.name} after the kill"
        )
        if not found[candidate.name]:
            r.stats[f"{op} {state}: durable writes on {'source' if candidate == paths[-1] else 'target'}"] += 1
            break
    else:
        r.problems.append(f"{op} killed while {state} (aimed at {phase}): no candidate chain holds every durable write")
        for problems in found.values():
            r.problems += problems


# -- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    body: Callable[[Run], None]
    kinds: tuple[str, ...] = ("pynbd", "qsd")
    #: why the scenario does not run against qemu-storage-daemon
    not_qsd: str = ""


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("mirror-pivot", mirror_pivot),
        Scenario("mirror-pivot-nbd", mirror_pivot_nbd),
        Scenario("mirror-start-inflight", mirror_start_inflight),
        Scenario("commit-pivot", commit_pivot),
        Scenario("commit-punch", commit_punch, ("pynbd",), "x-discard-committed is a pynbd extension"),
        Scenario("backup-full", backup_full),
        Scenario("fleecing-old", fleecing_old),
        Scenario(
            "fleecing-new",
            fleecing_new,
            ("pynbd",),
            "qemu 7.2 cannot insert copy-before-write under a live export",
        ),
        Scenario("slow-target-later", slow_target_later),
        Scenario(
            "slow-target-alongside",
            slow_target_alongside,
            ("pynbd",),
            "qemu 7.2 refuses a commit of a backup's target (Need a root block node)",
        ),
        Scenario("cancel-mirror", cancel_mirror),
        Scenario("cancel-backup", cancel_backup),
        Scenario("cancel-stream", cancel_stream),
        Scenario("crash-loop", crash_loop),
        Scenario("crash-punch", crash_punch, ("pynbd",), "x-discard-committed is a pynbd extension"),
    )
}


@dataclass
class Outcome:
    run: Run
    seconds: float
    error: str | None = None
    log_lines: list[str] = field(default_factory=list)
    kept: bool = True

    @property
    def failed(self) -> bool:
        return bool(self.error or self.run.problems)

    def report(self) -> str:
        r = self.run
        where = f"files in {r.tmp}" if self.kept else "files removed"
        lines = [f"{r.name} [{r.kind}] run {r.index} seed {r.seed} failed ({self.seconds:.1f}s), {where}:"]
        lines += [f"  {p}" for p in r.problems]
        if self.error:
            lines += [f"  {line}" for line in self.error.rstrip().splitlines()]
        lines += [f"  log: {line}" for line in self.log_lines]
        return "\n".join(lines)


def run_once(name: str, kind: str, seed: int, index: int, size: int = 16 * MiB, keep: str = "failed") -> Outcome:
    """Run scenario ``name`` once against ``kind`` in a fresh directory under /tmp (short: socket
    paths). ``keep``: "all", "failed" (the directory of a failed run stays, for a look at its
    images and daemon log) or "none"."""
    tmp = Path(tempfile.mkdtemp(prefix=f"stress-{name}-", dir="/tmp"))
    r = Run(name, kind, seed, index, tmp, size)
    began = time.monotonic()
    error = None
    try:
        with r.stack:
            SCENARIOS[name].body(r)
    except ScenarioError as exc:
        error = str(exc)
    except Exception:
        error = traceback.format_exc(limit=6)
    outcome = Outcome(r, time.monotonic() - began, error)
    if outcome.failed:
        outcome.log_lines = _log_complaints(tmp)
    if keep == "none" or (keep == "failed" and not outcome.failed):
        shutil.rmtree(tmp, ignore_errors=True)
        outcome.kept = False
    return outcome


def _log_complaints(tmp: Path, limit: int = 8) -> list[str]:
    """The daemons' first error and warning lines, for the failure report."""
    lines = []
    for log in sorted(tmp.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "ERROR" in line or "WARNING" in line or "error" in line:
                lines.append(f"{log.name}: {line.strip()}")
                if len(lines) >= limit:
                    return lines
    return lines
