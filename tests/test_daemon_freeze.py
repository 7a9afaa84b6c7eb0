"""Frozen child links over QMP: a counter, so several holders (jobs, or x-pynbd-freeze-link) can
freeze the same link, and it can change only once every one of them has let go.

qemu has a flag instead, and no command to set it: these tests are pynbd's own.
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
    daemon = start_daemon("pynbd")
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


def test_a_job_and_another_holder_freeze_the_same_link(chain, workdir):
    chain.ok("block-stream", **{"job-id": "s", "device": "top", "speed": 1})  # runs (slowly) with the chain frozen
    assert chain.ok("x-pynbd-freeze-link", **{"node-name": "top", "child": "backing"}) == {"freeze-count": 2}
    assert "frozen" in repoint(chain, "other")["error"]["desc"]
    chain.ok("block-job-cancel", device="s", force=True)
    chain.wait_event("BLOCK_JOB_CANCELLED", "s")
    assert "frozen" in repoint(chain, "other")["error"]["desc"]  # still held by the other holder
    chain.ok("x-pynbd-unfreeze-link", **{"node-name": "top", "child": "backing"})
    assert "return" in repoint(chain, "other")


def test_freezing_needs_an_existing_link(chain):
    chain.fails("x-pynbd-freeze-link", **{"node-name": "nope", "child": "backing"})
    assert "no child" in chain.fails("x-pynbd-freeze-link", **{"node-name": "base-file", "child": "backing"})
    chain.fails("x-pynbd-freeze-link", **{"node-name": "top"})  # child missing
