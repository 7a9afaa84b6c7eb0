"""The same QMP scripts against qemu-storage-daemon and pynbd daemon, compared by what clients see.

Each scenario runs once per daemon, in its own directory with identical fresh images. What is
recorded and must be equal:

- whether each command succeeded (error texts may differ) and what the query commands returned;
- every export's bytes, ``base:allocation`` and (where offered) ``qemu:allocation-depth`` extents,
  read with libnbd;
- ``query-block-exports``, and the fields of ``query-named-block-nodes`` that both report;
- the permission edges of ``x-debug-query-block-graph``;
- the image files after the daemon quit.

Names qemu picks itself (``#block123``) are replaced by what the node is, paths by ``{dir}``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

MiB = 1 << 20
pytestmark = pytest.mark.timeout(180)
CONTEXTS = ("base:allocation", "qemu:allocation-depth")


class Recorder:
    """Runs one scenario against one daemon and records what a client can observe."""

    def __init__(self, daemon, directory: Path) -> None:
        self.daemon = daemon
        self.dir = directory
        self.nbd_path = daemon.nbd_path
        self.log: list = []
        self.exports: dict[str, bool] = {}  # export name -> whether its data is defined

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def norm(self, value):
        """Per-daemon paths replaced, so both records compare."""
        text = json.dumps(value, sort_keys=True).replace(str(self.dir), "{dir}")
        return json.loads(text)

    # -- QMP ---------------------------------------------------------------------------------

    def qmp(self, command: str, **args):
        reply = self.daemon.cmd(command, **args)
        self.log.append((command, self.norm(args), "ok" if "return" in reply else "error"))
        return reply.get("return")

    def query(self, command: str, **args):
        """A command whose answer is part of the record."""
        result = self.qmp(command, **args)
        self.log.append((command, "->", self.norm(result)))
        return result

    def export(self, node: str, name: str | None = None, data_defined: bool = True, **options) -> None:
        name = name or node
        reply = self.qmp("block-export-add", type="nbd", id=name, **{"node-name": node}, name=name, **options)
        if reply is not None:
            self.exports[name] = data_defined

    def wait_job(self, job_id: str) -> None:
        self.daemon.wait_event("JOB_STATUS_CHANGE", job_id, status="concluded")
        [job] = [j for j in self.daemon.ok("query-jobs") if j["id"] == job_id]
        self.log.append(("job", job_id, "error" if "error" in job else "ok"))
        self.qmp("job-dismiss", id=job_id)

    def job_events(self, *job_ids: str) -> None:
        """Record the job events of ``job_ids`` received so far (those a command emitted come
        before its reply), in order, and forget every event received."""
        events = [*self.daemon.backlog, *self.daemon.qmp.get_events(wait=False)]
        self.daemon.backlog.clear()
        for event in events:
            data = event.get("data", {})
            job = data.get("id", data.get("device"))
            if job in job_ids and event["event"].startswith(("JOB_", "BLOCK_JOB_")):
                self.log.append(("event", event["event"], job, data.get("status")))

    # -- NBD clients ---------------------------------------------------------------------------

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_path}"

    def client(self, export: str, action: Callable[[nbd.NBD], object]) -> None:
        """Run a client action; its outcome (errno or ok) is recorded."""
        h = nbd.NBD()
        h.connect_uri(self.uri(export))
        try:
            action(h)
            outcome = "ok"
        except nbd.Error as exc:
            outcome = exc.errno
        finally:
            h.shutdown()
        self.log.append(("nbd", export, outcome))

    def observe_export(self, name: str, data_defined: bool) -> dict:
        h = nbd.NBD()
        for context in CONTEXTS:
            h.add_meta_context(context)
        h.connect_uri(self.uri(name))
        try:
            size = h.get_size()
            seen: dict = {"size": size, "read-only": bool(h.is_read_only())}
            if data_defined:
                digest = hashlib.sha256()
                for offset in range(0, size, MiB):
                    digest.update(h.pread(min(MiB, size - offset), offset))
                seen["sha256"] = digest.hexdigest()
            for context in CONTEXTS:
                if h.can_meta_context(context):
                    seen[context] = extents(h, context, size)
            return seen
        finally:
            h.shutdown()

    # -- the whole record ----------------------------------------------------------------------

    def observe(self) -> dict:
        nodes = self.daemon.ok("query-named-block-nodes")
        names = {n["node-name"]: node_key(n) for n in nodes}
        live = {e["id"] for e in self.daemon.ok("query-block-exports")}  # export ids are their names here
        record = {
            "log": self.log,
            "exports": sorted(
                (e["id"], names.get(e["node-name"]), e["type"]) for e in self.daemon.ok("query-block-exports")
            ),
            "nodes": sorted((node_summary(n, names) for n in nodes), key=json.dumps),
            "edges": sorted(graph_edges(self.daemon.ok("x-debug-query-block-graph"), names)),
            "clients": {
                name: self.observe_export(name, defined)
                for name, defined in sorted(self.exports.items())
                if name in live
            },
        }
        if self.daemon.stop() != 0:
            record["exit"] = "non-zero"
        record["files"] = {p.name: image_state(p) for p in sorted(self.dir.iterdir()) if p.suffix in (".raw", ".qcow2")}
        return self.norm(record)


def image_state(path: Path) -> dict:
    """A raw file's bytes; for qcow2 (whose layout differs between writers) the guest's bytes as
    qemu-img reads them, whether qemu-img check finds it clean, and its persistent bitmaps."""
    if path.suffix == ".raw":
        return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    flat = path.with_suffix(".flat")
    run(["qemu-img", "convert", "-O", "raw", str(path), str(flat)])
    try:
        guest = hashlib.sha256(flat.read_bytes()).hexdigest()
    finally:
        flat.unlink()
    check = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    verdict = json.loads(check.stdout) if check.stdout else {}
    clean = check.returncode == 0 and not verdict.get("leaks") and not verdict.get("corruptions")
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    bitmaps = sorted(
        (b["name"], b["granularity"], sorted(b["flags"])) for b in info["format-specific"]["data"].get("bitmaps", [])
    )
    return {"guest-sha256": guest, "check": "clean" if clean else check.stdout + check.stderr, "bitmaps": bitmaps}


def extents(h: nbd.NBD, context: str, size: int) -> list[tuple[int, int, int]]:
    """The context's extents over the whole export, adjacent equal ones merged."""
    merged: list[list[int]] = []
    pos = 0
    while pos < size:
        got: list[tuple[int, int]] = []

        def callback(metacontext, offset, entries, err, got=got):
            if metacontext == context:
                got.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        h.block_status(size - pos, pos, callback)
        assert got, f"no {context} extents at {pos}"
        for length, flags in got:
            length = min(length, size - pos)
            if merged and merged[-1][2] == flags:
                merged[-1][1] += length
            else:
                merged.append([pos, length, flags])
            pos += length
    return [tuple(e) for e in merged]


def node_key(node: dict) -> str:
    """A node's name, or for an implicitly created one, what it is."""
    if not node["node-name"].startswith("#"):
        return node["node-name"]
    return f"#{node['drv']}:{node['file']}"


def node_summary(node: dict, names: dict[str, str]) -> dict:
    image = node["image"]
    summary = {
        "name": names[node["node-name"]],
        "drv": node["drv"],
        "ro": node["ro"],
        # qemu reports a protocol node's length rounded up to 512 bytes; pynbd the file's length
        "virtual-size": -(-image["virtual-size"] // 512) * 512,
        "format": image["format"],
        # a protocol node's file name; format nodes differ in how they spell theirs (qemu's json:{...})
        "file": node["file"] if node["drv"] == "file" else None,
        "backing_file_depth": node["backing_file_depth"],
        "backing_file": node.get("backing_file"),
        "encrypted": node["encrypted"],
        "detect_zeroes": node["detect_zeroes"],
    }
    if node["drv"] == "file" and node["file"].endswith(".qcow2"):
        del summary["virtual-size"]  # the length of a qcow2 file depends on the writer's layout
    bitmaps = node.get("dirty-bitmaps") or []
    summary["dirty-bitmaps"] = sorted(
        (b["name"], b["count"], b["granularity"], b["recording"], b["persistent"], b["busy"]) for b in bitmaps
    )
    return summary


def graph_edges(graph: dict, names: dict[str, str]) -> list[tuple]:
    ids = {
        n["id"]: names.get(n["name"], n["name"]) if n["type"] == "block-driver" else "<user>" for n in graph["nodes"]
    }
    return [
        (
            ids[e["parent"]],
            ids[e["child"]],
            "root" if ids[e["parent"]] == "<user>" else e["name"],
            sorted(e["perm"]),
            sorted(e["shared-perm"]),
        )
        for e in graph["edges"]
    ]


def make_raw(path: Path, size: int = 4 * MiB, pieces: dict[int, bytes] | None = None) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in (
            pieces or {0: b"\x11" * 65536, MiB + 4096: b"\x22" * 8192, 3 * MiB: b"\x33" * MiB}
        ).items():
            f.seek(offset)
            f.write(data)


# -- scenarios -------------------------------------------------------------------------------------


def raw_file_writes(r: Recorder) -> None:
    make_raw(r.dir / "disk.raw")
    r.qmp("blockdev-add", driver="file", **{"node-name": "f0"}, filename=r.path("disk.raw"))
    r.qmp("blockdev-add", driver="raw", **{"node-name": "r0"}, file="f0")
    r.export("r0", "disk", writable=True, **{"allocation-depth": True})
    r.export("f0", "file", description="the protocol node")  # a second, read-only user of the file

    def writes(h):
        h.pwrite(b"\x44" * 65536, 2 * MiB)
        h.pwrite(b"\x55" * 1000, 2 * MiB + 100_000, nbd.CMD_FLAG_FUA)
        h.zero(65536, 0)  # may punch a hole
        h.zero(8192, MiB + 4096, nbd.CMD_FLAG_NO_HOLE)
        h.trim(MiB, 3 * MiB)  # ignored: the nodes were not opened with discard=unmap
        h.flush()

    r.client("disk", writes)
    r.client("file", lambda h: h.pwrite(b"x", 0))  # read-only export
    r.query("query-block-exports")


def discard_unmap(r: Recorder) -> None:
    make_raw(r.dir / "disk.raw")
    r.qmp("blockdev-add", driver="raw", **{"node-name": "r0"}, discard="unmap",
          file={"driver": "file", "filename": r.path("disk.raw")})  # fmt: skip
    r.export("r0", "disk", writable=True)
    r.client("disk", lambda h: (h.trim(MiB, 3 * MiB), h.zero(65536, 0), h.flush()))


def raw_window(r: Recorder) -> None:
    make_raw(r.dir / "disk.raw")
    file = {"driver": "file", "filename": r.path("disk.raw")}
    r.qmp("blockdev-add", driver="raw", **{"node-name": "w"}, file=file, offset=MiB, size=2 * MiB)
    r.qmp("blockdev-add", driver="raw", **{"node-name": "bad1"}, file=file, offset=5 * MiB)
    r.qmp("blockdev-add", driver="raw", **{"node-name": "bad2"}, file=file, offset=MiB, size=4 * MiB)
    r.qmp("blockdev-add", driver="raw", **{"node-name": "bad3"}, file=file, size=-1)
    r.export("w", writable=True)
    r.client("w", lambda h: h.pwrite(b"\x66" * 4096, 2 * MiB - 4096))  # the window's last block
    r.client("w", lambda h: h.pwrite(b"\x77" * 4096, 2 * MiB))  # past the window: refused


def null_co(r: Recorder) -> None:
    r.qmp("blockdev-add", driver="null-co", **{"node-name": "z"}, size=2 * MiB, **{"read-zeroes": True})
    r.qmp("blockdev-add", driver="null-co", **{"node-name": "u"}, size=MiB)  # reads are undefined
    r.qmp("blockdev-add", driver="null-co", **{"node-name": "odd"}, size=1000)  # qemu exports 1024 bytes: no export
    r.qmp("blockdev-add", driver="null-co", **{"node-name": "big"}, size=1 << 40, **{"read-zeroes": True})
    r.export("z", writable=True, **{"allocation-depth": True})
    r.export("u", data_defined=False, **{"allocation-depth": True})
    r.client("z", lambda h: (h.pwrite(b"\x01" * 4096, 0), h.zero(4096, 4096)))  # forgotten
    r.query("query-block-exports")


def implicit_nodes(r: Recorder) -> None:
    make_raw(r.dir / "a.raw")
    make_raw(r.dir / "b.raw", MiB, {0: b"\x0b" * 4096})
    r.qmp("blockdev-add", driver="raw", **{"node-name": "a"}, file={"driver": "file", "filename": r.path("a.raw")})
    r.qmp("blockdev-add", driver="raw", **{"node-name": "b"}, **{"read-only": True},
          file={"driver": "file", "filename": r.path("b.raw")})  # fmt: skip
    implicit = next(n["node-name"] for n in r.daemon.ok("query-named-block-nodes") if n["node-name"].startswith("#"))
    reply = r.daemon.cmd("blockdev-del", **{"node-name": implicit})  # not the monitor's to delete
    r.log.append(("blockdev-del", "<implicit>", "ok" if "return" in reply else "error"))
    r.export("b")
    r.export("a", writable=True)
    r.qmp("blockdev-del", **{"node-name": "a"})  # exported
    r.qmp("block-export-del", id="a")
    r.qmp("blockdev-del", **{"node-name": "a"})  # its implicit file goes with it
    r.qmp("blockdev-add", driver="raw", **{"node-name": "a"}, file={"driver": "file", "filename": r.path("a.raw")})
    r.qmp("block-export-add", type="nbd", id="w", **{"node-name": "b"}, name="bw", writable=True)  # read-only


def bad_blockdev_add(r: Recorder) -> None:
    make_raw(r.dir / "disk.raw", MiB)
    f = r.path("disk.raw")
    r.qmp("blockdev-add", driver="file", **{"node-name": "f0"}, filename=f)
    for args in (
        {"driver": "file", "node-name": "f0", "filename": f},  # duplicate node-name
        {"driver": "file", "filename": f},  # no node-name
        {"driver": "file", "node-name": "1abc", "filename": f},
        {"driver": "file", "node-name": "a" * 40, "filename": f},
        {"driver": "file", "node-name": "sp ace", "filename": f},
        {"driver": "file", "node-name": "x", "filename": r.path("missing.raw")},
        {"driver": "file", "node-name": "x", "filename": str(r.dir)},
        {"driver": "file", "node-name": "x"},
        {"driver": "file", "node-name": "x", "filename": f, "bogus": 1},
        {"driver": "file", "node-name": "x", "filename": f, "read-only": "yes"},
        {"driver": "file", "node-name": "x", "filename": f, "locking": "sometimes"},
        {"node-name": "x", "filename": f},
        {"driver": "vmdk-of-the-future", "node-name": "x"},
        {"driver": "raw", "node-name": "x"},
        {"driver": "raw", "node-name": "x", "file": 42},
        {"driver": "raw", "node-name": "x", "file": {"driver": "file"}},
        {"driver": "raw", "node-name": "x", "file": {"driver": "file", "node-name": "f0", "filename": f}},
        {"driver": "null-co", "node-name": "x", "size": "1M"},
    ):
        r.qmp("blockdev-add", **args)
    r.qmp("blockdev-add", driver="raw", **{"node-name": "x"}, file="f0")  # the name is still free
    r.export("x")


def exports_lifecycle(r: Recorder) -> None:
    make_raw(r.dir / "disk.raw", MiB, {0: b"\x5e" * 4096})
    r.qmp("blockdev-add", driver="file", **{"node-name": "f0"}, filename=r.path("disk.raw"), **{"read-only": True})
    r.qmp("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=MiB, **{"read-zeroes": True})
    r.export("f0", "one")
    r.qmp("block-export-add", type="nbd", id="one", **{"node-name": "n0"}, name="other")  # duplicate id
    r.qmp("block-export-add", type="nbd", id="two", **{"node-name": "n0"}, name="one")  # duplicate name
    r.qmp("block-export-add", type="nbd", id="ro", **{"node-name": "f0"}, name="ro", writable=True)
    r.qmp("block-export-add", type="nbd", id="x", **{"node-name": "nope"})
    r.qmp("block-export-add", type="fuse", id="x", **{"node-name": "n0"}, mountpoint="/nonexistent")
    r.qmp("block-export-del", id="nope")
    r.export("n0", "zero", writable=True)
    r.export("f0", "again")  # a node may have several exports
    r.query("query-block-exports")
    r.qmp("block-export-del", id="again")
    r.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": r.path("second.sock")}})  # already running
    r.qmp("nbd-server-stop")  # takes the exports with it
    r.query("query-block-exports")
    r.qmp("nbd-server-stop")
    r.exports.clear()
    r.nbd_path = r.path("second.sock")
    r.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": r.nbd_path}})
    r.export("f0", "one")


def qcow2_chain(r: Recorder) -> None:
    make_raw(r.dir / "base.raw", 2 * MiB, {0: b"\xba" * MiB})
    r.qmp("blockdev-create", **{"job-id": "c0"},
          options={"driver": "file", "filename": r.path("top.qcow2"), "size": 0})  # fmt: skip
    r.wait_job("c0")
    r.qmp("blockdev-add", driver="file", **{"node-name": "tf"}, filename=r.path("top.qcow2"))
    r.qmp("blockdev-create", **{"job-id": "c1"},
          options={"driver": "qcow2", "file": "tf", "size": 2 * MiB, "backing-file": r.path("base.raw"),
                   "backing-fmt": "raw"})  # fmt: skip
    r.wait_job("c1")
    r.qmp("blockdev-add", driver="raw", **{"node-name": "base"}, **{"read-only": True},
          file={"driver": "file", "filename": r.path("base.raw")})  # fmt: skip
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "top"}, file="tf", backing="base")
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "again"}, file="tf", backing=None)  # file is taken
    r.export("top", writable=True, **{"allocation-depth": True})
    r.export("base", **{"allocation-depth": True})
    r.client("top", lambda h: (h.pwrite(b"\x70" * 65536, 512 * 1024), h.zero(65536, 0), h.flush()))
    r.qmp("blockdev-del", **{"node-name": "base"})  # the backing of top


SCENARIOS = [raw_file_writes, discard_unmap, raw_window, null_co, implicit_nodes, bad_blockdev_add, exports_lifecycle,
             qcow2_chain]  # fmt: skip


def assert_same_view(scenario: Callable[[Recorder], None], start_daemon, workdir: Path) -> None:
    """Run ``scenario`` against each daemon, each in its own directory, and compare the records."""
    records = {}
    try:
        for kind in KINDS:
            directory = workdir / kind
            directory.mkdir()
            recorder = Recorder(start_daemon(kind), directory)
            scenario(recorder)
            records[kind] = recorder.observe()  # stops the daemon
    finally:
        for kind in KINDS:  # the workdir fixture removes files only
            shutil.rmtree(workdir / kind, ignore_errors=True)
    pynbd, qsd = records["pynbd"], records["qsd"]
    for key in qsd:
        assert pynbd.get(key) == qsd[key], f"{scenario.__name__}: {key} differs (left pynbd, right qsd)"
    assert pynbd.keys() == qsd.keys()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_same_script_same_view(scenario, start_daemon, workdir):
    assert_same_view(scenario, start_daemon, workdir)


# -- command-line startup ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["keyval", "json"])
def test_startup_options_in_both_forms(kind, form, start_daemon, workdir):
    make_raw(workdir / "disk.raw")
    nbd_path = str(workdir / f"{kind}-{form}.sock")
    blockdevs = [
        {"driver": "file", "node-name": "f0", "filename": str(workdir / "disk.raw"), "read-only": True},
        {"driver": "raw", "node-name": "r0", "file": "f0", "read-only": True},
        {"driver": "null-co", "node-name": "n0", "size": MiB, "read-zeroes": True},
    ]
    server = {"addr": {"type": "unix", "path": nbd_path}, "max-connections": 4}
    export = {"type": "nbd", "id": "e0", "node-name": "r0", "name": "disk", "allocation-depth": True}
    if form == "json":
        options = [o for b in blockdevs for o in ("--blockdev", json.dumps(b))]
        options += ["--nbd-server", json.dumps(server), "--export", json.dumps(export)]
    else:
        options = ["--blockdev", f"driver=file,node-name=f0,filename={workdir / 'disk.raw'},read-only=on",
                   "--blockdev", "driver=raw,node-name=r0,file=f0,read-only=on",
                   "--blockdev", "driver=null-co,node-name=n0,size=1048576,read-zeroes=on",
                   "--nbd-server", f"addr.type=unix,addr.path={nbd_path},max-connections=4",
                   "--export", "type=nbd,id=e0,node-name=r0,name=disk,allocation-depth=on"]  # fmt: skip
    daemon = start_daemon(kind, *options, nbd=False)
    assert daemon.ok("query-block-exports") == [{"type": "nbd", "id": "e0", "node-name": "r0", "shutting-down": False}]
    assert {n["node-name"]: n["ro"] for n in daemon.ok("query-named-block-nodes")} == {
        "f0": True,
        "r0": True,
        "n0": False,
    }
    uri = f"nbd+unix:///disk?socket={nbd_path}"
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    [export_info] = info["exports"]
    assert export_info["export-size"] == 4 * MiB and export_info["is_read_only"]
    assert set(export_info["contexts"]) >= {"base:allocation", "qemu:allocation-depth"}


BAD_STARTUP = [
    ["--blockdev", "driver=file,node-name=f0,filename=/nonexistent/disk.raw"],
    ["--blockdev", "driver=file,node-name=f0"],
    ["--blockdev", "driver=no-such-driver,node-name=x"],
    ["--blockdev", '{"driver": "null-co", "node-name": "x", "size": "big"}'],
    ["--blockdev", '{"driver": "null-co", "node-name": '],
    ["--blockdev", "driver=null-co,node-name=x,size=1M"],  # no size suffixes in blockdev options
    ["--blockdev", "driver=null-co,node-name=x", "--blockdev", "driver=null-co,node-name=x"],
    ["--blockdev", "driver=null-co,node-name=n,size=4096", "--blockdev", "driver=raw,node-name=r,file=n,offset=8192"],
    ["--blockdev", "driver=raw,node-name=r,file=nope"],
    ["--nbd-server", "addr.type=unix"],
    ["--nbd-server", "addr.type=unix,addr.path=/nonexistent/dir/s.sock"],
    ["--export", "type=nbd,id=e0,node-name=nope"],
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", BAD_STARTUP, ids=lambda o: " ".join(o)[:60])
def test_bad_startup_options_exit_non_zero_with_a_message(kind, options, workdir):
    from tests.peers import PYNBD

    argv = [PYNBD, "daemon"] if kind == "pynbd" else ["qemu-storage-daemon"]
    if options[0] == "--export":
        options = ["--nbd-server", f"addr.type=unix,addr.path={workdir / 'nbd.sock'}", *options]
    result = run([*argv, *options], check=False, timeout=60)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert message and "Traceback" not in message, message
    if kind == "pynbd":
        assert len(message.splitlines()) == 1 and message.startswith("pynbd daemon: --"), message
