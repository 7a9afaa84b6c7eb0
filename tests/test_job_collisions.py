"""Two jobs (or a job and a blockdev-reopen) over one backing chain, against pynbd and
qemu-storage-daemon 7.2.

A job that will change a link on completion (commit and stream re-point the overlay's backing
link) owns that change: a second job that would change that link, or needs it unchanged, is
refused at start with a message naming the first job, and the refused command leaves nothing
behind. Holders that only need a link unchanged share it. qemu refuses most of the same pairs
with its op blockers or its one-holder freeze; where pynbd differs it says so in PAIRS, and no
pair pynbd accepts may fail later: every accepted job here runs to completion without error, and
what clients read is what they read before.

The graph: base <- low <- mid <- top, and, for the pairs about it, top2 <- mid too (two overlays
of one layer).
"""

from __future__ import annotations

import nbd
import pytest

from pynbd.graph.core import BlockGraph, FrozenLinkError, GraphError
from pynbd.graph.perms import Role
from pynbd.nodes.memory import MemoryNode
from pynbd.nodes.raw import RawNode
from tests.daemons import KINDS
from tests.peers import run

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
LAYERS = ("base", "low", "mid", "top", "top2")

pytestmark = pytest.mark.timeout(180)

#: name -> (command, arguments). "active" commits need a block-job-complete to finish.
JOBS = {
    "commit-mid-base": ("block-commit", {"device": "top", "top-node": "mid", "base-node": "base"}),
    "commit-mid-low": ("block-commit", {"device": "top", "top-node": "mid", "base-node": "low"}),
    "commit-low-base": ("block-commit", {"device": "top", "top-node": "low", "base-node": "base"}),
    "commit-mid-low-via-top2": ("block-commit", {"device": "top2", "top-node": "mid", "base-node": "low"}),
    "active-commit-top-mid": ("block-commit", {"device": "top", "base-node": "mid"}),
    "active-commit-top-base": ("block-commit", {"device": "top", "base-node": "base"}),
    "stream-top": ("block-stream", {"device": "top"}),
    "stream-top-base": ("block-stream", {"device": "top", "base-node": "base"}),
    "stream-top-low": ("block-stream", {"device": "top", "base-node": "low"}),
    "stream-top2-base": ("block-stream", {"device": "top2", "base-node": "base"}),
    "stream-mid": ("block-stream", {"device": "mid"}),
    "stream-low": ("block-stream", {"device": "low"}),
    "backup-mid": ("blockdev-backup", {"device": "mid", "target": "tgt", "sync": "full"}),
    "mirror-mid": ("blockdev-mirror", {"device": "mid", "target": "tgt", "sync": "full"}),
}
REOPENS = {
    "reopen-top-backing": {"driver": "qcow2", "node-name": "top", "file": "top-f", "backing": "other"},
    "reopen-mid-backing": {
        "driver": "qcow2",
        "node-name": "mid",
        "file": "mid-f",
        "backing": "other",
        "read-only": True,
    },
    "reopen-low-backing": {
        "driver": "qcow2",
        "node-name": "low",
        "file": "low-f",
        "backing": "other",
        "read-only": True,
    },
}

ACCEPTED = None
BUSY = "Node '{}' is busy: block device is in use by block job: {}"
ROOT = "Need a root block node"  # qemu: a job's device may have no node above it (a filter of another job)

#: (first, second, what pynbd answers the second, what qemu-storage-daemon 7.2 answers): a refusal
#: message (exact, or the start of it when it ends with "…"), or ACCEPTED.
PAIRS = [
    # the issue's pair, both ways: the overlay's backing link is the commit's, then the stream's to change
    (
        "commit-mid-base",
        "stream-top",
        "Cannot freeze 'backing' link from 'top' to 'mid' for job 'j2': it is being changed by job 'j1'",
        BUSY.format("top", "commit"),
    ),
    (
        "stream-top",
        "commit-mid-base",
        "Cannot freeze 'backing' link from 'top' to 'mid' for job 'j2': it is being changed by job 'j1'",
        ROOT,
    ),
    # two streams over overlapping chains
    (
        "stream-top",
        "stream-mid",
        "Cannot change 'backing' link from 'mid' to 'low' for job 'j2': it is frozen by job 'j1'",
        BUSY.format("mid", "stream"),
    ),
    (
        "stream-mid",
        "stream-top",
        "Cannot freeze link node 'top' (its 'backing' child '#block001'): node '#block001' is the filter of job 'j1'",
        "Node '#block…",
    ),
    # stricter than qemu: pynbd's stream also freezes the link into its base (qemu's leaves it free,
    # and streams into whatever base it finds at the end); here the second stream's filter would
    # take that link's place
    (
        "stream-top-low",
        "stream-low",
        "Cannot change frozen 'backing' link from 'mid' to 'low': it is frozen by job 'j1'",
        ACCEPTED,
    ),
    # two commits over overlapping chains
    (
        "commit-mid-low",
        "commit-low-base",
        "Cannot change 'backing' link from 'mid' to 'low' for job 'j2': it is frozen by job 'j1'",
        ROOT,
    ),
    (
        "commit-low-base",
        "commit-mid-low",
        "Cannot freeze 'backing' link from 'mid' to 'low' for job 'j2': it is being changed by job 'j1'",
        ROOT,
    ),
    # two overlays committing their shared layer into one base: both would write it
    (
        "commit-mid-low",
        "commit-mid-low-via-top2",
        "Node 'low' is busy: job 'j1' commits into it",
        BUSY.format("mid", "commit"),
    ),
    # commit and stream across each other
    (
        "stream-top-low",
        "commit-low-base",
        "Cannot change 'backing' link from 'mid' to 'low' for job 'j2': it is frozen by job 'j1'",
        ROOT,
    ),
    (
        "commit-low-base",
        "stream-top-low",
        "Cannot freeze 'backing' link from 'mid' to 'low' for job 'j2': it is being changed by job 'j1'",
        BUSY.format("top", "commit"),
    ),
    # active commit (only reads the chain) and jobs that change it
    (
        "active-commit-top-mid",
        "stream-top",
        "Cannot change 'backing' link from 'top' to 'mid' for job 'j2': it is frozen by job 'j1'",
        BUSY.format("top", "commit"),
    ),
    (
        "stream-top",
        "active-commit-top-mid",
        "Cannot freeze 'backing' link from 'top' to 'mid' for job 'j2': it is being changed by job 'j1'",
        ROOT,
    ),
    (
        "commit-mid-base",
        "active-commit-top-base",
        "Node 'base' is busy: job 'j1' commits into it",  # (and the overlay's link is the commit's to change)
        ROOT,
    ),
    (
        "active-commit-top-base",
        "stream-mid",
        "Cannot change 'backing' link from 'mid' to 'low' for job 'j2': it is frozen by job 'j1'",
        BUSY.format("mid", "commit"),
    ),
    # a filter put on a node inside a frozen chain would re-point a frozen link
    (
        "stream-top-base",
        "backup-mid",
        "Cannot change frozen 'backing' link from 'top' to 'mid': it is frozen by job 'j1'",
        BUSY.format("mid", "stream"),
    ),
    (
        "stream-top-base",
        "mirror-mid",
        "Cannot change frozen 'backing' link from 'top' to 'mid': it is frozen by job 'j1'",
        ROOT,
    ),
    # blockdev-reopen of a backing link a job froze
    (
        "commit-mid-base",
        "reopen-top-backing",
        "Cannot change frozen 'backing' link from 'top' to 'mid': it is frozen by job 'j1'",
        "Cannot replace implicit backing child of top",
    ),
    (
        "commit-mid-base",
        "reopen-mid-backing",
        "Cannot change frozen 'backing' link from 'mid' to 'low': it is frozen by job 'j1'",
        "Cannot change frozen 'backing' link from 'mid' to 'low'",
    ),
    (
        "stream-top",
        "reopen-top-backing",
        "Cannot change frozen 'backing' link from 'top' to 'mid': it is frozen by job 'j1'",
        "Cannot change frozen 'backing' link from 'top' to 'mid'",
    ),
    (
        "active-commit-top-mid",
        "reopen-top-backing",
        "Cannot change frozen 'backing' link from 'top' to 'mid': it is frozen by job 'j1'",
        "Cannot change frozen 'backing' link from 'top' to 'mid'",
    ),
    # stricter than qemu, for the same reason as stream-top-low + stream-low
    (
        "stream-top-low",
        "reopen-mid-backing",
        "Cannot change frozen 'backing' link from 'mid' to 'low': it is frozen by job 'j1'",
        ACCEPTED,
    ),
    # the base's own backing link is no part of the stream's chain: free in both
    ("stream-top-low", "reopen-low-backing", ACCEPTED, ACCEPTED),
    # holders that only need the links unchanged share them (looser than qemu, which op-blocks
    # the shared layer): two streams from two overlays of mid, and a commit of mid beside one
    ("stream-top-base", "stream-top2-base", ACCEPTED, BUSY.format("mid", "stream")),
    ("commit-mid-low", "stream-top2-base", ACCEPTED, BUSY.format("mid", "commit")),
]


def make_images(workdir, kind):
    """Each layer writes its own pattern over 1 MiB, each 512 KiB further on, so every layer
    shows somewhere; ``other`` is empty, ``tgt`` a backup/mirror target."""
    paths = {name: workdir / f"{kind}-{name}.qcow2" for name in (*LAYERS, "other", "tgt")}
    for name in ("base", "other", "tgt"):
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(paths[name]), str(SIZE)])
    for name, backing in (("low", "base"), ("mid", "low"), ("top", "mid"), ("top2", "mid")):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", paths[backing].name, "-F", "qcow2", str(paths[name])])
    for i, name in enumerate(LAYERS):
        run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x11 * (i + 1)} {i * 512}k 1M", str(paths[name])])
    return paths


def start(start_daemon, kind, paths, tops):
    """The graph opened as backing files are (read-only below the tops), the tops exported."""
    daemon = start_daemon(kind)
    for name, backing in (("base", None), ("other", None), ("low", "base"), ("mid", "low")):
        daemon.ok("blockdev-add", driver="file", **{"node-name": f"{name}-f"}, filename=str(paths[name]))
        daemon.ok(
            "blockdev-add", driver="qcow2", **{"node-name": name, "read-only": True}, file=f"{name}-f", backing=backing
        )
    for name in (*tops, "tgt"):
        daemon.ok("blockdev-add", driver="file", **{"node-name": f"{name}-f"}, filename=str(paths[name]))
        extra = {"backing": "mid"} if name != "tgt" else {}
        daemon.ok("blockdev-add", driver="qcow2", **{"node-name": name}, file=f"{name}-f", **extra)
    for name in tops:
        daemon.ok("block-export-add", type="nbd", id=name, **{"node-name": name}, name=name)
    return daemon


def reads(daemon, exports) -> dict[str, bytes]:
    out = {}
    for name in exports:
        h = nbd.NBD()
        h.connect_uri(daemon.uri(name))
        out[name] = h.pread(SIZE, 0)
        h.shutdown()
    return out


def issue(daemon, name: str, job_id: str) -> dict:
    if name in REOPENS:
        return daemon.cmd("blockdev-reopen", options=[REOPENS[name]])
    command, args = JOBS[name]
    return daemon.cmd(command, **{"job-id": job_id, "speed": 1, "auto-finalize": False}, **args)


def holds(daemon) -> dict[str, str]:
    """pynbd: who holds each backing link, seen by taking and dropping a hold of our own."""
    seen = {}
    for node in ("top", "mid", "low"):
        link = {"node-name": node, "child": "backing"}
        reply = daemon.cmd("x-pynbd-freeze-link", **link)
        if "error" in reply:
            seen[node] = reply["error"]["desc"].split(": ")[-1]  # "it is being changed by job 'j1'"
        else:
            seen[node] = f"held {reply['return']['freeze-count'] - 1} time(s)"
            daemon.ok("x-pynbd-unfreeze-link", **link)
    return seen


def graph_nodes(daemon) -> list[tuple[str, str]]:
    """The graph's nodes and root users (jobs, exports), by type and name. (Not its edges and
    permissions: the first job's work changes those while it runs, a commit's base reopened.)"""
    return sorted((node["type"], node["name"]) for node in daemon.ok("x-debug-query-block-graph")["nodes"])


def read_only_nodes(daemon) -> list[str]:
    return sorted(node["node-name"] for node in daemon.ok("query-named-block-nodes") if node["ro"])


def finish(daemon, started: dict[str, str]) -> None:
    """Run every started job to its end at full speed; none may fail."""
    for job_id in started:
        reply = daemon.cmd("block-job-set-speed", device=job_id, speed=0)
        # a job whose first chunk was all it had to copy is already waiting to be finalised
        assert "return" in reply or "cannot accept command verb 'set-speed'" in reply["error"]["desc"], reply
    for job_id, name in started.items():
        if name.startswith("active-commit"):
            daemon.wait_event("BLOCK_JOB_READY", job_id)
            daemon.ok("block-job-complete", device=job_id)
        daemon.wait_event("BLOCK_JOB_PENDING", job_id)
    for job_id in started:
        daemon.ok("job-finalize", id=job_id)
        completed = daemon.wait_event("BLOCK_JOB_COMPLETED", job_id)["data"]
        assert "error" not in completed, completed


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("first", "second", "pynbd_answer", "qsd_answer"), PAIRS, ids=[f"{a}+{b}" for a, b, *_ in PAIRS]
)
def test_a_second_job_over_the_same_chain(kind, first, second, pynbd_answer, qsd_answer, start_daemon, workdir):
    expected = pynbd_answer if kind == "pynbd" else qsd_answer
    paths = make_images(workdir, kind)
    # top2 only where a pair is about it: an active commit refuses (qemu), or changes what top2
    # reads (pynbd), when another overlay reads through the layers it commits into
    exports = ("top", "top2") if "top2" in first + second else ("top",)
    daemon = start(start_daemon, kind, paths, exports)
    before = reads(daemon, exports)
    reply = issue(daemon, first, "j1")  # slow and not finalised on its own: it holds its links
    assert "return" in reply, reply
    started = {"j1": first}
    nodes, read_only = graph_nodes(daemon), read_only_nodes(daemon)
    held = holds(daemon) if kind == "pynbd" else None
    reply = issue(daemon, second, "j2")
    if expected is ACCEPTED:
        assert "return" in reply, reply
        if second in JOBS:
            started["j2"] = second
        now = reads(daemon, exports)  # a reopen changes what the tops show; a job must not
    else:
        assert "error" in reply, f"{second} was accepted"
        desc = reply["error"]["desc"]
        if expected.endswith("…"):  # qemu's auto-generated node-names vary
            assert desc.startswith(expected[:-1]), desc
        else:
            assert desc == expected
        # the refused command left nothing behind: no job, no filter, no hold, no node reopened
        assert [job["id"] for job in daemon.ok("query-jobs")] == ["j1"]
        assert graph_nodes(daemon) == nodes
        assert read_only_nodes(daemon) == read_only
        if held is not None:
            assert holds(daemon) == held
        now = before
    assert reads(daemon, exports) == now
    finish(daemon, started)  # the first job, and the second if accepted, complete without error
    assert reads(daemon, exports) == now
    assert daemon.ok("query-jobs") == []
    assert daemon.stop() == 0
    for path in paths.values():
        run(["qemu-img", "check", str(path)])


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_into_a_read_only_layer_reopens_it_for_the_job(kind, start_daemon, workdir):
    """Backing files are opened read-only; streaming into one (here mid, below top) reopens it
    read-write for the job and read-only again at its end, as qemu's stream_start/stream_clean."""
    paths = make_images(workdir, kind)
    daemon = start(start_daemon, kind, paths, ("top",))
    before = reads(daemon, ("top",))
    daemon.ok("block-stream", **{"job-id": "s", "device": "mid", "auto-finalize": False})
    assert "mid" not in read_only_nodes(daemon)
    daemon.wait_event("BLOCK_JOB_PENDING", "s")
    daemon.ok("job-finalize", id="s")
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "s")["data"]
    assert "mid" in read_only_nodes(daemon)
    assert reads(daemon, ("top",)) == before
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(paths["mid"])])
    info = run(["qemu-img", "info", "--output=json", str(paths["mid"])]).stdout
    assert "backing-filename" not in info  # mid now holds low's and base's data itself


def two_links():
    """top -> mid -> base, as filter links (the graph core does not care which role)."""
    graph = BlockGraph()
    base = graph.add_node(MemoryNode(4096, node_name="base"))
    mid = graph.add_node(RawNode(node_name="mid"))
    top = graph.add_node(RawNode(node_name="top"))
    lower = graph.attach_child(mid, "file", base, Role.filtered())
    upper = graph.attach_child(top, "file", mid, Role.filtered())
    return graph, top, upper, lower


def test_a_link_being_changed_has_one_holder_and_unchanged_ones_are_shared():
    graph, top, upper, lower = two_links()
    a = graph.freeze_links([upper, lower], "job 'a'", changes=[upper])
    with pytest.raises(FrozenLinkError, match="^Cannot freeze 'file' link from 'top' to 'mid' for job 'b': it is"):
        graph.freeze_chain(top, None, "job 'b'")  # would need it unchanged
    with pytest.raises(FrozenLinkError, match="being changed by job 'a'"):
        graph.freeze_links([upper], "job 'b'", changes=[upper])  # would change it too
    assert (upper.holders, lower.holders) == (["job 'a'"], ["job 'a'"])  # refusals froze nothing
    b = graph.freeze_links([lower], "job 'b'")  # the link below is only needed unchanged: shared
    assert lower.holders == ["job 'a'", "job 'b'"] and lower.changer is None
    with pytest.raises(FrozenLinkError, match="^Cannot change 'file' link from 'mid' to 'base' for job 'c': it"):
        graph.freeze_links([lower], "job 'c'", changes=[lower])
    with pytest.raises(FrozenLinkError, match="frozen by job 'a' and job 'b'$"):
        graph.detach(lower)
    with pytest.raises(GraphError, match="not frozen by job 'c'"):
        lower.unfreeze("job 'c'")
    graph.unfreeze_links(a, "job 'a'")
    assert upper.changer is None and not upper.frozen and lower.holders == ["job 'b'"]
    graph.freeze_links([upper], "job 'c'", changes=[upper])  # free to be owned again
    graph.unfreeze_links(b, "job 'b'")
    graph.unfreeze_links([upper], "job 'c'")
    graph.detach(upper)


def test_check_freeze_changes_nothing_and_freezing_is_all_or_nothing():
    graph, top, upper, lower = two_links()
    graph.freeze_links([lower], "job 'a'")
    graph.check_freeze([upper], "job 'b'", changes=[upper])  # fine: nobody holds it
    with pytest.raises(FrozenLinkError):
        graph.check_freeze([upper, lower], "job 'b'", changes=[upper, lower])
    with pytest.raises(FrozenLinkError):
        graph.freeze_links([upper, lower], "job 'b'", changes=[upper, lower])
    assert upper.holders == [] and upper.changer is None and lower.holders == ["job 'a'"]
