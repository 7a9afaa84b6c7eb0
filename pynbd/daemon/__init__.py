"""The QMP-driven daemon (see core.py)."""


def load_commands() -> None:
    """Import every command module so that they register their QMP handlers."""
    from pynbd.daemon import bitmaps, blockdev, blockjobs, exports, fleecing, formats, jobs, misc, objects  # noqa: F401,E501
