"""Job commands: blockdev-backup (also a transaction action), query-jobs, query-block-jobs,
and the block-job-* / job-* verbs."""

from __future__ import annotations

from pynbd.bitmap import NodeBitmap
from pynbd.daemon.blockjobs import job_id_of
from pynbd.daemon.core import Daemon
from pynbd.daemon.registry import action, command, command_from_action
from pynbd.graph.core import GraphUser
from pynbd.graph.transaction import Transaction
from pynbd.jobs.backup import SYNC_MODES, BackupJob
from pynbd.jobs.copy import ERROR_POLICIES
from pynbd.jobs.core import Job, JobError
from pynbd.nodes.base import BlockNode
from pynbd.qmp.protocol import QMPError

BACKUP_SPEC = {
    "*job-id": "str",
    "device": "str",
    "target": "str",
    "sync": SYNC_MODES,
    "*speed": "uint",
    "*bitmap": "str",
    "*bitmap-mode": ("on-success", "never", "always"),
    "*compress": "bool",
    "*on-source-error": ERROR_POLICIES,
    "*on-target-error": ERROR_POLICIES,
    "*auto-finalize": "bool",
    "*auto-dismiss": "bool",
    "*filter-node-name": "str",
    "*x-perf": "any",
}


def refuse_job_node(daemon: Daemon, node: BlockNode) -> None:
    """As qemu's op blockers: a node a block job works on (its filter, its target) cannot be the
    source or target of a backup. (Nodes further up or down the chain can.)"""
    for link in node.parents:
        if isinstance(link.parent, GraphUser) and link.parent.kind == "block-job":
            job = daemon.jobs.jobs.get(link.parent.name)
            what = job.job_type if job is not None else link.parent.description
            raise QMPError(f"Node '{node.node_name}' is busy: block device is in use by block job: {what}")


def sync_bitmap(source: BlockNode, args: dict) -> tuple[NodeBitmap | None, str | None]:
    """The ``bitmap`` and ``bitmap-mode`` of a backup's arguments, checked against ``sync`` as
    qemu's blockdev-backup checks them (incremental implies on-success)."""
    sync, bitmap = args["sync"], None
    mode = args.get("bitmap-mode")
    if "bitmap" in args:
        bitmap = source.dirty_bitmaps.get(args["bitmap"])
        if bitmap is None:
            raise QMPError(f"Bitmap '{args['bitmap']}' could not be found")
        if bitmap.busy or bitmap.inconsistent:
            raise QMPError(f"Bitmap '{bitmap.name}' is currently in use by another operation and cannot be used")
        if sync == "incremental":
            if mode not in (None, "on-success"):
                raise QMPError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
            mode = "on-success"
        elif sync not in ("bitmap", "full", "top"):
            raise QMPError(f"a bitmap cannot be used with sync mode '{sync}'")
        elif mode is None:
            raise QMPError("Bitmap sync mode must be given when providing a bitmap")
    elif sync in ("incremental", "bitmap"):
        raise QMPError(f"must provide a valid bitmap name for '{sync}' sync mode")
    elif mode is not None:
        raise QMPError("Cannot specify bitmap sync mode without a bitmap")
    return bitmap, mode


def start_in_transaction(daemon: Daemon, job: Job, tran: Transaction):
    """Install ``job`` in ``tran`` and create it now, as qemu does while preparing, so that a later
    action of the same transaction finds its id taken; if the transaction fails the job goes away
    (with qemu's events) unstarted. Returns the action's follow-up, which starts it."""
    job.install(tran)
    daemon.jobs.create(job)
    tran.add(abort=lambda: daemon.jobs.discard(job))

    async def start() -> None:
        daemon.jobs.start(job)

    return start


@action("blockdev-backup", BACKUP_SPEC)
async def backup_action(daemon: Daemon, args: dict, tran: Transaction):
    source = daemon.node(args["device"])
    target = daemon.node(args["target"])
    refuse_job_node(daemon, source)
    refuse_job_node(daemon, target)
    job_id = job_id_of(daemon, args)
    sync = args["sync"]
    bitmap, mode = sync_bitmap(source, args)
    if args.get("compress"):
        raise QMPError("Compression is not supported for this drive")
    if args.get("filter-node-name") in daemon.graph.nodes:
        raise QMPError(f"Duplicate nodes with node-name='{args['filter-node-name']}'")
    job = BackupJob(
        job_id,
        daemon.graph,
        source,
        target,
        sync,
        bitmap=bitmap,
        bitmap_mode=mode or "on-success",
        filter_node_name=args.get("filter-node-name"),
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
        speed=args.get("speed", 0),
    )
    return start_in_transaction(daemon, job, tran)


command_from_action("blockdev-backup")


@command("query-jobs", {})
async def query_jobs(daemon: Daemon, args: dict) -> list:
    return [job.info() for job in daemon.jobs.jobs.values()]


@command("query-block-jobs", {})
async def query_block_jobs(daemon: Daemon, args: dict) -> list:
    return [job.block_info() for job in daemon.jobs.jobs.values() if job.is_block_job]


def _block_job(daemon: Daemon, job_id: str) -> Job:
    job = daemon.jobs.jobs.get(job_id)
    if job is None or not job.is_block_job:
        raise QMPError(f"Block job '{job_id}' not found", "DeviceNotActive")
    return job


def _job(daemon: Daemon, job_id: str) -> Job:
    job = daemon.jobs.jobs.get(job_id)
    if job is None:
        raise QMPError("Job not found")
    return job


def _verb(name: str, lookup, key: str, call, extra: dict | None = None) -> None:
    spec = {key: "str", **(extra or {})}

    async def run(daemon: Daemon, args: dict) -> None:
        job = lookup(daemon, args[key])
        try:
            call(job, args)
        except JobError as exc:
            raise QMPError(str(exc)) from None

    command(name, spec)(run)


VERBS = {
    "pause": lambda job, args: job.pause(),
    "resume": lambda job, args: job.resume(),
    "complete": lambda job, args: (job.check_verb("complete"), job.complete()),
    "dismiss": lambda job, args: job.dismiss(),
    "finalize": lambda job, args: job.finalize(),
}
for _verb_name, _call in VERBS.items():
    _key = "id" if _verb_name in ("dismiss", "finalize") else "device"
    _verb(f"block-job-{_verb_name}", _block_job, _key, _call)
    _verb(f"job-{_verb_name}", _job, "id", _call)
_verb(
    "block-job-cancel", _block_job, "device", lambda job, args: job.cancel(args.get("force", False)), {"*force": "bool"}
)
_verb("job-cancel", _job, "id", lambda job, args: job.cancel(True))
_verb("block-job-set-speed", _block_job, "device", lambda job, args: job.set_speed(args["speed"]), {"speed": "int"})
