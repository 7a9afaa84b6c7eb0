"""block-commit, block-stream, blockdev-mirror and blockdev-snapshot (qemu 7.2 arguments)."""

from __future__ import annotations

import logging

from pynbd.daemon.core import Daemon
from pynbd.daemon.registry import action, command, command_from_action
from pynbd.graph.core import GraphError, can_replace, filtered_or_cow_child, skip_filters
from pynbd.graph.reopen import restore, set_read_only
from pynbd.graph.transaction import Transaction
from pynbd.jobs.commit import CommitJob
from pynbd.jobs.copy import ERROR_POLICIES
from pynbd.jobs.core import JobStatus
from pynbd.jobs.mirror import MirrorJob
from pynbd.jobs.stream import StreamJob
from pynbd.nodes.base import BlockError, BlockNode
from pynbd.qmp.protocol import QMPError

log = logging.getLogger("pynbd.daemon")

JOB_COMMON = {"*job-id": "str", "*speed": "uint", "*auto-finalize": "bool", "*auto-dismiss": "bool"}


def chain_of(node: BlockNode) -> list[BlockNode]:
    nodes = [node]
    while (link := filtered_or_cow_child(nodes[-1])) is not None:
        nodes.append(link.node)
    return nodes


def _job_kwargs(args: dict) -> dict:
    return {
        "auto_finalize": args.get("auto-finalize", True),
        "auto_dismiss": args.get("auto-dismiss", True),
        "speed": args.get("speed", 0),
    }


def job_id_of(daemon: Daemon, args: dict) -> str:
    """qemu defaults the job id to the device's BlockBackend name, which a node in a storage daemon
    does not have: without ``job-id`` the command fails there, and so it does here."""
    job_id = args.get("job-id", "")
    if not job_id:
        raise QMPError("Invalid job ID ''")
    if job_id in daemon.jobs.jobs:
        raise QMPError(f"Job ID '{job_id}' already in use")
    return job_id


def _start(daemon: Daemon, job, tran: Transaction | None = None) -> None:
    own = tran is None
    tran = tran or Transaction()
    try:
        job.install(tran)
    except BaseException:
        tran.abort()
        raise
    if own:
        tran.commit()
    daemon.jobs.start(job)


@command(
    "block-commit",
    {
        **JOB_COMMON,
        "device": "str",
        "*base-node": "str",
        "*base": "str",
        "*top-node": "str",
        "*top": "str",
        "*backing-file": "str",
        "*backing-mask-protocol": "bool",
        "*on-error": ERROR_POLICIES,
        "*filter-node-name": "str",
        "*x-discard-committed": "bool",
    },
)
async def block_commit(daemon: Daemon, args: dict) -> None:
    device = daemon.node(args["device"])
    chain = chain_of(device)
    top = daemon.node(args["top-node"]) if "top-node" in args else device
    if top not in chain:
        raise QMPError(f"'{top.node_name}' is not in the backing chain of '{device.node_name}'")
    below_top = chain[chain.index(top) + 1 :]
    if not below_top:
        raise QMPError(f"Top image '{top.node_name}' has no backing file to commit into")
    base = daemon.node(args["base-node"]) if "base-node" in args else below_top[-1]
    if base is top:
        raise QMPError("Top and base cannot be the same node")
    if base not in below_top:
        raise QMPError(f"'{top.node_name}' is not above base '{base.node_name}'")
    job_id = job_id_of(daemon, args)
    refuse_second_commit_into(daemon, base)
    discard_committed = args.get("x-discard-committed", False)
    if top is device:  # active commit: a mirror into the base, then a pivot
        job = MirrorJob(
            job_id,
            daemon.graph,
            device,
            base,
            sync="full",
            filter_node_name=args.get("filter-node-name"),
            on_source_error=args.get("on-error", "report"),
            on_target_error=args.get("on-error", "report"),
            base=base,
            discard_committed=discard_committed,
            **_job_kwargs(args),
        )
        try:
            await _reopen_for(daemon, job, base)
            _start(daemon, job)
        except BaseException:  # the job never ran: nothing else will put them back
            await _undo_reopen(daemon, job)
            raise
        return
    overlay = next((n for n in chain[: chain.index(top)] if (lk := filtered_or_cow_child(n)) and lk.node is top), None)
    job = CommitJob(
        job_id,
        daemon.graph,
        filtered_or_cow_child(overlay),
        top,
        base,
        on_error=args.get("on-error", "report"),
        discard_committed=discard_committed,
        backing_file=args.get("backing-file"),
        **_job_kwargs(args),
    )
    await _start_or_restore(daemon, job)


def refuse_second_commit_into(daemon: Daemon, base: BlockNode) -> None:
    """Two commits into one base would both write it: two overlays of a shared layer committing it,
    or their own data, into the same base. Their chains may share only links that stay unchanged,
    so the freeze rules let both through; qemu refuses the second with its op blockers. An
    intermediate commit takes its write permission on the base only once it runs, so without this
    the second would be accepted and then fail (or, with an active commit, write alongside)."""
    for other in daemon.jobs.jobs.values():
        if (
            isinstance(other, (CommitJob, MirrorJob))
            and other.base is base
            and other.status not in (JobStatus.CONCLUDED, JobStatus.NULL)
        ):
            raise QMPError(f"Node '{base.node_name}' is busy: job '{other.id}' commits into it")


async def _start_or_restore(daemon: Daemon, job: MirrorJob | CommitJob | StreamJob) -> None:
    """Start a job that reopened a node read-write for itself; if it is refused, the node goes
    back to read-only, so a refused command leaves nothing changed."""
    try:
        _start(daemon, job)
    except BaseException:
        await restore(daemon.graph, job.reopened, True)
        raise


async def _reopen_for(daemon: Daemon, job: MirrorJob, base: BlockNode) -> None:
    """Active commit writes the base (read-only as a backing file): reopen it read-write now and,
    if the job does not pivot to it, read-only again when it ends. With hole punching the layers
    above the base too (read-only again when the job ends, pivot or not)."""
    job.reopened = await set_read_only(daemon.graph, base, False)
    if job.punch is not None:
        await job.punch.make_writable()


async def _undo_reopen(daemon: Daemon, job: MirrorJob) -> None:
    if job.punch is not None:
        await job.punch.restore()
    if job.reopened:
        await restore(daemon.graph, job.reopened, True)


@command(
    "block-stream",
    {
        **JOB_COMMON,
        "device": "str",
        "*base": "str",
        "*base-node": "str",
        "*backing-file": "str",
        "*bottom": "str",
        "*on-error": ERROR_POLICIES,
        "*filter-node-name": "str",
    },
)
async def block_stream(daemon: Daemon, args: dict) -> None:
    top = daemon.node(args["device"])
    chain = chain_of(top)
    base = None
    if "base-node" in args:
        base = daemon.node(args["base-node"])
    elif "bottom" in args:
        bottom = daemon.node(args["bottom"])
        if bottom not in chain:
            raise QMPError(f"Node '{bottom.node_name}' is not in the backing chain of '{top.node_name}'")
        index = chain.index(bottom)
        base = chain[index + 1] if index + 1 < len(chain) else None
    if base is not None and base not in chain[1:]:
        raise QMPError(f"Node '{base.node_name}' is not a backing image of '{top.node_name}'")
    job = StreamJob(
        job_id_of(daemon, args),
        daemon.graph,
        top,
        base,
        filter_node_name=args.get("filter-node-name"),
        on_error=args.get("on-error", "report"),
        backing_file=args.get("backing-file"),
        **_job_kwargs(args),
    )
    job.check_links()  # a refusal comes before the top is touched
    if top.read_only:  # as qemu's stream_start: the top is written, so it is reopened read-write
        job.reopened = await set_read_only(daemon.graph, top, False)
    await _start_or_restore(daemon, job)


@command(
    "blockdev-mirror",
    {
        **JOB_COMMON,
        "device": "str",
        "target": "str",
        "*replaces": "str",
        "sync": ("full", "top", "none"),
        "*granularity": "uint",
        "*buf-size": "uint",
        "*on-source-error": ERROR_POLICIES,
        "*on-target-error": ERROR_POLICIES,
        "*filter-node-name": "str",
        "*copy-mode": ("background", "write-blocking"),
    },
)
async def blockdev_mirror(daemon: Daemon, args: dict) -> None:
    source, target = daemon.node(args["device"]), daemon.node(args["target"])
    replaces = node_to_replace(daemon, source, args["replaces"]) if "replaces" in args else None
    if skip_filters(source) is skip_filters(target):
        raise QMPError("Can't mirror node into itself")
    if target.parents:
        raise QMPError(f"Node '{target.node_name}' is busy: in use as a target or by a user")
    granularity = args.get("granularity", 65536)
    if granularity < 512 or granularity > 64 * 1024 * 1024 or granularity & (granularity - 1):
        raise QMPError("Invalid parameter 'granularity': expecting a power of two between 512 B and 64 MiB")
    job = MirrorJob(
        job_id_of(daemon, args),
        daemon.graph,
        source,
        target,
        sync=args["sync"],
        granularity=granularity,
        filter_node_name=args.get("filter-node-name"),
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        replaces=replaces,
        write_blocking=args.get("copy-mode") == "write-blocking",
        **_job_kwargs(args),
    )
    _start(daemon, job)


def node_to_replace(daemon: Daemon, source: BlockNode, name: str) -> BlockNode:
    """``replaces`` as qemu 7.2 checks it (check_to_replace_node): the node the pivot will replace
    by the target must be the source or lie below it through filters only. Anything else (an
    unrelated node, the target, a node under a format driver) would change what its users read
    at the pivot."""
    node = daemon.graph.nodes.get(name)
    if node is None:
        raise QMPError(f"Failed to find node with node-name='{name}'")
    if not can_replace(source, node):
        raise QMPError(
            f"Cannot replace '{name}' by a node mirrored from '{source.node_name}', because it cannot be "
            "guaranteed that doing so would not lead to an abrupt change of visible data"
        )
    return node


@action("blockdev-snapshot", {"node": "str", "overlay": "str"})
async def snapshot_action(daemon: Daemon, args: dict, tran: Transaction):
    """Put ``overlay`` (a node without backing) on top of ``node``: it becomes the overlay's
    backing and every user of ``node`` now uses the overlay. Once the whole transaction has
    committed, ``node`` is reopened read-only, as qemu does: it gives up its write lock, so the
    image can be checked or copied by other processes while the overlay takes the writes."""
    node, overlay = daemon.node(args["node"]), daemon.node(args["overlay"])
    if "backing" in overlay.children:
        raise QMPError(f"The overlay already has a backing image: '{overlay.node_name}'")
    if overlay.parents:
        raise QMPError(f"The overlay '{overlay.node_name}' is already in use")
    if overlay.read_only:
        raise QMPError(f"The overlay '{overlay.node_name}' is not writable")
    if not overlay.supports_backing:
        raise QMPError(f"The overlay does not support backing images: '{overlay.node_name}'")
    link = daemon.graph.attach_child(overlay, "backing", node)
    tran.add(abort=lambda: daemon.graph.detach(link))
    daemon.graph.replace_node(node, overlay, keep=[link], tran=tran)

    async def old_layer_read_only() -> None:
        # qemu (external_snapshot_commit) does this after the commit and ignores a failure: the
        # snapshot itself has been taken either way
        try:
            await set_read_only(daemon.graph, node, True, inherits=lambda n: n.node_name not in daemon.monitor_owned)
        except (BlockError, GraphError, OSError) as exc:
            log.warning("blockdev-snapshot: %s stays read-write: %s", node.node_name, exc)

    return None if node.read_only else old_layer_read_only


command_from_action("blockdev-snapshot")
