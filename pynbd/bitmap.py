"""Dirty bitmaps: one bit per granularity-sized cluster of a disk.

Backed by ``bitarray`` (a C extension) so that marking a range, counting dirty bits and finding the
next change of value are C loops: a 2 TiB disk at 64 KiB granularity is 32 Mi bits (4 MiB), and
its dirty extents are found run by run with ``find``, never bit by bit. The bit order is
little-endian within each byte, which is exactly how qcow2 stores bitmap data on disk.
"""

from __future__ import annotations

from bitarray import bitarray

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
DEFAULT_GRANULARITY = 64 * 1024


def check_granularity(granularity: int) -> None:
    if granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY or granularity & (granularity - 1):
        raise ValueError(f"granularity must be a power of two from 512 B to 2 GiB, not {granularity}")


class DirtyBitmap:
    """Which clusters of a disk of ``size`` bytes changed; ranges are in bytes, rounded out to clusters."""

    def __init__(self, size: int, granularity: int = DEFAULT_GRANULARITY) -> None:
        check_granularity(granularity)
        self.size = size
        self.granularity = granularity
        self.bits = bitarray(self.cluster_count(size, granularity), endian="little")
        self.bits.setall(0)

    @staticmethod
    def cluster_count(size: int, granularity: int) -> int:
        return (size + granularity - 1) // granularity

    def _clusters(self, offset: int, length: int) -> tuple[int, int]:
        end = min(offset + length, self.size)
        return offset // self.granularity, (end + self.granularity - 1) // self.granularity

    def set_range(self, offset: int, length: int) -> None:
        if length > 0:
            first, last = self._clusters(offset, length)
            self.bits[first:last] = 1

    def reset_range(self, offset: int, length: int) -> None:
        """Clear the clusters wholly inside the range (a partial cluster stays dirty)."""
        if length <= 0:
            return
        first = (offset + self.granularity - 1) // self.granularity
        end = min(offset + length, self.size)
        last = len(self.bits) if end == self.size else end // self.granularity
        if first < last:
            self.bits[first:last] = 0

    def clear(self) -> None:
        self.bits.setall(0)

    def fill(self) -> None:
        self.bits.setall(1)

    def is_dirty(self, offset: int) -> bool:
        return bool(self.bits[offset // self.granularity])

    def count(self) -> int:
        """Dirty bytes, as qemu's ``count`` reports them (whole clusters, clipped to the disk size)."""
        dirty = self.bits.count(1)
        if dirty and self.bits[-1] and self.size % self.granularity:
            return dirty * self.granularity - (self.granularity - self.size % self.granularity)
        return dirty * self.granularity

    def merge(self, other: DirtyBitmap) -> None:
        if other.size != self.size:
            raise ValueError("bitmaps of different disk sizes cannot be merged")
        if other.granularity == self.granularity:
            self.bits |= other.bits
        else:
            for offset, length in other.dirty_ranges(0, other.size):
                self.set_range(offset, length)

    def copy(self) -> DirtyBitmap:
        twin = DirtyBitmap.__new__(DirtyBitmap)
        twin.size, twin.granularity, twin.bits = self.size, self.granularity, self.bits.copy()
        return twin

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, dirty) runs covering exactly ``[offset, offset+length)``, alternating."""
        end = min(offset + length, self.size)
        runs: list[tuple[int, bool]] = []
        pos = offset
        while pos < end:
            index = pos // self.granularity
            value = self.bits[index]
            nxt = self.bits.find(1 - value, index)
            run_end = end if nxt < 0 else min(end, nxt * self.granularity)
            runs.append((run_end - pos, bool(value)))
            pos = run_end
        return runs

    def dirty_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """(offset, length) of every dirty run in the range."""
        length = self.size - offset if length is None else length
        ranges, pos = [], offset
        for run, dirty in self.extents(offset, length):
            if dirty:
                ranges.append((pos, run))
            pos += run
        return ranges

    def to_bytes(self) -> bytes:
        return self.bits.tobytes()

    @classmethod
    def from_bytes(cls, size: int, granularity: int, data: bytes) -> DirtyBitmap:
        bitmap = cls(size, granularity)
        loaded = bitarray(endian="little")
        loaded.frombytes(bytes(data[: (len(bitmap.bits) + 7) // 8]))
        bitmap.bits[: len(loaded)] = loaded[: len(bitmap.bits)]
        return bitmap


class NodeBitmap:
    """A named dirty bitmap attached to a block node, with qemu's states.

    ``enabled`` (qemu: recording) bitmaps are marked by every write, zero and discard that reaches
    the node; ``busy`` ones (exported, or used by a job) may not be changed; ``persistent`` ones are
    stored in the qcow2 image; ``inconsistent`` ones were found IN_USE on disk and can only be
    removed. A backup job gives the bitmap a ``successor`` that records new writes while the job
    reads the frozen parent; as in qemu, the successor inherits the bitmap's state, so a disabled
    bitmap's successor records nothing (and the bitmap cannot be enabled while it is busy).
    """

    def __init__(
        self,
        name: str,
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        enabled: bool = True,
        persistent: bool = False,
        bitmap: DirtyBitmap | None = None,
    ) -> None:
        self.name = name
        self.bitmap = bitmap if bitmap is not None else DirtyBitmap(size, granularity)
        self.enabled = enabled
        self.persistent = persistent
        self.inconsistent = False
        self.busy_count = 0
        self.successor: DirtyBitmap | None = None

    @property
    def granularity(self) -> int:
        return self.bitmap.granularity

    @property
    def size(self) -> int:
        """The disk size the bitmap covers (that of its node when it was made)."""
        return self.bitmap.size

    @property
    def busy(self) -> bool:
        return self.busy_count > 0 or self.successor is not None

    def mark(self, offset: int, length: int) -> None:
        if not self.enabled:
            return
        (self.bitmap if self.successor is None else self.successor).set_range(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        return self.bitmap.extents(offset, length)

    def info(self) -> dict:
        """One entry of query-named-block-nodes' ``dirty-bitmaps`` (BlockDirtyInfo)."""
        info = {
            "name": self.name,
            "recording": self.enabled,
            "persistent": self.persistent,
            "busy": self.busy,
            "granularity": self.granularity,
            "count": self.bitmap.count(),
        }
        if self.inconsistent:
            info["inconsistent"] = True
        return info
