"""``x-blockdev-copy`` (a pynbd extension): one copy job with a ``mode``, also a transaction action.

``mode: point-in-time`` is blockdev-backup's semantics, ``mode: converge`` blockdev-mirror's, on
the same job (:class:`pynbd.jobs.copyjob.CopyJob`, QMP job type ``copy``). The options are those
of blockdev-backup and blockdev-mirror under their names; an option that has no meaning in the
chosen mode is refused with the reason, never accepted and ignored.
"""

from __future__ import annotations

from pynbd.daemon.blockjobs import job_id_of
from pynbd.daemon.core import Daemon
from pynbd.daemon.jobs import refuse_job_node, start_in_transaction, sync_bitmap
from pynbd.daemon.registry import action, command_from_action
from pynbd.graph.transaction import Transaction
from pynbd.jobs.copy import ERROR_POLICIES
from pynbd.jobs.copyjob import BITMAP_MODES, CONVERGE, DEFAULT_GRANULARITY, MODES, POINT_IN_TIME, SYNC_MODES, CopyJob
from pynbd.qmp.protocol import QMPError

COPY_SPEC = {
    "*job-id": "str",
    "device": "str",
    "target": "str",
    "mode": MODES,
    "sync": SYNC_MODES,
    "*bitmap": "str",
    "*bitmap-mode": BITMAP_MODES,
    "*speed": "uint",
    "*granularity": "uint",
    "*copy-mode": ("background", "write-blocking"),
    "*pivot": "bool",
    "*on-source-error": ERROR_POLICIES,
    "*on-target-error": ERROR_POLICIES,
    "*filter-node-name": "str",
    "*auto-finalize": "bool",
    "*auto-dismiss": "bool",
}

#: Options of converge mode only, and why point-in-time mode has no use for them.
CONVERGE_ONLY = {
    "granularity": "copy-before-write works in the target's clusters",
    "copy-mode": "guest writes never reach the target, only the data they overwrite",
    "pivot": "the target is a copy of the past, nothing can switch over to it",
}


def refuse_for_mode(args: dict) -> None:
    """Refuse what the mode has no use for (each with its reason)."""
    mode, sync = args["mode"], args["sync"]
    if mode == POINT_IN_TIME:
        for name, why in CONVERGE_ONLY.items():
            if name in args:
                raise QMPError(f"Parameter '{name}' is not accepted in mode 'point-in-time': {why}")
        return
    if sync == "incremental":
        raise QMPError(
            "Sync mode 'incremental' is not accepted in mode 'converge': it clears the bitmap at the end, "
            "but a converge copy also copies what guests write meanwhile, so the target never matches the "
            "bitmap's point in time; use sync 'bitmap' with bitmap-mode 'never'"
        )
    if "bitmap" in args and sync != "bitmap":
        raise QMPError(
            f"A bitmap cannot be used with sync mode '{sync}' in mode 'converge': it would only be held busy"
        )
    if "bitmap-mode" in args and args["bitmap-mode"] != "never":
        raise QMPError(
            f"Bitmap sync mode '{args['bitmap-mode']}' is not accepted in mode 'converge': the target ends "
            "equal to the source at completion, not at the bitmap's point in time; use 'never'"
        )


def check_granularity(args: dict) -> int:
    granularity = args.get("granularity", DEFAULT_GRANULARITY)
    if granularity < 512 or granularity > 64 * 1024 * 1024 or granularity & (granularity - 1):
        raise QMPError("Invalid parameter 'granularity': expecting a power of two between 512 B and 64 MiB")
    return granularity


@action("x-blockdev-copy", COPY_SPEC)
async def copy_action(daemon: Daemon, args: dict, tran: Transaction):
    source, target = daemon.node(args["device"]), daemon.node(args["target"])
    mode = args["mode"]
    refuse_for_mode(args)
    if source is target:
        raise QMPError("Can't copy a node into itself")
    refuse_job_node(daemon, source)
    refuse_job_node(daemon, target)
    if mode == CONVERGE and target.parents:
        # a converge target is written by the job alone until it pivots (as blockdev-mirror)
        raise QMPError(f"Node '{target.node_name}' is busy: in use as a target or by a user")
    job_id = job_id_of(daemon, args)
    bitmap, bitmap_mode = sync_bitmap(source, args)
    if args.get("filter-node-name") in daemon.graph.nodes:
        raise QMPError(f"Duplicate nodes with node-name='{args['filter-node-name']}'")
    job = CopyJob(
        job_id,
        daemon.graph,
        source,
        target,
        mode,
        args["sync"],
        bitmap=bitmap,
        bitmap_mode=bitmap_mode or "on-success",
        granularity=check_granularity(args),
        filter_node_name=args.get("filter-node-name"),
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        pivot=args.get("pivot", True),
        write_blocking=args.get("copy-mode") == "write-blocking",
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
        speed=args.get("speed", 0),
    )
    return start_in_transaction(daemon, job, tran)


command_from_action("x-blockdev-copy")
