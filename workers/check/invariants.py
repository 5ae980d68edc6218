"""The checker's invariants, after every step and at the end (see world.py's docstring): the frame
accounting of mm/invariants.py, secondary MMUs against their PTEs, COW-shared frames read-only,
the notifier grammar, the counters against the trees and the PTEs, a complete merge, a dead VM torn
down.

A mixin of KsmWorld (workers.check.world), which holds the state these methods share.
"""
from __future__ import annotations

import hashlib

import numpy as np

from proto.layout import (COUNTERS, FRAME_FREE, FRAME_KSM, MM_STATS, MMH_DOMAIN, PAGE_SHIFT, PTE_PRESENT, PTE_SPECIAL,
                          PTE_WRITE, USER_BASE, ZERO_PFN)

from workers.mm.effects import ShardRecv
from workers.mm.mmu_notifier import (EXPECT, FAILED, GRAMMAR, INIT, grammar_why)
from workers.mm.pte import may_access, mergeable_ranges, vma_flags_at
from workers.mm.invariants import frame_problems
from workers.mm.ksm.scan import SUMMED
from workers.mm.ksm.shard import LEAD
from workers.check.world_common import VMState


class Invariants:
    """The invariants (a KsmWorld mixin)."""

    def violations(self) -> list[str]:
        if self.same_pending:
            self._same_behaviour()
        out = list(self.violations_found)
        self.violations_found.clear()
        if self._dirty:         # a step that only read leaves the frame invariants as they were
            self._dirty = False
            out += self._frame_violations()
        return out

    def final_violations(self) -> list[str]:
        out = self._frame_violations() + frame_problems(self.ft, [mm.pte for mm in self.mem.mms.values()],
                                                        self.nframes)
        maps = self._mappings()
        c = self.totals()
        ksm = [p for p in range(1, self.nframes) if self.ft.flags[p] & FRAME_KSM and maps[p]]
        if c["pages_shared"] != len(ksm) or c["pages_shared"] + c["pages_sharing"] != int(sum(maps[p] for p in ksm)):
            out.append(f"counters pages_shared {c['pages_shared']} pages_sharing {c['pages_sharing']}, but "
                       f"{len(ksm)} KSM frames are mapped {int(sum(maps[p] for p in ksm))} times")
        zi = MM_STATS.index("ksm_zero_pages")
        total = 0
        out += self._teardown_violations()
        for v in self.vms:
            if v.dead:
                continue
            mm = self.mem.mms[v.id]
            pte = mm.pte
            present = (pte & np.uint64(PTE_PRESENT)) != 0
            nzero = int((present & ((pte & np.uint64(PTE_SPECIAL)) != 0)).sum())
            total += nzero
            if int(self.stats.mm[v.id, zi]) != nzero:
                out.append(f"{v.name}: ksm_zero_pages {int(self.stats.mm[v.id, zi])}, but {nzero} PTEs map the "
                           f"KSM zero page")
            slot = self.scan.slots.get(v.id)
            pfn = (pte >> np.uint64(PAGE_SHIFT)).astype(np.int64)
            inside = np.zeros(len(pte), dtype=bool)
            for a, b in mergeable_ranges(mm.vma_list()):
                inside[a:b] = True
            nksm = int((present & inside & ((self.ft.flags[pfn] & FRAME_KSM) != 0)).sum())
            merging = slot.items.merging if slot is not None else 0
            if merging != nksm:
                out.append(f"{v.name}: ksm_merging_pages {merging}, but {nksm} of its PTEs map KSM pages")
        if int(self.stats.counters[COUNTERS.index("ksm_zero_pages")]) != total:
            out.append(f"ksm_zero_pages {int(self.stats.counters[COUNTERS.index('ksm_zero_pages')])}, but {total} "
                       f"PTEs map the KSM zero page")
        if self.complete:
            out += self._incomplete()
        return out

    def _teardown_violations(self) -> list[str]:
        """A dead VM is gone at the end: its mm (and a fork child it was filling) torn down, no scanner
        scans it, no frame counts a mapping of it (the frame accounting above)."""
        out = []
        for v in self.vms:
            if not v.dead:
                continue
            if v.id in self.mem.mms:
                out.append(f"{v.name} died but its mm was never torn down")
            if any(v.id in sc.slots for sc in self.scans):
                out.append(f"{v.name} died but a scanner still scans its mm")
        out += [f"mm {m} (a fork child) is left without its VM" for m in self.mem.mms if m >= len(self.vms)]
        return out

    def totals(self) -> dict:
        """The counters as the leader publishes them: every scanner's summed."""
        return {k: sum(sc.c[k] for sc in self.scans) for k in SUMMED}

    def _incomplete(self) -> list[str]:
        """The merge one scanner would reach: each content held by two or more candidate pages is one
        KSM page (max_page_sharing is never reached here)."""
        frames_of: dict[bytes, set] = {}
        for mm in self.mem.mms.values():
            for pte in mm.pte.tolist():
                pfn = pte >> PAGE_SHIFT
                if pte & PTE_PRESENT and pfn != ZERO_PFN:
                    frames_of.setdefault(bytes(self.alloc.pages[pfn]), set()).add(pfn)
        out = []
        for data, pfns in frames_of.items():
            mapped = sum(1 for mm in self.mem.mms.values() for pte in mm.pte.tolist()
                         if pte & PTE_PRESENT and (pte >> PAGE_SHIFT) in pfns)
            if mapped >= 2 and len(pfns) > 1:
                out.append(f"merge incomplete: {mapped} pages holding byte {data[0]} are in {len(pfns)} frames "
                           f"{sorted(pfns)}, one scanner merges them into one KSM page")
        return out

    # ---------------------------------------------------------------- invariants
    def _mappings(self) -> list[int]:
        """How many PTEs map each frame (the zero page not counted).  Plain Python: the arrays are tiny."""
        maps = [0] * self.nframes
        for mm in self.mem.mms.values():
            for pte in mm.pte.tolist():
                if pte & PTE_PRESENT:
                    maps[pte >> PAGE_SHIFT] += 1
        maps[ZERO_PFN] = 0
        return maps

    def _in_flight(self, mm: int, s: int, i: int) -> bool:
        addr = USER_BASE + (i << PAGE_SHIFT)
        for src in self.scanner_names + [self.faultd_of(mm)]:
            for item in self.queues[(src, mm)]:
                if item[0] == "FAULT_REPLY":        # a COW's reply carries set_pte_at_notify for every sub
                    e = item[4]                     # (one page: a record's [(addr, pte)]; more: an array)
                    if e is not None and (e[0][0] == addr if e.__class__ is list else (e[:, 0] == addr).any()):
                        return True
                elif item[2] == s and (item[3][:, 0] == addr).any():
                    return True
        return False

    def _frame_violations(self) -> list[str]:
        out = []
        maps = self._mappings()
        if self.mitigation == "domain":     # no KSM page is shared across security domains
            doms: dict[int, set] = {}
            for v in self.vms:
                mm = self.mem.mms.get(v.id)
                for pte in mm.pte.tolist() if mm is not None else ():
                    if pte & PTE_PRESENT and not pte & PTE_SPECIAL and self.ft.flags[pte >> PAGE_SHIFT] & FRAME_KSM:
                        doms.setdefault(pte >> PAGE_SHIFT, set()).add(int(mm.hdr[MMH_DOMAIN]))
            out += [f"KSM frame {p} is mapped by VMs of domains {sorted(d)}" for p, d in doms.items() if len(d) > 1]
        mc = self.ft.mapcount.tolist()
        flags = self.ft.flags.tolist()
        for p, n in enumerate(maps):
            if n and (n > mc[p] or flags[p] == FRAME_FREE):
                if n > mc[p]:
                    out.append(f"frame {p}: {n} PTEs map it but its mapcount is {mc[p]}")
                if flags[p] == FRAME_FREE:
                    out.append(f"frame {p} is free but a PTE maps it")
        for v in self.vms:
            mm = self.mem.mms.get(v.id)
            if mm is None:          # (a dead VM's, torn down)
                continue
            pte = mm.pte.tolist()
            free_ptl = self.locks[("ptl", v.id)] is None
            vflags = vma_flags_at(mm.vma_list(), np.arange(len(pte))).tolist() if free_ptl else None
            if free_ptl:
                for i, pp in enumerate(pte):
                    if pp & PTE_PRESENT and pp & PTE_WRITE and mc[pp >> PAGE_SHIFT] > 1:
                        out.append(f"{v.name} page {i} is writable but its frame {pp >> PAGE_SHIFT} is COW-shared "
                                   f"(mapcount {mc[pp >> PAGE_SHIFT]})")
            for s, sub in v.subs.items() if not v.dead else ():     # (a dead VM's died with it)
                for i, sp in enumerate(sub.spte.tolist()):
                    if not sp:
                        continue
                    pp = pte[i]
                    spfn = sp >> PAGE_SHIFT
                    if flags[spfn] == FRAME_FREE and spfn != ZERO_PFN:
                        out.append(f"{v.name} {sub.name} page {i} maps frame {spfn}, which is free")
                        continue
                    if free_ptl and not may_access(vflags[i], bool(sp & PTE_WRITE)):
                        out.append(f"{v.name} {sub.name} page {i} maps frame {spfn}"
                                   f"{' writable' if sp & PTE_WRITE else ''}, which its VMA does not allow")
                        continue
                    stale = (not pp & PTE_PRESENT or (pp >> PAGE_SHIFT) != spfn
                             or (sp & PTE_WRITE and not pp & PTE_WRITE))
                    if stale and self.locks[("ptl", v.id)] is None and not self._in_flight(v.id, s, i) \
                            and not self.pending_loss[v.id]:
                        out.append(f"{v.name} {sub.name} page {i} maps frame {spfn}"
                                   f"{' writable' if sp & PTE_WRITE else ''} but its PTE maps "
                                   f"{pp >> PAGE_SHIFT if pp & PTE_PRESENT else 'nothing'}"
                                   f"{' writable' if pp & PTE_WRITE else ''}, and no notification is on its way")
        return out

    def _check_counters(self) -> None:
        """At a round boundary (every scanner between rounds): the sharing counters agree with the stable trees."""
        for t in self.threads[1:]:
            if t.actor in self.scanner_names and not t.done and not (
                    (isinstance(t.pending, ShardRecv) and t.pending.kind == LEAD
                     or self.scans[self._scanner_no(t.actor)].waiting == LEAD)    # (or hashing ahead meanwhile)
                    and not self.shardq[(0, self._scanner_no(t.actor), LEAD)]):
                return          # (that scanner is inside a round: its counters move)
        c = self.totals()
        cnt = np.concatenate([sc.tree.count[np.flatnonzero(sc.tree.live[:sc.tree.top])] for sc in self.scans])
        if c["pages_shared"] != int((cnt > 0).sum()) or c["pages_shared"] + c["pages_sharing"] != int(cnt.sum()):
            self.violations_found.append(f"pages_shared {c['pages_shared']} pages_sharing {c['pages_sharing']} "
                                         f"disagree with the stable tree{'s' if len(self.scans) > 1 else ''} "
                                         f"({int((cnt > 0).sum())} nodes in use, {int(cnt.sum())} rmap items)")

    def _grammar(self, v: VMState, s: int, kind: str, src="local") -> None:
        """Advance secondary MMU s of v through the notifier grammar by a `kind` message from src
        (with a kill, each notifier's messages, and the VM's own, follow the grammar apart)."""
        gk = (src, s) if self.kill else s
        st = v.grammar.setdefault(gk, GRAMMAR[(INIT, "REGISTER")])
        nxt = GRAMMAR.get((st, kind))
        if nxt is None and st != FAILED:
            self.violations_found.append(f"{v.name} {v.subs[s].name}: {grammar_why(st, kind)}: got {kind}, "
                                         f"expected {EXPECT.get(st)}")
            nxt = FAILED
        v.grammar[gk] = nxt

    def digest(self) -> str:
        """A hash of the whole shared state (for tests comparing two runs)."""
        h = hashlib.sha256(self.frames.tobytes())
        h.update(self.ft.seg.buf)
        for mm in self.mem.mms.values():
            h.update(mm.seg.buf)
        return h.hexdigest()

    def _candidate(self, v: VMState, page: int) -> str | None:
        """Under vusion, what page is as a write to it starts: "merged" (it maps a KSM page), "unmerged
        candidate" (ksmd fake-merged it and nobody wrote it since), else None (not watched)."""
        if self.mitigation != "vusion":
            return None
        pte = int(self.mem.mms[v.id].pte[page])
        if pte & PTE_PRESENT and not pte & PTE_SPECIAL and self.ft.flags[pte >> PAGE_SHIFT] & FRAME_KSM:
            return "merged"
        return "unmerged candidate" if (v.id, page) in self.candidates else None

    def _same_behaviour(self) -> None:
        """VUsion's invariant: every write to a candidate causes the same effects, merged or not: the same
        sequence in the VM up to its first fault's reply, and in the fault handler's task for that fault
        (compared once it ended: interleavings between the two are the schedule's, not the page's).  A
        second fault of the same write (ksmd fake-merged the copy before the write landed on it) is
        the schedule's too, whichever the page was."""
        keep = []
        for sig in self.same_pending:
            if not all(t.done for t in sig["threads"]):
                keep.append(sig)
                continue
            if any(getattr(t, "killed", False) for t in sig["threads"]):
                continue            # its fault handler was killed mid-fault: the schedule's, not the page's
            vm = [e for e in sig["vm"] if e != "WaitIdle"]      # (an invalidation in flight: the schedule's)
            vm = vm[:vm.index("_AwaitReply") + 1] if "_AwaitReply" in vm else vm
            first = [e for k, e in enumerate(vm) if not k or e != vm[k - 1]]     # (a retried touch: one)
            got = (tuple(first), tuple(sig["faultd"][0]) if sig["faultd"] else ())
            if self.same_ref is None:
                self.same_ref = (got, sig["what"])
            elif got != self.same_ref[0]:
                show = lambda g: " ".join(g[0]) + " | fault handler: " + (" ".join(g[1]) or "nothing")  # noqa: E731
                self.violations_found.append(
                    f"same behaviour: the write to {sig['what']} caused {show(got)}, but the write to "
                    f"{self.same_ref[1]} caused {show(self.same_ref[0])}: a timed write tells them apart")
        self.same_pending = keep
