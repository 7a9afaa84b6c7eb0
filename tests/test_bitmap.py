"""The dirty bitmap's range arithmetic, which every backup's correctness rests on."""

import pytest

from pynbd.bitmap import DirtyBitmap

MiB = 1 << 20


def test_marking_rounds_out_to_whole_clusters():
    bitmap = DirtyBitmap(MiB, 64 * 1024)
    bitmap.set_range(70000, 10)
    assert bitmap.dirty_ranges() == [(65536, 65536)]
    assert bitmap.extents(0, MiB) == [(65536, False), (65536, True), (MiB - 131072, False)]
    assert bitmap.count() == 65536


def test_reset_clears_only_whole_clusters():
    bitmap = DirtyBitmap(MiB, 64 * 1024)
    bitmap.fill()
    bitmap.reset_range(1000, 65536 * 2)
    assert bitmap.dirty_ranges() == [(0, 65536), (131072, MiB - 131072)]


def test_count_clips_the_last_partial_cluster():
    bitmap = DirtyBitmap(1000, 512)
    bitmap.set_range(900, 1)
    assert bitmap.count() == 1000 - 512


def test_round_trip_through_qcow2_bit_order():
    bitmap = DirtyBitmap.from_bytes(MiB, 65536, b"\x05\x80")
    assert bitmap.dirty_ranges() == [(0, 65536), (131072, 65536), (15 * 65536, 65536)]
    assert bitmap.to_bytes() == b"\x05\x80"


def test_merge_across_granularities():
    fine, coarse = DirtyBitmap(MiB, 512), DirtyBitmap(MiB, 65536)
    fine.set_range(4096, 512)
    coarse.merge(fine)
    assert coarse.dirty_ranges() == [(0, 65536)]


def test_large_disk_is_found_run_by_run():
    bitmap = DirtyBitmap(2 << 40, 64 * 1024)  # 2 TiB: 32 Mi bits
    bitmap.set_range(1 << 40, 3 * 65536)
    assert bitmap.dirty_ranges() == [(1 << 40, 3 * 65536)]
    assert len(bitmap.extents(0, 2 << 40)) == 3


@pytest.mark.parametrize("granularity", [256, 3 * 512, 1 << 32])
def test_bad_granularity_is_refused(granularity):
    with pytest.raises(ValueError, match="power of two"):
        DirtyBitmap(MiB, granularity)
