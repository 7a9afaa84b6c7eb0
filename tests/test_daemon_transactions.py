"""Failing ``transaction``s leave nothing behind: the same scripts against qemu-storage-daemon and
pynbd daemon, compared as in test_daemon_differential (graph edges, nodes with their dirty bitmaps,
exports, what NBD clients read, the image files), plus the job events the transaction emitted,
``query-jobs``, and whether every backup target and overlay can be deleted afterwards.

qemu creates a backup's job while the transaction prepares (so a second action with the same
``job-id`` fails) and, when a later action fails, takes it through aborting, concluded and null
without starting it; the copy-before-write filter, the bitmap's successor and everything else the
actions set up go with it.
"""

from __future__ import annotations

import pytest

from tests.peers import run
from tests.test_daemon_differential import MiB, Recorder, assert_same_view, make_raw

pytestmark = pytest.mark.timeout(180)
TARGETS = ("t1", "t2", "small")  # raw files: 4 MiB, 4 MiB, and 2 MiB (the wrong size for a backup of d0)


def backup_setup(r: Recorder) -> None:
    """d0 (a raw file, exported writable as ``disk``) with bitmap b0 marking one write, backup
    targets t1, t2 and small, and an unused qcow2 overlay ``ov``."""
    make_raw(r.dir / "disk.raw")
    for name in TARGETS:
        with open(r.dir / f"{name}.raw", "wb") as f:
            f.truncate(2 * MiB if name == "small" else 4 * MiB)
    run(["qemu-img", "create", "-q", "-f", "qcow2", r.path("ov.qcow2"), str(4 * MiB)])
    r.qmp("blockdev-add", driver="file", **{"node-name": "d0"}, filename=r.path("disk.raw"))
    for name in TARGETS:
        r.qmp("blockdev-add", driver="file", **{"node-name": name}, filename=r.path(f"{name}.raw"))
    overlay_file = {"driver": "file", "filename": r.path("ov.qcow2")}
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "ov"}, file=overlay_file)
    r.export("d0", "disk", writable=True)
    r.qmp("block-dirty-bitmap-add", node="d0", name="b0", granularity=65536)
    r.client("disk", lambda h: (h.pwrite(b"\x5a" * 4096, MiB), h.flush()))


def backup(job_id: str, target: str, sync: str = "full", **more) -> dict:
    data = {"job-id": job_id, "device": "d0", "target": target, "sync": sync, "speed": 1, **more}
    return {"type": "blockdev-backup", "data": data}


def bitmap(action: str, name: str = "b0", **more) -> dict:
    return {"type": f"block-dirty-bitmap-{action}", "data": {"node": "d0", "name": name, **more}}


ABORT = {"type": "abort", "data": {}}


def failing(*actions: dict):
    """A scenario: set up, run the transaction (it must fail in both daemons), record the jobs'
    events and query-jobs, write through the export again, and delete the targets and overlay."""
    job_ids = [a["data"]["job-id"] for a in actions if a["type"] == "blockdev-backup"]

    def scenario(r: Recorder) -> None:
        backup_setup(r)
        assert r.qmp("transaction", actions=list(actions)) is None, f"{r.daemon.kind}: the transaction succeeded"
        r.job_events(*job_ids)
        r.query("query-jobs")
        r.query("query-block-jobs")
        # the guest goes on: b0 records it, and no copy-before-write copies anything to a target
        r.client("disk", lambda h: (h.pwrite(b"\x6b" * 4096, 2 * MiB), h.flush()))
        for name in (*TARGETS, "ov"):
            r.qmp("blockdev-del", **{"node-name": name})

    return scenario


SCENARIOS = {
    "same-job-id-twice": failing(backup("j", "t1"), backup("j", "t2")),
    "backup-then-abort": failing(backup("j1", "t1"), ABORT),
    "two-backups-stacked-then-abort": failing(backup("j1", "t1"), backup("j2", "t2"), ABORT),
    "bitmap-backup-then-abort": failing(
        bitmap("add", "b1"), backup("j1", "t1", "bitmap", bitmap="b0", **{"bitmap-mode": "never"}), ABORT
    ),
    "new-bitmap-backed-up-then-abort": failing(
        bitmap("add", "b1"), backup("j1", "t1", "incremental", bitmap="b1"), ABORT
    ),
    "same-bitmap-twice": failing(
        backup("j1", "t1", "incremental", bitmap="b0"), backup("j2", "t2", "incremental", bitmap="b0")
    ),
    "backup-then-remove-its-bitmap": failing(backup("j1", "t1", "incremental", bitmap="b0"), bitmap("remove")),
    "backup-then-clear-its-bitmap": failing(backup("j1", "t1", "incremental", bitmap="b0"), bitmap("clear")),
    "clear-and-disable-then-backup-of-the-wrong-size": failing(
        bitmap("clear"), bitmap("disable"), backup("j1", "t1", "incremental", bitmap="b0"), backup("j2", "small")
    ),
    "snapshot-then-duplicate-job": failing(
        {"type": "blockdev-snapshot", "data": {"node": "d0", "overlay": "ov"}}, backup("j", "t1"), backup("j", "t2")
    ),
    "duplicate-filter-node-name": failing(
        backup("j1", "t1", **{"filter-node-name": "f"}), backup("j2", "t2", **{"filter-node-name": "f"})
    ),
    "same-target-twice-then-abort": failing(backup("j1", "t1"), backup("j2", "t1"), ABORT),
    "backup-of-a-missing-bitmap": failing(backup("j1", "t1"), backup("j2", "t2", "incremental", bitmap="nope")),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_failed_transaction_leaves_nothing_behind(name, start_daemon, workdir):
    scenario = SCENARIOS[name]
    scenario.__name__ = name
    assert_same_view(scenario, start_daemon, workdir)


def job_id_taken_by_a_running_job(r: Recorder) -> None:
    """A running backup holds job-id j0: a transaction reusing it fails, and the running job and
    its filter are untouched."""
    backup_setup(r)
    r.qmp("blockdev-backup", **backup("j0", "t2", **{"auto-dismiss": False})["data"])  # crawls: 1 byte/s
    r.qmp("transaction", actions=[bitmap("add", "b1"), backup("j1", "t1"), backup("j0", "t1")])
    r.job_events("j1")
    # which jobs, in which state (progress, and query-block-jobs' "busy" for a job sleeping for its
    # speed limit, depend on timing or differ)
    r.log.append(("jobs", [(job["id"], job["status"]) for job in r.daemon.ok("query-jobs")]))
    r.qmp("blockdev-del", **{"node-name": "t1"})
    r.qmp("blockdev-del", **{"node-name": "t2"})  # the running job's target: refused
    r.qmp("block-job-cancel", device="j0")
    # (not r.wait_job: query-jobs differs there, qemu says "Operation canceled" for a cancelled job)
    r.daemon.wait_event("JOB_STATUS_CHANGE", "j0", status="concluded")
    r.qmp("job-dismiss", id="j0")
    r.qmp("blockdev-del", **{"node-name": "t2"})


def test_a_transaction_reusing_a_running_jobs_id_leaves_that_job_alone(start_daemon, workdir):
    assert_same_view(job_id_taken_by_a_running_job, start_daemon, workdir)


def test_grouped_completion_is_refused_and_changes_nothing(start_daemon, workdir):
    """pynbd's jobs complete individually: ``completion-mode: grouped`` is refused, not ignored."""
    r = Recorder(start_daemon("pynbd"), workdir)
    backup_setup(r)
    before = r.daemon.ok("x-debug-query-block-graph")
    error = r.daemon.fails("transaction", actions=[backup("j1", "t1")], properties={"completion-mode": "grouped"})
    assert "grouped is not supported" in error
    assert "does not accept value" in r.daemon.fails(
        "transaction", actions=[backup("j1", "t1")], properties={"completion-mode": "sometimes"}
    )
    r.daemon.ok("transaction", actions=[bitmap("add", "b1")], properties={"completion-mode": "individual"})
    assert r.daemon.ok("x-debug-query-block-graph") == before
    assert r.daemon.ok("query-jobs") == []


def persistent_bitmaps_then_abort(r: Recorder) -> None:
    """A qcow2 image's persistent bitmaps: a failed transaction neither stores a new one nor drops
    an old one from the image (qemu-img info after the daemon quit), nor marks the image."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", r.path("q.qcow2"), str(4 * MiB)])
    make_raw(r.dir / "t.raw", 4 * MiB, {0: bytes(1)})
    r.qmp("blockdev-add", driver="qcow2", **{"node-name": "q"}, file={"driver": "file", "filename": r.path("q.qcow2")})
    r.qmp("blockdev-add", driver="file", **{"node-name": "t"}, filename=r.path("t.raw"))
    r.qmp("block-dirty-bitmap-add", node="q", name="p0", persistent=True, granularity=65536)
    r.export("q", writable=True)
    # whole clusters: pynbd cannot yet read back a partly written last cluster of a qcow2 file
    r.client("q", lambda h: (h.pwrite(b"\x3c" * 65536, MiB), h.flush()))
    backup_p0 = backup("j1", "t", "incremental", bitmap="p0")
    backup_p0["data"]["device"] = "q"
    for actions in (
        [{"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "p1", "persistent": True}}, ABORT],
        [{"type": "block-dirty-bitmap-remove", "data": {"node": "q", "name": "p0"}}, ABORT],
        [{"type": "block-dirty-bitmap-clear", "data": {"node": "q", "name": "p0"}}, backup_p0, ABORT],
        [backup_p0, {"type": "block-dirty-bitmap-disable", "data": {"node": "q", "name": "p0"}}],  # busy
    ):
        r.qmp("transaction", actions=actions)
    r.job_events("j1")
    r.client("q", lambda h: (h.pwrite(b"\x3d" * 65536, 3 * MiB), h.flush()))
    r.qmp("blockdev-del", **{"node-name": "t"})


def test_a_failed_transaction_leaves_persistent_bitmaps_as_they_were(start_daemon, workdir):
    assert_same_view(persistent_bitmaps_then_abort, start_daemon, workdir)
