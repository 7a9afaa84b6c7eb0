"""The job model shared by every long-running operation (create, backup, commit, stream, mirror).

States, legal transitions and which verbs each state allows follow QEMU's job.c (JobSTT and
JobVerbTable), so QMP clients see the same JOB_STATUS_CHANGE sequences as with
qemu-storage-daemon. A job's work is one coroutine (:meth:`Job.work`) that calls
:meth:`Job.checkpoint` between chunks: that is where pause, cancel and the speed limit act.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pynbd.graph.io import drained

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pynbd.graph.core import BlockGraph, ChildLink, GraphUser
    from pynbd.nodes.base import BlockNode

log = logging.getLogger("pynbd.jobs")


class JobStatus(enum.Enum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobStatus
TRANSITIONS: dict[JobStatus, set[JobStatus]] = {
    S.UNDEFINED: {S.CREATED},
    S.CREATED: {S.RUNNING, S.ABORTING, S.NULL},
    S.RUNNING: {S.PAUSED, S.READY, S.WAITING, S.ABORTING},
    S.PAUSED: {S.RUNNING},
    S.READY: {S.STANDBY, S.WAITING, S.ABORTING},
    S.STANDBY: {S.READY},
    S.WAITING: {S.PENDING, S.ABORTING},
    S.PENDING: {S.CONCLUDED, S.ABORTING},
    S.ABORTING: {S.CONCLUDED, S.ABORTING},
    S.CONCLUDED: {S.NULL},
    S.NULL: set(),
}
VERBS: dict[str, set[JobStatus]] = {
    "cancel": {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING},
    "pause": {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
    "resume": {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
    "set-speed": {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
    "complete": {S.READY, S.STANDBY},
    "finalize": {S.PENDING},
    "dismiss": {S.CONCLUDED},
}


class JobError(Exception):
    pass


class JobCancelled(Exception):
    """Raised inside a job's work at a checkpoint once the job is cancelled."""


EventSink = Callable[[str, dict], None]


class Job:
    """Base class: subclasses implement :meth:`work`, and optionally :meth:`prepare` (graph
    changes on success), :meth:`abort` (undo on failure or cancel) and :meth:`clean`."""

    job_type = "none"  # QMP JobType: create, backup, commit, stream, mirror, ...
    is_block_job = True  # listed by query-block-jobs (blockdev-create's job is not)
    #: the graph user block jobs make their requests as (copy jobs set it; see jobs/copy.py)
    user: GraphUser

    def __init__(self, job_id: str, auto_finalize: bool = True, auto_dismiss: bool = True, speed: int = 0) -> None:
        self.id = job_id
        self.status = JobStatus.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.speed = speed
        self.current_progress = 0
        self.total_progress = 0
        self.error: str | None = None
        self.cancelled = False
        self.force_cancel = False
        self.device = ""  # block-job "device" (node name) for query-block-jobs
        self.io_status = "ok"
        self._pause_count = 0
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._finalize = asyncio.Event()
        self._complete_requested = asyncio.Event()
        self._rate_start = time.monotonic()
        self._rate_bytes = 0
        self._rate_epoch = 0
        self._wake = asyncio.Event()  # wakes a job sleeping for its speed limit
        self.task: asyncio.Task | None = None
        self.manager: JobManager | None = None
        self.concluded = asyncio.Event()
        self.frozen: list[ChildLink] = []  # links a block job holds frozen while it runs

    @property
    def holder(self) -> str:
        """How the graph names this job as the holder of frozen links (in refusals)."""
        return f"job '{self.id}'"

    # -- what subclasses provide -------------------------------------------------------------

    async def work(self) -> None:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Success: make the job's graph changes (runs in PENDING when finalised)."""

    async def abort(self) -> None:
        """Failure or cancel: leave the graph as it was before the job."""

    async def clean(self) -> None:
        """Always, last: drop what the job held (frozen links, users, filters)."""

    async def leave_graph(
        self,
        graph: BlockGraph,
        drain: Iterable[BlockNode],
        filt: BlockNode | None = None,
        below: BlockNode | None = None,
    ) -> None:
        """The graph part of a block job's clean-up, drained: drop its freezes, its links and its
        filter (back to ``below``). Every step is tried even if one before it failed (logged), so
        the graph is left as the job found it as far as it can be; the first failure is raised."""
        frozen: list[ChildLink] = self.frozen
        self.frozen = []
        steps = [lambda: graph.unfreeze_links(frozen, self.holder), lambda: graph.detach_user(self.user)]
        if filt is not None:
            if below is None:
                raise ValueError("a filter to remove needs the node it goes back to")
            steps.append(lambda: graph.remove_filter(filt, below))
        failures: list[Exception] = []
        async with drained(drain, owner=self.user):
            for step in steps:
                try:
                    step()
                except Exception as exc:
                    log.exception("job %s: clean-up step failed", self.id)
                    failures.append(exc)
        if failures:
            raise failures[0]

    def complete(self) -> None:
        """job-complete on a READY job: the work coroutine sees :attr:`complete_requested`."""
        self._complete_requested.set()

    # -- state machine ---------------------------------------------------------------------------

    def _transition(self, new: JobStatus) -> None:
        if new not in TRANSITIONS[self.status]:
            raise JobError(f"job {self.id!r}: illegal transition {self.status.value} -> {new.value}")
        self.status = new
        self._emit("JOB_STATUS_CHANGE", {"status": new.value, "id": self.id})

    def check_verb(self, verb: str) -> None:
        if self.status not in VERBS[verb]:
            raise JobError(f"Job '{self.id}' in state '{self.status.value}' cannot accept command verb '{verb}'")

    def _emit(self, event: str, data: dict) -> None:
        if self.manager is not None:
            self.manager.emit(event, data)

    def start(self) -> None:
        if self.status is JobStatus.UNDEFINED:  # not created ahead by a transaction
            self._transition(JobStatus.CREATED)
        self.task = asyncio.create_task(self._run(), name=f"job-{self.id}")

    def discard(self) -> None:
        """The transaction that created this job failed before it started: it goes through
        ABORTING and CONCLUDED to NULL, with their events, as qemu's does (the transaction
        itself undoes what the job had set up)."""
        for status in (JobStatus.ABORTING, JobStatus.CONCLUDED, JobStatus.NULL):
            self._transition(status)
        self.concluded.set()

    @property
    def complete_requested(self) -> bool:
        return self._complete_requested.is_set()

    async def wait_complete_requested(self) -> None:
        await self._complete_requested.wait()

    def set_ready(self) -> None:
        if self.status is JobStatus.RUNNING:
            self._transition(JobStatus.READY)
            self._emit("BLOCK_JOB_READY", self._block_event_data())

    # -- checkpoints: pause, cancel, speed --------------------------------------------------------

    async def checkpoint(self) -> None:
        """Call between chunks of work: raises JobCancelled, waits while paused."""
        if self.cancelled:
            raise JobCancelled()
        if self._pause_count and self.status in (JobStatus.RUNNING, JobStatus.READY):
            self._transition(JobStatus.PAUSED if self.status is JobStatus.RUNNING else JobStatus.STANDBY)
        if self._resumed.is_set():
            return
        # A worker woken by a resume may run only after another worker has stopped the job again
        # (an error under the ``stop`` policy): it waits again rather than mark the job running.
        while not self._resumed.is_set():
            await self._resumed.wait()
            if self.cancelled:
                raise JobCancelled()
        # several workers may wake here; the first one moves the state back
        if self.status is JobStatus.PAUSED:
            self._transition(JobStatus.RUNNING)
        elif self.status is JobStatus.STANDBY:
            self._transition(JobStatus.READY)

    async def throttle(self, nbytes: int) -> None:
        """The speed limit: call before moving ``nbytes``; waits until the bytes already moved
        are within the rate. The first chunk goes at once, as in qemu; parallel workers share
        the budget because each reserves its bytes before it starts. A pause, a cancel or a new
        speed wakes the wait at once, as qemu's job_enter does."""
        if not self.speed:
            return
        before, epoch = self._rate_bytes, self._rate_epoch
        self._rate_bytes += nbytes
        while self.speed and epoch == self._rate_epoch:
            delay = self._rate_start + before / self.speed - time.monotonic()
            if delay <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            await self.checkpoint()  # cancelled: raises; paused: waits here

    def _cancel_event(self) -> asyncio.Event:
        if not hasattr(self, "_cancel_evt"):
            self._cancel_evt = asyncio.Event()
        return self._cancel_evt

    async def stop_on_error(self, io_status: str) -> None:
        """The ``stop`` error policy: pause with an io-status until resumed, then carry on."""
        self.io_status = io_status
        self._pause_count += 1
        self._resumed.clear()
        await self.checkpoint()
        self.io_status = "ok"

    def pause(self) -> None:
        self.check_verb("pause")
        self._pause_count += 1
        self._resumed.clear()
        self._wake.set()
        if self.status is JobStatus.CREATED:
            return
        # A job waiting between checkpoints (READY, mirror idle) shows the pause at once.
        if self.status is JobStatus.READY and not self._working:
            self._transition(JobStatus.STANDBY)

    def resume(self) -> None:
        self.check_verb("resume")
        if self._pause_count == 0:
            raise JobError(f"Can't resume a job that was not paused: '{self.id}'")
        self.io_status = "ok"  # as qemu's block_job_user_resume: a user resume clears the error
        self._pause_count -= 1
        if self._pause_count == 0:
            self._resumed.set()
            if self.status is JobStatus.STANDBY and not self._working:
                self._transition(JobStatus.READY)

    def set_speed(self, speed: int) -> None:
        self.check_verb("set-speed")
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        self.speed = speed
        self._rate_start, self._rate_bytes = time.monotonic(), 0
        self._rate_epoch += 1
        self._wake.set()

    def cancel(self, force: bool = False) -> None:
        """Cancel; on a READY job without ``force`` this means "complete without pivot" (mirror)."""
        self.check_verb("cancel")
        self.cancelled = True
        self.force_cancel = force or self.status not in (JobStatus.READY, JobStatus.STANDBY)
        self._cancel_event().set()
        self._wake.set()
        self._resumed.set()
        self._complete_requested.set()
        if self.status is JobStatus.PENDING:
            self._finalize.set()

    def finalize(self) -> None:
        self.check_verb("finalize")
        self._finalize.set()

    # -- lifecycle -------------------------------------------------------------------------------

    _working = False

    async def _run(self) -> None:
        try:
            if self._pause_count:
                await self._resumed.wait()
            self._transition(JobStatus.RUNNING)
            self._working = True
            try:
                await self.work()
            finally:
                self._working = False
            if self.cancelled and self.status is not JobStatus.READY:
                raise JobCancelled()
        except JobCancelled:
            self.cancelled = True
        except Exception as exc:  # the job fails; the daemon goes on
            log.warning("job %s failed: %s", self.id, exc)
            self.error = str(exc) or exc.__class__.__name__
        await self._finish()

    async def _finish(self) -> None:
        failed = self.error is not None or (self.cancelled and self.force_cancel)
        if not failed:
            if self.status in (JobStatus.READY, JobStatus.STANDBY, JobStatus.RUNNING, JobStatus.PAUSED):
                if self.status is JobStatus.PAUSED:
                    self.status = JobStatus.RUNNING
                if self.status is JobStatus.STANDBY:
                    self.status = JobStatus.READY
                self._transition(JobStatus.WAITING)
            self._transition(JobStatus.PENDING)
            self._emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})
            if not self.auto_finalize:
                await self._finalize.wait()
        # the graph changes of the end run as a QMP command does: never interleaved with one
        async with self.manager.graph_lock if self.manager is not None else contextlib.nullcontext():
            await self._settle(failed)
            if self.manager is not None and self.manager.after_graph_change is not None:
                await self.manager.after_graph_change()
        self._conclude()

    async def _settle(self, failed: bool) -> None:
        """prepare (success), abort (failure or cancel), clean (always)."""
        if not failed:
            if self.cancelled and self.force_cancel:
                failed = True
            else:
                try:
                    await self.prepare()
                except Exception as exc:
                    log.warning("job %s failed to finalise: %s", self.id, exc)
                    self.error = str(exc)
                    failed = True
        if failed:
            if self.status is JobStatus.PAUSED:
                self.status = JobStatus.RUNNING
            if self.status is JobStatus.STANDBY:
                self.status = JobStatus.READY
            self._transition(JobStatus.ABORTING)
            try:
                await self.abort()
            except Exception:
                log.exception("job %s: abort failed", self.id)
        try:
            await self.clean()
        except Exception:
            log.exception("job %s: clean-up failed", self.id)

    def _conclude(self) -> None:
        if self.is_block_job:
            data = self._block_event_data()
            if self.error is not None:
                data["error"] = self.error
            if self.cancelled and self.force_cancel and self.error is None:  # a soft cancel completes
                self._emit("BLOCK_JOB_CANCELLED", data)
            else:
                self._emit("BLOCK_JOB_COMPLETED", data)
        self._transition(JobStatus.CONCLUDED)
        self.concluded.set()
        if self.auto_dismiss:
            self.dismiss()

    def dismiss(self) -> None:
        self.check_verb("dismiss")
        self._transition(JobStatus.NULL)
        if self.manager is not None:
            self.manager.jobs.pop(self.id, None)

    # -- queries -------------------------------------------------------------------------------

    def _block_event_data(self) -> dict:
        return {
            "type": self.job_type,
            "device": self.id,
            "len": self.total_progress,
            "offset": self.current_progress,
            "speed": self.speed,
        }

    def info(self) -> dict:
        """One entry of query-jobs."""
        info = {
            "id": self.id,
            "type": self.job_type,
            "status": self.status.value,
            "current-progress": self.current_progress,
            "total-progress": self.total_progress,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def block_info(self) -> dict:
        """One entry of query-block-jobs."""
        return {
            "type": self.job_type,
            "device": self.id,
            "len": self.total_progress,
            "offset": self.current_progress,
            "busy": self.status in (JobStatus.RUNNING, JobStatus.READY) and self._working,
            "paused": self._pause_count > 0,
            "speed": self.speed,
            "io-status": self.io_status,
            "ready": self.status in (JobStatus.READY, JobStatus.STANDBY),
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }


class JobManager:
    """All jobs of a daemon by id; forwards their events to the QMP layer."""

    def __init__(
        self,
        emit: EventSink | None = None,
        graph_lock: asyncio.Lock | None = None,
        after_graph_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.jobs: dict[str, Job] = {}
        self._emit = emit
        #: the daemon's command lock: a job's end (pivot, filter removal) never interleaves with
        #: a QMP command's graph changes
        self.graph_lock = graph_lock or asyncio.Lock()
        #: run under that lock once a job's end has changed the graph: the daemon closes the nodes
        #: the job left without a user (a node a pivot replaced, layers a commit dropped)
        self.after_graph_change = after_graph_change

    def emit(self, event: str, data: dict) -> None:
        if self._emit is not None:
            self._emit(event, data)

    def create(self, job: Job) -> Job:
        """Register ``job`` (CREATED) without starting it: a transaction creates its jobs while it
        prepares, so a later action sees their ids taken, and starts them once it has committed."""
        if not job.id:
            raise JobError("job-id is required")
        if job.id in self.jobs:
            raise JobError(f"Job ID '{job.id}' already in use")
        job.manager = self
        self.jobs[job.id] = job
        job._transition(JobStatus.CREATED)
        return job

    def start(self, job: Job) -> Job:
        if self.jobs.get(job.id) is not job:
            self.create(job)
        job.start()
        return job

    def discard(self, job: Job) -> None:
        """Undo :meth:`create` for a job that never started."""
        job.discard()
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError(f"Job ID '{job_id}' not found")
        return job

    async def cancel_all(self) -> None:
        for job in list(self.jobs.values()):
            if job.status in VERBS["cancel"]:
                job.cancel(force=True)  # as qemu's job_cancel_sync_all: a READY job must not complete instead
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
