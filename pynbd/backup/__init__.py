"""``pynbd backup``: pull full and incremental backups from NBD exports into a chain of qcow2 files.

The role virtnbdbackup plays for libvirt, for any export that offers ``base:allocation`` and, for
incremental runs, ``qemu:dirty-bitmap:NAME`` (pynbd daemon, qemu-storage-daemon, qemu-nbd -B).
``pull`` writes the backups through the qcow2 driver with the copy engine of ``pynbd copy``;
``verify`` reads a chain back through the qcow2 driver and compares it with the export.
"""

from pynbd.backup.pull import BackupError, BackupOptions, BackupResult, full_backup, incremental_backup
from pynbd.backup.verify import VerifyResult, verify_chain

__all__ = [
    "BackupError",
    "BackupOptions",
    "BackupResult",
    "VerifyResult",
    "full_backup",
    "incremental_backup",
    "verify_chain",
]
