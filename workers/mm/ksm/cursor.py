"""The mm_slot cursor of ksmd's scan (mm/ksm.c's ksm_mm_head walk): which mm and page comes next.

`scan_get_next_rmap_item` hands out the next pages of the current mm (dropping the rmap items of
pages no longer in a mergeable area), moving to the next mm at its end and counting a full scan
after the last; `ksm_leave` takes an mm with no mergeable area off the list, under its ptl;
`end_full_scan` empties the unstable tree and runs the scan-time advisor (mm.ksm.advisor).

A mixin of KsmScan (mm.ksm.scan), which holds the state these methods share.
"""
from __future__ import annotations

import numpy as np

from proto.layout import MMF_VM_MERGEABLE, MMH_FLAGS

from workers.mm.ksm.advisor import scan_time_advisor
from workers.mm.ksm.stable_tree import HAS, RmapItems
from workers.mm.effects import MMFLAGS, VMAS, Load, Lock, Store, Unlock, ptl
from workers.mm.pte import mergeable_ranges
from workers.mm.ksm.mm_slot import MMSlot


class ScanCursor:
    """The mm_slot cursor (a KsmScan mixin)."""

    # ------------------------------------------------------------------ the mm_slot list and the cursor
    def add_mm(self, mm_id: int, mm, items: RmapItems | None = None) -> MMSlot:
        slot = self.slots.get(mm_id)
        if slot is None:
            slot = self.slots[mm_id] = MMSlot(mm_id, mm, items)
        return slot

    def refresh_slots(self) -> None:
        """ksm_enter: mms that became mergeable join the list just behind the cursor."""
        for slot in self.slots.values():
            if slot.alive and not slot.listed and int(slot.mm.hdr[MMH_FLAGS]) & MMF_VM_MERGEABLE:
                slot.listed = True
                if self.pos == 0 and self.cur is None:
                    self.order.append(slot.id)
                else:
                    self.order.insert(self.pos, slot.id)
                    self.pos += 1

    def ksm_leave(self, slot: MMSlot):
        """The mm has no mergeable area left: clear its MMF_VM_MERGEABLE under its ptl, where the VM
        sets it (mmap, madvise, prctl), after looking again: a VMA made mergeable since the cursor
        read the list keeps the mm listed.  True if the slot left the list."""
        yield Lock(ptl(slot.id))
        try:
            if mergeable_ranges((yield Load(VMAS, slot.id))):
                left = False
            else:
                flags = yield Load(MMFLAGS, slot.id)
                yield Store(MMFLAGS, slot.id, None, flags & ~MMF_VM_MERGEABLE)
                left = True
        except GeneratorExit:           # abandoned (a checker run cut short, a kill): nothing to release
            raise
        except BaseException:
            yield Unlock(ptl(slot.id))
            raise
        yield Unlock(ptl(slot.id))
        if left:
            slot.listed = False
        return left

    def scan_get_next_rmap_item(self, want: int, out: list):
        """The next (slot, first page, end) to visit, or None at the end of a full scan."""
        while True:
            if self.pos >= len(self.order):
                return None
            slot = self.slots[self.order[self.pos]]
            if self.cur is None:
                ranges = mergeable_ranges((yield Load(VMAS, slot.id)))
                it = slot.items
                if len(it.flags):      # items outside mergeable areas: freed as the cursor passes
                    keep = np.zeros(len(it.flags), dtype=bool)
                    for a, b in ranges:
                        keep[a:b] = True
                    self.remove_trailing_rmap_items(slot, np.flatnonzero(~keep & ((it.flags & HAS) != 0)), out)
                if ranges:
                    slot.items.ensure(max(b for _, b in ranges))
                self.cur = [ranges, 0, ranges[0][0] if ranges else 0]
            ranges, r, p = self.cur
            if r >= len(ranges):
                self.cur = None
                self.pos += 1
                if not ranges and (yield from self.ksm_leave(slot)):
                    self.order.remove(slot.id)      # no mergeable area left: the slot leaves the list
                    self.pos -= 1
                continue
            a, b = ranges[r]
            p = max(p, a)
            q = min(b, p + want)
            if q >= b:
                self.cur[1], self.cur[2] = r + 1, b
            else:
                self.cur[2] = q
            if q > p:
                return slot, p, q

    def end_full_scan(self, pruned: bool) -> None:
        """The leader's part of a full scan's end (the owners emptied their unstable trees and pruned)."""
        self.c["full_scans"] += 1
        self.pos = 0
        self.cur = None
        now = self.clock()
        if pruned:
            self.last_prune = now
        self.advise(now - self.scan_start)
        self.scan_start = now

    def advise(self, seconds: float) -> None:
        """The scan-time advisor (mm/ksm.c scan_time_advisor, in workers/mm/ksm/advisor.py): at the end of a
        full scan, a new pages_to_scan from the scan's length and this scanner's CPU time."""
        if self.knobs["advisor_mode"] != 1:
            return
        self.knobs["pages_to_scan"], _ = scan_time_advisor(
            self.advisor_ctx, self.knobs["pages_to_scan"], int(seconds * 1000), self.cpu_clock(),
            target_scan_time=self.knobs["advisor_target_scan_time"], max_cpu=self.knobs["advisor_max_cpu"],
            max_pages_to_scan=self.knobs["advisor_max_pages_to_scan"])
