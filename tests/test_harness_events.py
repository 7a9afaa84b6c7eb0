"""The test harness's QMP event helpers (tests/daemons.py) against real daemons.

``wait_event`` must not lose the events it passes over: when one job's event arrives before the
one a test waits for, a later ``wait_event`` for it has to find it (test_slow_target waits for a
backup's COMPLETED while a commit's READY may already have come, and used to hang then).
"""

import pytest

from tests.daemons import KINDS

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def statuses(events, job):
    return [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]


@pytest.mark.parametrize("kind", KINDS)
def test_an_event_passed_over_is_found_by_a_later_wait(kind, start_daemon, workdir):
    options = []
    for name in ("d1", "t1", "d2", "t2"):
        path = workdir / f"{name}.raw"
        path.write_bytes((name.encode() * (MiB // 2))[:MiB] if name[0] == "d" else bytes(MiB))
        options += ["--blockdev", f"driver=file,node-name={name},filename={path}"]
    daemon = start_daemon(kind, *options)
    manual = {"auto-finalize": False, "auto-dismiss": False}
    daemon.ok("blockdev-backup", device="d1", target="t1", sync="full", **{"job-id": "j1", **manual})
    first = daemon.events_until("BLOCK_JOB_PENDING", "j1")
    assert statuses(first, "j1")[:2] == ["created", "running"] and statuses(first, "j1")[-1] == "pending"
    daemon.ok("job-finalize", id="j1")
    # COMPLETED comes before the status change to concluded: this wait passes over it
    assert daemon.wait_event("JOB_STATUS_CHANGE", "j1")["data"]["status"] == "concluded"
    daemon.ok("job-dismiss", id="j1")
    daemon.ok("blockdev-backup", device="d2", target="t2", sync="full", **{"job-id": "j2"})

    # j1's COMPLETED came first; waiting for j2's passes over it, and over j2's own status changes
    assert daemon.wait_event("BLOCK_JOB_COMPLETED", "j2")["data"]["device"] == "j2"
    assert [e["event"] for e in daemon.backlog if e["data"].get("device") == "j1"] == ["BLOCK_JOB_COMPLETED"]
    completed = daemon.wait_event("BLOCK_JOB_COMPLETED", "j1", timeout=5)
    assert completed["data"]["device"] == "j1" and "error" not in completed["data"]

    # what is left keeps its order: each job's remaining status changes, one wait at a time
    assert daemon.wait_event("JOB_STATUS_CHANGE", "j1", timeout=5)["data"]["status"] == "null"
    j2 = []
    while not j2 or j2[-1] != "null":
        j2.append(daemon.wait_event("JOB_STATUS_CHANGE", "j2", timeout=5)["data"]["status"])
    assert j2[:2] == ["created", "running"] and j2[-3:] == ["pending", "concluded", "null"]
    assert not any(e["data"].get("device", e["data"].get("id")) == "j1" for e in daemon.backlog)

    # events_until returns, and consumes, everything up to its match: the backlog first
    daemon.ok("blockdev-backup", device="d1", target="t1", sync="full", **{"job-id": "j3"})
    daemon.wait_event("BLOCK_JOB_COMPLETED", "j3")
    left_over = list(daemon.backlog)
    until = daemon.events_until("JOB_STATUS_CHANGE", "j3")
    assert until == left_over[: len(until)] and statuses(until, "j3") == ["created"]
    assert daemon.backlog == left_over[len(until) :]
    assert statuses(daemon.events_until("JOB_STATUS_CHANGE", "j3"), "j3") == ["running"]
    assert (workdir / "t2.raw").read_bytes() == (workdir / "d2.raw").read_bytes()


def test_a_wait_that_times_out_fails_and_loses_nothing(start_daemon, workdir):
    """The wait ends with an assertion at its timeout (qemu.qmp's legacy pull_event would wait
    forever for an int timeout), and what it pulled meanwhile is still there for the next wait."""
    disk, target = workdir / "disk.raw", workdir / "target.raw"
    disk.write_bytes(b"\x5a" * MiB)
    target.write_bytes(bytes(MiB))
    daemon = start_daemon(
        "pynbd",
        "--blockdev",
        f"driver=file,node-name=d0,filename={disk}",
        "--blockdev",
        f"driver=file,node-name=t0,filename={target}",
    )
    daemon.ok("blockdev-backup", device="d0", target="t0", sync="full", **{"job-id": "j"})
    with pytest.raises(AssertionError, match="no BLOCK_JOB_READY within 1s"):
        daemon.wait_event("BLOCK_JOB_READY", "j", timeout=1)  # a backup is never ready
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "j")["data"]
    assert daemon.wait_event("JOB_STATUS_CHANGE", "j")["data"]["status"] == "created"
    assert target.read_bytes() == disk.read_bytes()
