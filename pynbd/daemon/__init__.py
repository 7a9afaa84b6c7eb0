"""The QMP-driven daemon (see core.py)."""


def load_commands() -> None:
    """Import every command module so that they register their QMP handlers."""
    from pynbd.daemon import (  # noqa: F401
        bitmaps,
        blockdev,
        blockjobs,
        copyjob,
        debug,
        exports,
        filters,
        fleecing,
        formats,
        jobs,
        misc,
        objects,
    )
