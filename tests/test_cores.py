"""The protocol cores are exception-safe: whatever effect fails, locks and pins are released and no frame
is left allocated that nothing maps.

Each core runs on the checker's array-backed memory (the real FrameAllocator, FrameTable and MMView
classes) under a small synchronous driver whose secondary MMUs apply each message at once.  A first run
counts the effects; then, for every k, a fresh run throws an exception into the core at its k-th effect,
as the actors' driver does on a lock timeout or an allocator error.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from proto.layout import FRAME_FREE, FRAME_KSM, PAGE_SHIFT, PAGE_SIZE, PTE_PRESENT, PTE_YOUNG, USER_BASE, VM_READ
from proto.messages import FAULT_WRITE, Msg
from workers.check.world import KsmWorld
from workers.mm.effects import (MEM_EFFECTS, Alloc, Checksum, Compare, CopyPages, Get, Load, Lock, Notify, PinKsm,
                                  Reply, Store, TryLock, Unlock, WaitAcks, apply_mem)
from workers.mm.fault import handle_mm_fault
from workers.mm.vma import do_mprotect, dup_mmap, ksm_enable_merge_any, madvise_dontneed
from workers.mm.mmu_notifier import LocalNotify, SecondaryMMU, local_set_pte, page_referenced
from workers.runtime.frames import OutOfFrames
from workers.runtime.interp import Backend, run_sync


def run_effects(gen, perform):
    """Run a core through the one interpreter, each effect answered by perform(effect)."""
    b = Backend(None)
    b.fallback = perform
    return run_sync(gen, b)


class Injected(RuntimeError):
    pass


# the effects an actor's driver can fail: a lock wait timing out, the allocator (out of frames, an
# accounting error), a frame-table or page-table access
CAN_FAIL = frozenset({Lock, Alloc, Get, PinKsm, Load, CopyPages, Compare, Checksum})


def drive(w: KsmWorld, gen, throw_at: int = -1):
    """Run gen to its end, throwing into it at its throw_at-th effect that can fail; returns (effects that
    can fail seen, locks still held, whether a PTE was stored before the throw)."""
    held: set = set()
    n, stored, send, exc = 0, False, None, None
    while True:
        try:
            e = gen.throw(exc) if exc is not None else gen.send(send)
        except StopIteration:
            return n, held, stored
        except Injected:
            return n, held, stored
        send, exc = None, None
        if e.__class__ in CAN_FAIL:
            if n == throw_at:
                exc, n = Injected(f"effect {n}: {e!r}"), n + 1
                continue
            n += 1
        c = e.__class__
        if c in MEM_EFFECTS:
            stored |= c is Store
            send = apply_mem(w.mem, e)
        elif c in (TryLock, Lock):
            assert e.key not in held
            held.add(e.key)
            send = True
        elif c is Unlock:
            held.remove(e.key)
        elif c is Notify:
            v = w.vms[e.mm]
            for s in e.subs:
                v.subs[s].apply(e.type, e.entries)
            send = []
        elif c is WaitAcks:
            send = []
        elif c is Reply:        # a COW reply's PTEs: the faulting VM applies set_pte_at_notify on arrival
            if e.entries is not None:
                list(local_set_pte(list(w.vms[0].subs.values()), e.entries, w.mode))
            send = []
        elif c is LocalNotify:
            for sub in e.subs:
                sub.apply(e.type, e.entries)
        else:
            raise AssertionError(f"unexpected effect {e!r}")


def leaks(w: KsmWorld) -> list[int]:
    """Frames allocated (or pinned) beyond what the PTEs account for."""
    maps = w._mappings()
    mc = w.ft.mapcount.tolist()
    return [p for p in range(1, w.nframes) if mc[p] != maps[p]]


def mapped_frames(w: KsmWorld) -> set[int]:
    return {p for p, m in enumerate(w._mappings()) if m}


def merging_scan(mode):
    w = KsmWorld(mode, pace=False)          # warm: the next scan merges every page
    return w, w.scan.ksm_do_scan(w.scan.knobs["pages_to_scan"])


@pytest.mark.parametrize("mode", ["change_pte", "wrapped"])
def test_merge_releases_locks_and_pins_whatever_fails(mode):
    w, gen = merging_scan(mode)
    total, held, _ = drive(w, gen)
    assert not held and not leaks(w) and w.scan.c["pages_shared"] == 1
    for k in range(total):
        w, gen = merging_scan(mode)
        old = mapped_frames(w)
        _, held, stored = drive(w, gen, throw_at=k)
        assert not held, f"effect {k}: locks left held: {held}"
        assert all(w.ft.mapcount[p] >= m for p, m in enumerate(w._mappings())), f"effect {k}"
        ksm = [p for p in range(1, w.nframes) if w.ft.flags[p] & FRAME_KSM]
        assert all(w.ft.mapcount[p] == w._mappings()[p] for p in ksm), f"effect {k}: a pin or reference was not put back"
        assert set(leaks(w)) <= (old if stored else set()), f"effect {k}: frames {leaks(w)} leaked"


def cow_fault(mode):
    w, gen = merging_scan(mode)
    drive(w, gen)                                 # every page merged: a write now breaks COW
    mm = w.mem.mms[0]
    return w, handle_mm_fault(0, mm.npages, np.array([0]), FAULT_WRITE, mode)


@pytest.mark.parametrize("mode", ["change_pte", "wrapped", "invalidate"])
def test_cow_fault_releases_ptl_and_new_frames_whatever_fails(mode):
    w, gen = cow_fault(mode)
    total, held, _ = drive(w, gen)
    assert not held and not leaks(w)
    assert not w.ft.flags[int(w.mem.mms[0].pte[0]) >> PAGE_SHIFT] & FRAME_KSM     # the copy
    for k in range(total):
        w, gen = cow_fault(mode)
        before = w.mem.mms[0].pte.copy()
        old = mapped_frames(w)
        _, held, stored = drive(w, gen, throw_at=k)
        assert not held, f"effect {k}: ptl left held"
        # a new frame no PTE took is freed; an old one whose PTE changed is kept (a secondary MMU may
        # still map it until the acks are in: leaking it is the safe side)
        assert set(leaks(w)) <= (old if stored else set()), f"effect {k}: frames {leaks(w)} leaked"
        if not stored:
            assert (w.mem.mms[0].pte == before).all(), f"effect {k}: the page table changed"


def test_out_of_frames_changes_nothing():
    w, gen = cow_fault("change_pte")
    free = w.alloc.nr_free
    w.alloc.alloc(free, 1, zero=False)            # take every free frame
    before = (w.mem.mms[0].pte.copy(), w.ft.mapcount.copy())
    with pytest.raises(OutOfFrames):
        send = None
        held = set()
        while True:
            try:
                e = gen.send(send)
            except StopIteration:
                break
            send = None
            if e.__class__ in MEM_EFFECTS:
                try:
                    send = apply_mem(w.mem, e)
                except OutOfFrames as x:
                    e = gen.throw(x)          # the core's cleanup runs, then the error comes out
                    assert isinstance(e, Unlock)
                    held.discard(e.key)
                    gen.send(None)
            elif e.__class__ in (Lock, TryLock):
                held.add(e.key)
                send = True
    assert not held
    assert (w.mem.mms[0].pte == before[0]).all() and (w.ft.mapcount == before[1]).all()
    assert int(w.mem.mms[0].pte[0]) & PTE_PRESENT and USER_BASE and FRAME_FREE == 0


def _own_op(mode, which):
    """A merged world and one of the VM's own operations on vm0 (core/mm.py)."""
    w, gen = merging_scan(mode)
    drive(w, gen)
    subs = list(w.vms[0].subs.values())
    if which == "fork":
        w._new_mm(len(w.vms), w.mem.mms[0].npages)
        return w, dup_mmap(0, len(w.vms), subs)
    if which == "dontneed":
        return w, madvise_dontneed(0, subs, USER_BASE, USER_BASE + 2 * PAGE_SIZE)
    if which == "mprotect":
        return w, do_mprotect(0, subs, USER_BASE, USER_BASE + PAGE_SIZE, VM_READ)
    return w, ksm_enable_merge_any(0)


@pytest.mark.parametrize("which", ["fork", "dontneed", "mprotect", "merge-any"])
def test_the_vms_own_operations_release_ptl_and_references_whatever_fails(which):
    w, gen = _own_op("wrapped", which)
    total, held, _ = drive(w, gen)
    assert not held and not leaks(w) and total > 0
    for k in range(total):
        w, gen = _own_op("wrapped", which)
        _, held, _ = drive(w, gen, throw_at=k)
        assert not held, f"effect {k}: ptl left held"
        assert not leaks(w), f"effect {k}: frames {leaks(w)} have references no PTE accounts for"
        assert all(s.in_progress == 0 for v in w.vms for s in v.subs.values()), f"effect {k}: START without END"


def _drive_ksm_leave(w, slot, on_lock=None):
    """Run KsmScan.ksm_leave on the checker world's memory; on_lock() runs while ksmd waits for the ptl."""
    from workers.mm.effects import Lock, Unlock, apply_mem
    gen = w.scan.ksm_leave(slot)
    held, send = [], None
    while True:
        try:
            e = gen.send(send)
        except StopIteration as s:
            assert held == []
            return s.value
        if isinstance(e, Lock):
            if on_lock:
                on_lock()
            held.append(e.key)
            send = True
        elif isinstance(e, Unlock):
            held.remove(e.key)
            send = None
        else:
            send = apply_mem(w.mem, e)


def test_ksm_leave_looks_at_the_vmas_again_under_ptl():
    """An mm whose areas are no longer mergeable leaves ksmd's list and loses MMF_VM_MERGEABLE, unless
    the VM made an area mergeable again before ksmd got its ptl (the flag is the VM's to keep)."""
    from proto.layout import MMF_VM_MERGEABLE, MMH_FLAGS, VM_MERGEABLE
    from workers.check.world import world_factory
    w = world_factory("change_pte")()
    mm, slot = w.mem.mms[0], w.scan.slots[0]
    assert slot.listed and int(mm.hdr[MMH_FLAGS]) & MMF_VM_MERGEABLE
    mm.vmas[0, 2] &= ~VM_MERGEABLE                       # MADV_UNMERGEABLE of the only area

    def madvise_again():                                 # the VM, under its ptl, before ksmd gets it
        mm.vmas[0, 2] |= VM_MERGEABLE
    assert _drive_ksm_leave(w, slot, madvise_again) is False
    assert slot.listed and int(mm.hdr[MMH_FLAGS]) & MMF_VM_MERGEABLE
    mm.vmas[0, 2] &= ~VM_MERGEABLE
    other = int(mm.hdr[MMH_FLAGS]) & ~MMF_VM_MERGEABLE
    assert _drive_ksm_leave(w, slot) is True
    assert not slot.listed and int(mm.hdr[MMH_FLAGS]) == other   # only its own bit cleared


@pytest.mark.parametrize("t", [Msg.START, Msg.END, Msg.CHANGE_PTE, Msg.INVALIDATE_PAGE, Msg.CLEAR_YOUNG])
def test_a_one_entry_message_and_the_same_entry_twice_apply_alike(t):
    """SecondaryMMU.apply takes one entry in plain ints (a COW reply, as a list of pairs or an array) and
    several with numpy: a message naming one page twice must leave the secondary MMU as naming it once."""
    rng = random.Random(11)
    for _ in range(200):
        sptes = [rng.choice([0, (5 << PAGE_SHIFT) | PTE_PRESENT, (6 << PAGE_SHIFT) | PTE_PRESENT | PTE_YOUNG])
                 for _ in range(4)]
        i = rng.randrange(-1, 5)                           # -1 and 4: outside the mm
        entry = (USER_BASE + i * PAGE_SIZE if i >= 0 else USER_BASE - PAGE_SIZE, (9 << PAGE_SHIFT) | PTE_PRESENT)
        in_progress = rng.randrange(2)                     # 0: an END without START
        results = []
        for entries in ([entry], np.array([entry], dtype=np.uint64), [entry, entry],
                        np.array([entry, entry], dtype=np.uint64)):
            s = SecondaryMMU(0, "kvm", 4, True)
            s.spte[:] = sptes
            s.in_progress, s.seq = in_progress, 3
            try:
                got = s.apply(t, entries)
            except ValueError as e:
                got = str(e)
            results.append((got, s.spte.tolist(), s.seq, s.in_progress))
        assert all(r == results[0] for r in results), (t, sptes, i, results)


def test_page_referenced_tests_and_clears_young_under_ptl_whatever_fails():
    """mmu_notifier.page_referenced (faultd's page_referenced call): under ptl, the primary young bits tested
    and cleared, then clear_flush_young of the secondary MMUs; ptl released whatever fails."""
    w = KsmWorld("change_pte", pace=False)
    mm = w.mem.mms[0]
    mm.pte[0] |= np.uint64(PTE_YOUNG)
    before = mm.pte[:2].copy()

    def run(acks):
        seen = []

        def perform(e):
            seen.append(e.__class__.__name__)
            if e.__class__ in MEM_EFFECTS:
                return apply_mem(w.mem, e)
            return [7] if e.__class__ is Notify else acks if e.__class__ is WaitAcks else None
        return run_effects(page_referenced(0, [0, 1]), perform), seen
    assert run([0]) == (1, ["Lock", "Load", "Store", "Load", "Notify", "WaitAcks", "Unlock"])
    assert mm.pte[:2].tolist() == (before & ~np.uint64(PTE_YOUNG)).tolist()
    assert run([0])[0] == 0                 # nobody touched them since
    assert run([0, 1])[0] == 1              # a secondary MMU saw an access
    for k in range(2):                      # the lock, the PTEs' load
        assert drive(w, page_referenced(0, [0, 1]), throw_at=k)[1] == set()


def _knob_effects(scan, changes, unmerge=None):
    """set_knobs's effects (by name) and the knobs after them, each SetKnob applied as ksmd applies it."""
    from workers.mm.ksm.knobs import SetKnob, UnmergeAll, set_knobs
    seen = []

    def perform(e):
        seen.append(e)
        if e.__class__ is SetKnob:
            scan.knobs[e.name] = e.value
        elif e.__class__ is UnmergeAll and unmerge is not None:
            raise unmerge
    run_effects(set_knobs(scan, changes), perform)
    return [repr(e) for e in seen]


def test_knob_rules_are_one_core():
    """mm/ksm/knobs.py's set_knobs (ksmd's set_knobs runs it): all or nothing, a knob of the machine's start
    refused, the advisor's defaults, run=2's unmerge and its failure, a tree knob only while nothing merged."""
    from workers.mm.ksm.knobs import loaded_knobs
    w = KsmWorld("change_pte", pace=False)
    sc = w.scan
    assert _knob_effects(sc, {"sleep_millisecs": 7}) == ["knob sleep_millisecs <- 7"]
    with pytest.raises(OSError, match="unknown knob"):
        _knob_effects(sc, {"sleep_millisecs": 9, "no_such_knob": 1})
    assert sc.knobs["sleep_millisecs"] == 7            # (all or nothing)
    with pytest.raises(OSError, match="chosen when the machine starts"):
        _knob_effects(sc, {"scanners": 2})
    assert _knob_effects(sc, {"advisor_mode": "scan-time"}) == ["knob pages_to_scan <- 500", "knob advisor_mode <- 1"]
    with pytest.raises(OSError, match="set by the advisor"):
        _knob_effects(sc, {"pages_to_scan": 5})
    assert _knob_effects(sc, {"run": 2}) == ["knob run <- 2", "unmerge everything", "knob run <- 2"]
    sc.knobs["run"] = 1
    with pytest.raises(OSError, match="run=2 could not unmerge everything: .*out of frames"):
        _knob_effects(sc, {"run": 2}, unmerge=OutOfFrames(1, 0))
    assert sc.knobs["run"] == 0
    assert _knob_effects(sc, {"max_page_sharing": 256}) == ["knob max_page_sharing <- 256"]   # (no change)
    assert _knob_effects(sc, {"max_page_sharing": 3}) == ["knob max_page_sharing <- 3"]       # (nothing merged)
    assert loaded_knobs({"run": 1}.get, 2) == {**{k: None for k in loaded_knobs(lambda k: None, 2)}, "run": 1,
                                               "scanners": 2}
