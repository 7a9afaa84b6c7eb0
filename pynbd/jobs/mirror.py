"""Mirror (``blockdev-mirror``) and active commit (``block-commit`` of the active layer).

Both are :class:`~pynbd.jobs.copyjob.CopyJob` in ``converge`` mode, under qemu's job types
``mirror`` and ``commit``: a ``mirror_top`` filter marks what guests write, the job copies what is
dirty until nothing is, reports ``ready``, keeps the target in step, and on ``complete`` copies
the last dirty ranges drained and pivots every user of the source to the target (see
jobs/copyjob.py for how it converges under a steady writer and why the pivot is drained). Active
commit is the same with the target being the source's own base, and the chain between them
frozen for the job's lifetime; the base is reopened read-write by the caller before the job
starts (:attr:`CopyJob.reopened`), and read-only again at the end unless the job pivoted to it.
With hole punching (``x-discard-committed``, pynbd/jobs/punch.py) each copied chunk is dropped
from the layers above the base once the base holds it (the caller reopens those layers too,
:attr:`CopyJob.punch`). ``replaces`` (blockdev-mirror) makes the pivot replace a node below the
source through filters only instead of the source.
"""

from __future__ import annotations

from pynbd.graph.core import BlockGraph
from pynbd.jobs.copyjob import CONVERGE, DEFAULT_GRANULARITY, CopyJob
from pynbd.nodes.base import BlockNode


class MirrorJob(CopyJob):
    job_type = "mirror"

    def __init__(
        self,
        job_id: str,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        sync: str = "full",
        granularity: int = DEFAULT_GRANULARITY,
        filter_node_name: str | None = None,
        on_source_error: str = "report",
        on_target_error: str = "report",
        base: BlockNode | None = None,
        discard_committed: bool = False,
        replaces: BlockNode | None = None,
        write_blocking: bool = False,
        **kwargs,
    ) -> None:
        if base is not None:
            self.job_type = "commit"
        super().__init__(
            job_id,
            graph,
            source,
            target,
            CONVERGE,
            sync,
            granularity=granularity,
            filter_node_name=filter_node_name,
            on_source_error=on_source_error,
            on_target_error=on_target_error,
            base=base,
            discard_committed=discard_committed,
            replaces=replaces,
            write_blocking=write_blocking,
            **kwargs,
        )


__all__ = ["MirrorJob"]
