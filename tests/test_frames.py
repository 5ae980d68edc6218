"""The frame allocator's guards: an accounting slip is a clear error, and the table is left as it was."""
from __future__ import annotations

import numpy as np
import pytest

from proto.layout import (FRAME_ANON, FRAME_FREE, FRAME_KSM, FRAME_RESERVED, FTH_FREE_TOP, PAGE_SIZE, ZERO_PFN, FrameTable,
                          Segment, create_lock_file, new_run_name, seg_name, unlink_lock_file)
from workers.runtime.frames import FrameAccountingError, FrameAllocator, OutOfFrames, ShmLock
from workers.actors.supervisor import run_entries

NFRAMES = 16


def _allocator(n: int):
    """A formatted allocator over n frames of a run of its own; nothing of the run left after."""
    run = new_run_name()
    create_lock_file(run)
    seg = Segment.create(seg_name(run, "frametab"), FrameTable.size_for(n))
    lock = ShmLock.frame_lock(run)
    a = FrameAllocator(FrameTable(seg, n), np.zeros(n * PAGE_SIZE, dtype=np.uint8), lock)
    a.format()
    yield a
    lock.close()
    del a
    seg.close()
    Segment.unlink(seg.name)
    unlink_lock_file(run)
    assert run_entries(run) == []


@pytest.fixture
def alloc():
    yield from _allocator(NFRAMES)


def table(a: FrameAllocator) -> tuple:
    ft = a.ft
    return tuple(x.copy() for x in (ft.hdr, ft.mapcount, ft.flags, ft.free_stack, ft.stable))


def assert_same(before: tuple, after: tuple) -> None:
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


def test_alloc_put_get_round_trip(alloc):
    free0 = alloc.nr_free
    assert free0 == NFRAMES - 1
    pfns = alloc.alloc(3)
    assert pfns.tolist() == [1, 2, 3] and alloc.nr_free == free0 - 3
    assert alloc.ft.mapcount[pfns].tolist() == [1, 1, 1]
    alloc.get(pfns[:1])
    assert alloc.put(np.array([1, 1, 2, ZERO_PFN])) == 2       # 1 loses both mappings, 2 its only one
    assert alloc.ft.flags[[1, 2, 3]].tolist() == [FRAME_FREE, FRAME_FREE, FRAME_ANON]
    one = alloc.alloc_one()
    assert one == 2                                             # freed last, popped first
    alloc.put_one(one)
    alloc.put_one(ZERO_PFN)
    assert alloc.put(pfns[2:]) == 1 and alloc.nr_free == free0


def test_double_free_is_refused(alloc):
    pfn = alloc.alloc_one()
    alloc.put_one(pfn)
    before = table(alloc)
    with pytest.raises(FrameAccountingError, match=rf"put of a frame with no mapping left: pfn {pfn} "
                                                   r"\(mapcount 0, flags 0x0\)"):
        alloc.put_one(pfn)
    assert_same(before, table(alloc))
    with pytest.raises(FrameAccountingError, match=rf"put drops more mappings than frames have: pfn {pfn} "
                                                   r"\(mapcount 0, flags 0x0\) dropped 1x"):
        alloc.put(np.array([pfn]))
    assert_same(before, table(alloc))


def test_over_put_is_refused_and_nothing_is_dropped(alloc):
    a, b = alloc.alloc(2).tolist()
    alloc.get(np.array([a]))                                    # a: mapcount 2, b: 1
    before = table(alloc)
    with pytest.raises(FrameAccountingError, match=rf"pfn {a} \(mapcount 2, flags 0x1\) dropped 3x$"):
        alloc.put(np.array([a, a, a, b]))
    assert_same(before, table(alloc))
    with pytest.raises(FrameAccountingError, match=rf"pfn {b} \(mapcount 1, flags 0x1\) dropped 2x$"):
        alloc.put(np.array([a, b, b]))                          # a would be fine: it is not touched either
    assert_same(before, table(alloc))


def test_out_of_range_pfns_are_refused(alloc):
    alloc.alloc(2)
    before = table(alloc)
    for bad in (-1, NFRAMES):
        with pytest.raises(FrameAccountingError, match=rf"pfn\(s\) \[{bad}\] out of range"):
            alloc.put(np.array([1, bad]))
        with pytest.raises(FrameAccountingError, match="out of range"):
            alloc.put_one(bad)
        with pytest.raises(FrameAccountingError, match="out of range"):
            alloc.get(np.array([bad]))
    assert_same(before, table(alloc))


def test_get_of_a_free_frame_is_refused(alloc):
    a = alloc.alloc_one()
    free = a + 1
    before = table(alloc)
    with pytest.raises(FrameAccountingError, match=rf"get of free frame\(s\): pfn {free} \(mapcount 0"):
        alloc.get(np.array([a, free]))
    assert_same(before, table(alloc))


def test_a_frame_on_the_free_stack_twice_is_never_handed_out_twice(alloc):
    ft = alloc.ft
    top = int(ft.hdr[FTH_FREE_TOP])
    ft.free_stack[top] = ft.free_stack[top - 1]                 # a slip: frame 1 pushed a second time
    ft.hdr[FTH_FREE_TOP] = top + 1
    before = table(alloc)
    with pytest.raises(FrameAccountingError, match=r"free stack holds pfn\(s\) \[1\] more than once"):
        alloc.alloc(3)
    assert_same(before, table(alloc))
    assert alloc.alloc_one() == 1
    before = table(alloc)
    with pytest.raises(FrameAccountingError, match=r"free stack holds a frame in use: pfn 1 \(mapcount 1, flags 0x1\)"):
        alloc.alloc_one()
    assert_same(before, table(alloc))
    with pytest.raises(FrameAccountingError, match=r"free stack holds frames in use: pfn 1 \(mapcount 1"):
        alloc.alloc(2)
    assert_same(before, table(alloc))


def test_out_of_frames_is_still_enomem(alloc):
    alloc.alloc(NFRAMES - 1)
    before = table(alloc)
    with pytest.raises(OutOfFrames, match="out of frames: wanted 1, 0 free"):
        alloc.alloc_one()
    with pytest.raises(OutOfFrames, match="out of frames: wanted 2, 0 free"):
        alloc.alloc(2)
    assert_same(before, table(alloc))


def test_pin_ksm_takes_a_reference_only_on_the_live_ksm_page(alloc):
    k = alloc.alloc_one(FRAME_KSM)
    alloc.ft.stable[k] = 7
    assert alloc.pin_ksm(k, 7) and alloc.ft.mapcount[k] == 2
    assert not alloc.pin_ksm(k, 8)
    assert alloc.put(np.array([k, k])) == 1
    assert not alloc.pin_ksm(k, 7)                              # freed: no reference on a free frame


# ---- a fault handler's free-frame reserve (FrameAllocator.keep_reserve)
class _NoLock:
    """The frame lock of an allocator that must not take it."""

    def __enter__(self):
        raise AssertionError("the frame lock was taken")

    def __exit__(self, *exc):
        return False


@pytest.fixture
def big_alloc():
    yield from _allocator(128)


def test_reserve_hands_out_the_stacks_frames_in_its_order_without_the_frame_lock(big_alloc):
    a = big_alloc
    free0 = a.nr_free
    a.keep_reserve(4)
    assert a.alloc_one() == 1                       # under the lock, and 4 more taken aside
    assert a.reserve == [5, 4, 3, 2] and a.ft.hdr[FTH_FREE_TOP] == free0 - 5 and a.nr_free == free0 - 1
    assert a.ft.flags[[2, 3, 4, 5]].tolist() == [FRAME_RESERVED] * 4 and a.ft.mapcount[[2, 3, 4, 5]].tolist() == [0] * 4
    lock, a.lock = a.lock, _NoLock()
    try:
        assert [a.alloc_one() for _ in range(4)] == [2, 3, 4, 5]    # what the stack would have handed out
    finally:
        a.lock = lock
    assert a.reserve == [] and a.nr_free == free0 - 5
    assert a.ft.flags[[2, 3, 4, 5]].tolist() == [FRAME_ANON] * 4 and a.ft.mapcount[[2, 3, 4, 5]].tolist() == [1] * 4
    assert a.alloc_one() == 6 and a.reserve == [10, 9, 8, 7]      # refilled under the lock


def test_reserve_given_back_leaves_the_table_exactly_as_formatted(big_alloc):
    a = big_alloc
    before = table(a)
    a.keep_reserve(4)
    pfn = a.alloc_one()
    assert a.release_reserve() == 4 and a.reserve == [] and a.nr_free == 127 - 1
    a.put_one(pfn)
    assert a.nr_free == 127 and a.release_reserve() == 0
    assert_same(before, table(a))                   # the free stack in its own order again


def test_out_of_frames_first_takes_the_own_reserve_back(big_alloc):
    a = big_alloc
    a.keep_reserve(8)
    a.alloc_one()
    assert len(a.reserve) == 8 and a.ft.hdr[FTH_FREE_TOP] == 127 - 9
    pfns = a.alloc(127 - 1)                         # more than the stack holds: the reserve goes back first
    assert len(pfns) == 126 and a.reserve == [] and a.nr_free == 0
    with pytest.raises(OutOfFrames):
        a.alloc_one()
    assert a.put(pfns) == 126 and a.nr_free == 126


def test_no_reserve_is_taken_near_out_of_memory(big_alloc):
    a = big_alloc
    a.keep_reserve(16)                              # 8 batches of 16 = 128: more than the 127 free frames
    assert a.alloc_one() == 1 and a.reserve == [] and a.ft.hdr[FTH_FREE_TOP] == 126


def test_a_reserve_is_taken_while_min_free_frames_stay_free_and_not_below(big_alloc):
    """keep_reserve(batch, min_free) (the checker's small worlds): a reserve once min_free frames stay on
    the free stack after the allocation and the reserve, none one frame short; a min_free below the
    batch is refused."""
    a = big_alloc
    with pytest.raises(ValueError, match="a reserve of 8 frames taken while only 4 are free"):
        a.keep_reserve(8, min_free=4)
    a.alloc(127 - 7)                                # 7 free: the next one-frame allocation leaves 6
    a.keep_reserve(2, min_free=5)
    one = a.alloc_one()
    assert a.reserve == [] and a.ft.hdr[FTH_FREE_TOP] == 6
    a.put_one(one)                                  # (7 free again)
    a.keep_reserve(2, min_free=4)
    a.alloc_one()
    assert len(a.reserve) == 2 and a.ft.hdr[FTH_FREE_TOP] == 4 and a.nr_free == 6


def test_near_out_of_memory_every_reserve_drains_and_another_allocation_gets_its_frames(big_alloc):
    """Two handlers' allocators keep reserves (keep_reserve(4, min_free=32): taken while 32 frames stay
    on the free stack, given back once fewer are there) and a third (ksmd's) takes frames in bulk.
    Once the stack runs low the busy handler's reserve goes back at its next allocation, the idle one's
    at its tick (drain_local_pages); then the bulk allocation gets every free frame, those the two held
    aside included, and only then is memory out."""
    a = big_alloc
    a.keep_reserve(4, min_free=32)
    idle = FrameAllocator(a.ft, a.mem, a.lock)      # a second handler's view (another process's, in a run)
    idle.keep_reserve(4, min_free=32)
    bulk = FrameAllocator(a.ft, a.mem, a.lock)      # no reserve
    assert a.alloc_one() == 1 and a.reserve == [5, 4, 3, 2]
    assert idle.alloc_one() == 6 and idle.reserve == [10, 9, 8, 7]
    assert idle.drain_local_pages() == 0            # plenty free: the reserve stays
    assert a.ft.hdr[FTH_FREE_TOP] == 127 - 10
    bulk.alloc(117 - 15)                            # the stack runs low: 15 left, below 32
    assert a.alloc_one() == 2 and a.reserve == [] and a.ft.hdr[FTH_FREE_TOP] == 15 + 4 - 1   # its 4 back, 1 off
    assert idle.reserve == [10, 9, 8, 7]            # (still aside until its tick)
    assert idle.drain_local_pages() == 4 and idle.reserve == [] and (a.ft.flags == FRAME_RESERVED).sum() == 0
    assert a.nr_free == a.ft.hdr[FTH_FREE_TOP] == 22
    last = bulk.alloc(22)                           # every free frame, the 7 held aside included
    assert set(last.tolist()) >= {3, 4, 5, 7, 8, 9, 10} and a.nr_free == 0
    with pytest.raises(OutOfFrames):
        a.alloc_one()


def test_a_repair_takes_every_reserve_back_and_its_holder_learns_it(big_alloc):
    a = big_alloc
    a.keep_reserve(4)
    pfn = a.alloc_one()
    other = FrameAllocator(a.ft, a.mem, a.lock)     # a second handler's view (another process's, in a run)
    other.keep_reserve(4)
    assert other.alloc_one() == 6 and other.reserve == [10, 9, 8, 7]
    maps = np.zeros(128, dtype=np.int64)
    maps[[pfn, 6]] = 1                              # the PTEs map the two frames handed out
    done = a.rebuild(maps)
    assert done == {"freed": 0, "recounted": 0, "revived": 0, "free_stack_changed": 0, "fixes": [],
                    "reserves_returned": 8}
    assert a.nr_free == 127 - 2 and (a.ft.flags == FRAME_RESERVED).sum() == 0
    assert a.alloc_one() == 2 and a.reserve == [7, 5, 4, 3]     # the old reserves forgotten, new ones taken
    assert other.alloc_one() == 8 and other.reserve == [12, 11, 10, 9]
    assert a.release_reserve() == 4 and other.release_reserve() == 4 and a.nr_free == 127 - 4


def test_a_reserved_frame_cannot_be_put_or_got(big_alloc):
    a = big_alloc
    a.keep_reserve(4)
    a.alloc_one()
    before = table(a)
    with pytest.raises(FrameAccountingError):
        a.put_one(2)
    with pytest.raises(FrameAccountingError):
        a.put(np.array([3]))
    with pytest.raises(FrameAccountingError):
        a.get(np.array([4]))
    assert_same(before, table(a))
