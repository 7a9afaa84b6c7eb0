"""Frozen child links over QMP: holders that need a link unchanged (jobs, or x-pynbd-freeze-link)
share it, and it can change only once every one of them has let go; a link a job will change on
completion has that job as its only holder.

qemu has a flag instead, and no command to set it: these tests are pynbd's own. A hold taken over
QMP belongs to the monitor that took it: no other monitor, and no monitor at all for a job's hold,
can drop it, and it goes when its monitor disconnects.
"""

from __future__ import annotations

import pytest

from tests.peers import run

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def chain(start_daemon, workdir):
    """top (qcow2) over base (qcow2), with a third image ``other`` to re-point top's backing at."""
    for name in ("base", "other", "top"):
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(workdir / f"{name}.qcow2"), str(MiB)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 1M", str(workdir / "base.qcow2")])  # for stream to copy
    daemon = start_daemon("pynbd", monitors=2)
    for name in ("base", "other"):
        daemon.ok(
            "blockdev-add", driver="file", **{"node-name": f"{name}-file"}, filename=str(workdir / f"{name}.qcow2")
        )
        daemon.ok("blockdev-add", driver="qcow2", **{"node-name": name}, file=f"{name}-file", **{"read-only": True})
    daemon.ok("blockdev-add", driver="file", **{"node-name": "top-file"}, filename=str(workdir / "top.qcow2"))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "top"}, file="top-file", backing="base")
    return daemon


def repoint(daemon, backing: str) -> dict:
    return daemon.cmd(
        "blockdev-reopen", options=[{"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": backing}]
    )


def backing_of_top(daemon) -> str:
    [top] = [n for n in daemon.ok("query-named-block-nodes") if n["node-name"] == "top"]
    return top["backing_file"]


def test_a_link_frozen_twice_changes_only_after_two_unfreezes(chain, workdir):
    link = {"node-name": "top", "child": "backing"}
    assert chain.ok("x-pynbd-freeze-link", **link) == {"freeze-count": 1}
    assert chain.ok("x-pynbd-freeze-link", **link) == {"freeze-count": 2}
    before = chain.ok("x-debug-query-block-graph")
    assert "frozen" in repoint(chain, "other")["error"]["desc"]
    assert "frozen" in chain.fails("blockdev-del", **{"node-name": "top"})
    assert chain.ok("x-pynbd-unfreeze-link", **link) == {"freeze-count": 1}
    assert "frozen" in repoint(chain, "other")["error"]["desc"]
    assert chain.ok("x-debug-query-block-graph") == before
    assert chain.ok("x-pynbd-unfreeze-link", **link) == {"freeze-count": 0}
    assert "return" in repoint(chain, "other")
    assert backing_of_top(chain) == str(workdir / "other.qcow2")
    chain.fails("x-pynbd-unfreeze-link", **link)  # not frozen any more


def test_a_link_a_job_will_change_cannot_be_held_by_anyone_else(chain, workdir):
    """block-stream re-points (here: drops) top's backing link when it completes: while it runs
    nobody else may hold that link, and a hold taken first refuses the stream, which then leaves
    nothing behind (no job, no filter, no hold of its own)."""
    link = {"node-name": "top", "child": "backing"}
    chain.ok("block-stream", **{"job-id": "s", "device": "top", "speed": 1})  # runs (slowly)
    refused = chain.fails("x-pynbd-freeze-link", **link)
    assert refused.startswith("Cannot freeze 'backing' link from 'top' to 'base' for QMP client ")
    assert refused.endswith(": it is being changed by job 's'")
    chain.ok("block-job-cancel", device="s", force=True)
    chain.wait_event("BLOCK_JOB_CANCELLED", "s")
    graph = chain.ok("x-debug-query-block-graph")
    assert chain.ok("x-pynbd-freeze-link", **link) == {"freeze-count": 1}  # free again
    refused = chain.fails("block-stream", **{"job-id": "s2", "device": "top"})
    assert refused.startswith("Cannot change 'backing' link from 'top' to 'base' for job 's2': it is frozen by QMP")
    assert chain.ok("query-jobs") == []
    assert chain.ok("x-debug-query-block-graph") == graph
    assert chain.ok("x-pynbd-unfreeze-link", **link) == {"freeze-count": 0}
    assert "return" in repoint(chain, "other")


def test_a_job_and_another_holder_that_need_the_link_unchanged_share_it(chain, workdir):
    """An active commit only reads the chain (its pivot moves the users, not top's backing link):
    a client may hold the same link, the commit still completes, and the link changes only once
    the client lets go."""
    chain.ok("block-commit", **{"job-id": "c", "device": "top"})
    chain.wait_event("BLOCK_JOB_READY", "c")
    assert chain.ok("x-pynbd-freeze-link", **{"node-name": "top", "child": "backing"}) == {"freeze-count": 2}
    assert "frozen by job 'c' and QMP client " in repoint(chain, "other")["error"]["desc"]
    chain.ok("block-job-complete", device="c")
    assert "error" not in chain.wait_event("BLOCK_JOB_COMPLETED", "c")["data"]
    assert "frozen by QMP client " in repoint(chain, "other")["error"]["desc"]  # still held by the client
    assert chain.ok("x-pynbd-unfreeze-link", **{"node-name": "top", "child": "backing"}) == {"freeze-count": 0}
    assert "return" in repoint(chain, "other")
    assert chain.stop() == 0
    run(["qemu-img", "check", str(workdir / "base.qcow2")])


def test_freezing_needs_an_existing_link(chain):
    chain.fails("x-pynbd-freeze-link", **{"node-name": "nope", "child": "backing"})
    assert "no child" in chain.fails("x-pynbd-freeze-link", **{"node-name": "base-file", "child": "backing"})
    chain.fails("x-pynbd-freeze-link", **{"node-name": "top"})  # child missing


LINK = {"node-name": "top", "child": "backing"}


def freeze_count(monitor) -> int:
    """The link's freeze count as ``monitor`` sees it (a freeze and an unfreeze of its own)."""
    count = monitor.cmd("x-pynbd-freeze-link", **LINK)["return"]["freeze-count"]
    assert monitor.cmd("x-pynbd-unfreeze-link", **LINK)["return"]["freeze-count"] == count - 1
    return count - 1


def test_a_running_jobs_freeze_cannot_be_dropped_over_qmp(chain, workdir):
    """The stream job's hold on top's backing link is not any monitor's: unfreezing is refused, the
    job finishes normally, and its clean-up leaves no filter and no freeze behind."""
    nodes_before = sorted(n["node-name"] for n in chain.ok("query-named-block-nodes"))
    # held until finalised: the chain stays frozen however fast the copy goes
    chain.ok("block-stream", **{"job-id": "s", "device": "top", "auto-finalize": False})
    error = chain.fails("x-pynbd-unfreeze-link", **LINK)
    assert "none of them by this monitor" in error and "frozen 1 time" in error
    assert "frozen" in repoint(chain, "other")["error"]["desc"]
    chain.wait_event("BLOCK_JOB_PENDING", "s")
    assert "none of them by this monitor" in chain.fails("x-pynbd-unfreeze-link", **LINK)
    chain.ok("job-finalize", id="s")
    completed = chain.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in completed["data"], completed
    assert sorted(n["node-name"] for n in chain.ok("query-named-block-nodes")) == nodes_before
    assert "backing_file" not in [n for n in chain.ok("query-named-block-nodes") if n["node-name"] == "top"][0]
    graph = chain.ok("x-debug-query-block-graph")
    assert [n["name"] for n in graph["nodes"] if n["name"].startswith("#")] == []  # the job's filter went
    assert chain.fails("x-pynbd-unfreeze-link", **{"node-name": "base", "child": "file"}).endswith("is not frozen")
    assert chain.stop() == 0
    top = str(workdir / "top.qcow2")
    run(["qemu-img", "check", top])
    assert "backing file" not in run(["qemu-img", "info", top]).stdout
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x42 0 1M", top])  # base's data, streamed up


def test_a_hold_belongs_to_its_monitor_and_goes_with_it(chain, workdir):
    first = chain.qmp  # monitor A: the daemon's first socket
    second = chain.monitor()  # monitor B: another socket
    try:
        assert chain.ok("x-pynbd-freeze-link", **LINK) == {"freeze-count": 1}
        assert chain.ok("x-pynbd-freeze-link", **LINK) == {"freeze-count": 2}
        refused = second.cmd("x-pynbd-unfreeze-link", **LINK)["error"]["desc"]
        assert "frozen 2 time(s), none of them by this monitor" in refused
        assert second.cmd("x-pynbd-freeze-link", **LINK)["return"] == {"freeze-count": 3}
        assert chain.ok("x-pynbd-unfreeze-link", **LINK) == {"freeze-count": 2}  # A drops one of its own
        assert "frozen" in repoint(chain, "other")["error"]["desc"]
        first.close()  # A goes: its remaining hold goes with it, B's stays
        for _ in range(1000):  # each round trip lets the daemon see A's end of file
            if freeze_count(second) == 1:
                break
        assert freeze_count(second) == 1
        assert (
            "frozen"
            in second.cmd(
                "blockdev-reopen",
                options=[{"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "other"}],
            )["error"]["desc"]
        )
        assert second.cmd("x-pynbd-unfreeze-link", **LINK)["return"] == {"freeze-count": 0}
        reopened = second.cmd(
            "blockdev-reopen", options=[{"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "other"}]
        )
        assert "return" in reopened, reopened
    finally:
        second.close()
