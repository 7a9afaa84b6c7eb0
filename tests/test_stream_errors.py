"""``block-stream on-error``: a read error in the backing chain, injected with blkdebug, under each
policy, run against pynbd and qemu-storage-daemon 7.2 with the same QMP script.

The chain is base (0x11 everywhere) <- mid (0x22 in 1-3 MiB) <- top (0x33 in 3-3.5 MiB); mid's file
sits under a blkdebug node that fails reads of the host sector holding guest offset 2.5 MiB. qemu
streams in 512 KiB chunks, so the chunk [2.5, 3) MiB is the one the error policy acts on. Compared:
the BLOCK_JOB_ERROR events, the job's end (status, error text), the backing link, what an NBD
client reads, and what ``qemu-img map`` shows the top holds afterwards.
"""

from __future__ import annotations

import json

import nbd
import pytest

from tests.daemons import KINDS
from tests.peers import run

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
CHUNK = 512 * KiB
BAD = 5 * CHUNK  # the chunk [2.5, 3) MiB: its data lies in mid
#: what each 512 KiB chunk of the disk reads through the chain
CHAIN = [0x11, 0x11, 0x22, 0x22, 0x22, 0x22, 0x33, 0x11]
EIO_TEXT = "Input/output error"

pytestmark = pytest.mark.timeout(120)


def make_chain(workdir, kind):
    base, mid, top = (workdir / f"{kind}-{name}.qcow2" for name in ("base", "mid", "top"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(mid)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(base)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 2M", str(mid)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 3M 512k", str(top)])
    return base, mid, top


def top_layer_map(image) -> list[tuple[int, int]]:
    """The ranges ``image`` itself holds (depth 0 in ``qemu-img map``), merged."""
    ranges: list[tuple[int, int]] = []
    for entry in json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)]).stdout):
        if entry["depth"] == 0 and entry["data"]:
            if ranges and sum(ranges[-1]) == entry["start"]:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + entry["length"])
            else:
                ranges.append((entry["start"], entry["length"]))
    return ranges


def host_sector(image, guest: int) -> int:
    """The 512-byte sector of ``image``'s file that holds guest offset ``guest``."""
    for entry in json.loads(run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)]).stdout):
        if entry["depth"] == 0 and entry["start"] <= guest < entry["start"] + entry["length"]:
            return (entry["offset"] + guest - entry["start"]) // 512
    raise AssertionError(f"{image} does not hold offset {guest}")


def start(start_daemon, kind, workdir, *, bad_layer: str = "mid", errno: int = 5, once: bool = False):
    """The chain in a daemon, top exported writable as "w", with blkdebug under ``bad_layer``'s
    file: reads of mid's chunk at 2.5 MiB fail, or (``top``) the first write to top's file."""
    base, mid, top = make_chain(workdir, kind)
    daemon = start_daemon(kind)
    daemon.ok("blockdev-add", driver="file", **{"node-name": "bf"}, filename=str(base))
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "base", "read-only": True}, file="bf")

    def file_of(path, event, sector=None):
        rule = {"event": event, "errno": errno, "once": once}
        if sector is not None:
            rule["sector"] = sector
        return {"driver": "blkdebug", "image": {"driver": "file", "filename": str(path)}, "inject-error": [rule]}

    mid_file, top_file = ({"driver": "file", "filename": str(path)} for path in (mid, top))
    if bad_layer == "mid":
        mid_file = file_of(mid, "read_aio", host_sector(mid, BAD))
    else:
        top_file = file_of(top, "write_aio")
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "mid", "read-only": True}, file=mid_file, backing="base")
    daemon.ok("blockdev-add", driver="qcow2", **{"node-name": "top"}, file=top_file, backing="mid")
    daemon.ok("block-export-add", type="nbd", id="w", **{"node-name": "top"}, name="w", writable=True)
    return daemon, top


def read_chunks(daemon) -> list[int | str]:
    """What each 512 KiB chunk reads: its byte (each is one pattern) or "EIO". A connection per
    chunk: qemu-storage-daemon drops a client whose read failed."""
    out: list[int | str] = []
    for offset in range(0, SIZE, CHUNK):
        h = nbd.NBD()
        h.connect_uri(daemon.uri("w"))
        try:
            data = h.pread(CHUNK, offset)
            assert len(set(data)) == 1, f"chunk at {offset} mixes patterns"
            out.append(data[0])
        except nbd.Error:
            out.append("EIO")
        try:
            h.shutdown()
        except nbd.Error:
            pass  # already dropped by the server
    return out


def backing_of_top(daemon) -> str | None:
    graph = daemon.ok("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    links = [e for e in graph["edges"] if names[e["parent"]] == "top" and e["name"] == "backing"]
    return names[links[0]["child"]] if links else None


def job_errors(events) -> list[dict]:
    return [e["data"] for e in events if e["event"] == "BLOCK_JOB_ERROR"]


def wait_stopped(daemon) -> dict:
    """After a ``stop`` error: the job pauses; its query entry then."""
    daemon.wait_event("JOB_STATUS_CHANGE", "s", status="paused")
    [info] = daemon.ok("query-block-jobs")
    assert info["status"] == "paused" and info["paused"] is True and info["busy"] is False
    return info


@pytest.mark.parametrize("kind", KINDS)
def test_report_fails_the_job_at_the_first_error_and_keeps_the_chain(kind, start_daemon, workdir):
    daemon, top = start(start_daemon, kind, workdir)
    daemon.ok("block-stream", **{"job-id": "s", "device": "top", "on-error": "report"})
    seen = daemon.events_until("BLOCK_JOB_COMPLETED", "s")
    assert job_errors(seen) == [{"device": "s", "operation": "read", "action": "report"}]
    assert seen[-1]["data"]["error"] == EIO_TEXT
    assert [e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"][-1] == "aborting"
    assert daemon.ok("query-jobs") == []
    assert backing_of_top(daemon) == "mid"  # the failed job changed no link
    chunks = read_chunks(daemon)
    assert chunks == [*CHAIN[:5], "EIO", *CHAIN[6:]]  # the bad chunk still fails, the rest reads as before
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(top)])
    held = top_layer_map(top)
    assert not any(start < BAD + CHUNK and BAD < start + length for start, length in held), held


@pytest.mark.parametrize("kind", KINDS)
def test_ignore_streams_the_rest_and_still_fails_the_job(kind, start_daemon, workdir):
    """qemu: "Do not remove the backing file if an error was there but ignored." The job goes on
    to the end, then fails with the error it ignored; everything but the bad chunk was copied up."""
    daemon, top = start(start_daemon, kind, workdir)
    daemon.ok("block-stream", **{"job-id": "s", "device": "top", "on-error": "ignore"})
    seen = daemon.events_until("BLOCK_JOB_COMPLETED", "s")
    assert job_errors(seen) == [{"device": "s", "operation": "read", "action": "ignore"}]
    completed = seen[-1]["data"]
    assert completed["error"] == EIO_TEXT
    assert completed["offset"] == completed["len"]  # it went all the way
    assert backing_of_top(daemon) == "mid"
    assert read_chunks(daemon) == [*CHAIN[:5], "EIO", *CHAIN[6:]]
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(top)])
    assert top_layer_map(top) == [(0, BAD), (BAD + CHUNK, SIZE - BAD - CHUNK)]  # all but the bad chunk


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("policy", "errno", "io_status"), [("stop", 5, "failed"), ("enospc", 28, "nospace"), ("auto", 28, "nospace")]
)
def test_stop_pauses_the_job_and_resume_retries_the_chunk(kind, policy, errno, io_status, start_daemon, workdir):
    """``stop`` (and ``enospc``/``auto`` for ENOSPC) pause the job with an io-status; a resume
    clears it and retries the same chunk, which now reads (the rule fired once): the stream
    completes and the chain is gone."""
    daemon, top = start(start_daemon, kind, workdir, errno=errno, once=True)
    # not finalised on its own: the job is still there to query right after the resume
    daemon.ok("block-stream", **{"job-id": "s", "device": "top", "on-error": policy, "auto-finalize": False})
    seen = daemon.events_until("BLOCK_JOB_ERROR", "s")
    assert seen[-1]["data"] == {"device": "s", "operation": "read", "action": "stop"}
    assert wait_stopped(daemon)["io-status"] == io_status
    assert [j["status"] for j in daemon.ok("query-jobs")] == ["paused"]
    daemon.ok("block-job-resume", device="s")
    assert daemon.ok("query-block-jobs")[0]["io-status"] == "ok"  # cleared by the resume itself
    seen = daemon.events_until("BLOCK_JOB_PENDING", "s")
    daemon.ok("job-finalize", id="s")
    seen += daemon.events_until("BLOCK_JOB_COMPLETED", "s")
    assert job_errors(seen) == []
    assert "error" not in seen[-1]["data"]
    assert backing_of_top(daemon) is None
    assert read_chunks(daemon) == CHAIN
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(top)])
    assert top_layer_map(top) == [(0, SIZE)]
    assert "backing-filename" not in json.loads(run(["qemu-img", "info", "--output=json", str(top)]).stdout)


@pytest.mark.parametrize("kind", KINDS)
def test_a_lasting_error_stops_again_after_each_resume_until_cancelled(kind, start_daemon, workdir):
    daemon, top = start(start_daemon, kind, workdir)  # the rule fires every time
    daemon.ok("block-stream", **{"job-id": "s", "device": "top", "on-error": "stop"})
    for _ in range(2):
        seen = daemon.events_until("BLOCK_JOB_ERROR", "s")
        assert seen[-1]["data"] == {"device": "s", "operation": "read", "action": "stop"}
        assert wait_stopped(daemon)["io-status"] == "failed"
        daemon.ok("block-job-resume", device="s")  # retried: fails again
    assert daemon.events_until("BLOCK_JOB_ERROR", "s")[-1]["data"]["action"] == "stop"
    wait_stopped(daemon)
    daemon.ok("block-job-cancel", device="s", force=True)  # qemu refuses a paused job's cancel without force
    seen = daemon.events_until("BLOCK_JOB_CANCELLED", "s")
    assert job_errors(seen) == []
    assert backing_of_top(daemon) == "mid"
    assert read_chunks(daemon) == [*CHAIN[:5], "EIO", *CHAIN[6:]]
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(top)])


@pytest.mark.parametrize("kind", KINDS)
def test_auto_reports_an_error_that_is_not_enospc(kind, start_daemon, workdir):
    daemon, _ = start(start_daemon, kind, workdir)
    daemon.ok("block-stream", **{"job-id": "s", "device": "top", "on-error": "auto"})
    seen = daemon.events_until("BLOCK_JOB_COMPLETED", "s")
    assert job_errors(seen) == [{"device": "s", "operation": "read", "action": "report"}]
    assert seen[-1]["data"]["error"] == EIO_TEXT
    assert backing_of_top(daemon) == "mid"


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_write_into_the_top_is_a_read_error_too(kind, start_daemon, workdir):
    """qemu's stream reports every failed copy-up as a read (block/stream.c passes is_read=true):
    here writing the top fails once; under ``stop`` the job pauses and completes on resume."""
    daemon, top = start(start_daemon, kind, workdir, bad_layer="top", once=True)
    daemon.ok("block-stream", **{"job-id": "s", "device": "top", "on-error": "stop"})
    seen = daemon.events_until("BLOCK_JOB_ERROR", "s")
    assert seen[-1]["data"] == {"device": "s", "operation": "read", "action": "stop"}
    assert wait_stopped(daemon)["io-status"] == "failed"
    daemon.ok("block-job-resume", device="s")
    assert "error" not in daemon.wait_event("BLOCK_JOB_COMPLETED", "s")["data"]
    assert backing_of_top(daemon) is None
    assert daemon.stop() == 0
    run(["qemu-img", "check", str(top)])


@pytest.mark.parametrize(
    "kind",
    [
        "pynbd",
        "qsd",
    ],
)
def test_a_failed_copy_up_write_leaves_what_the_top_reads(kind, start_daemon, workdir):
    """A copy-up writes what the chain already shows: if writing the top fails, every chunk must
    still read as before (qemu frees the cluster it allocated; the L2 entry never changes)."""
    daemon, top = start(start_daemon, kind, workdir, bad_layer="top", once=True)
    daemon.ok("block-stream", **{"job-id": "s", "device": "top", "on-error": "report"})
    seen = daemon.events_until("BLOCK_JOB_COMPLETED", "s")
    assert job_errors(seen) == [{"device": "s", "operation": "read", "action": "report"}]
    assert seen[-1]["data"]["error"] == EIO_TEXT
    assert backing_of_top(daemon) == "mid"
    assert read_chunks(daemon) == CHAIN
