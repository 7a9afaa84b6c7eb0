"""The backup job (``blockdev-backup``): a point-in-time copy job under qemu's job type ``backup``.

At start a copy-before-write filter is put above the source (every user of the source now writes
through it), so the target receives the data as it was at that instant. ``sync`` chooses what the
background loop copies: nothing (``none``: fleecing, the target is read by others), every cluster
(``full``), the clusters allocated in the top layer (``top``), or the clusters of a dirty bitmap
(``bitmap``, ``incremental``). The bitmap gets a successor that records writes during the job;
``bitmap-mode`` decides at the end whether the bitmap becomes the successor (abdicate) or takes
it back (reclaim). All of it is :class:`~pynbd.jobs.copyjob.CopyJob` in ``point-in-time`` mode.
"""

from __future__ import annotations

from pynbd.bitmap import NodeBitmap
from pynbd.graph.core import BlockGraph
from pynbd.jobs.copyjob import POINT_IN_TIME, SYNC_MODES, CopyJob
from pynbd.nodes.base import BlockNode


class BackupJob(CopyJob):
    job_type = "backup"

    def __init__(
        self,
        job_id: str,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        sync: str,
        bitmap: NodeBitmap | None = None,
        bitmap_mode: str = "on-success",
        filter_node_name: str | None = None,
        on_source_error: str = "report",
        on_target_error: str = "report",
        **kwargs,
    ) -> None:
        super().__init__(
            job_id,
            graph,
            source,
            target,
            POINT_IN_TIME,
            sync,
            bitmap=bitmap,
            bitmap_mode=bitmap_mode,
            filter_node_name=filter_node_name,
            on_source_error=on_source_error,
            on_target_error=on_target_error,
            **kwargs,
        )


__all__ = ["SYNC_MODES", "BackupJob"]
