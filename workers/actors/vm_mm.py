"""A VM worker's system calls on its address space (mmap, munmap, madvise, mprotect, prctl, fork:
the cores of mm.vma, with the kernel's errno) and its workloads (the writers).

A mixin of VMWorker (workers.actors.vm), which holds the state these methods share.
"""
from __future__ import annotations

import asyncio
import errno
import random


from proto.layout import (MMF_VM_MERGE_ANY, MMH_FLAGS, PAGE_SHIFT, PAGE_SIZE, VM_EXEC, VM_READ,
                          VM_WRITE, MMView, Segment, seg_name)
from proto import (MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, PR_GET_MEMORY_MERGE, PR_SET_MEMORY_MERGE,
                   PROT_EXEC, PROT_READ, PROT_WRITE)

from workers.mm.vma import (do_mmap, do_mprotect, do_munmap, dup_mmap, ksm_disable_merge_any,
                            ksm_enable_merge_any, ksm_madvise, madvise_dontneed)
from workers.mm.pte import check_range, task_size
from workers.actors.vm_common import PROT_SEM


class VMAddressSpace:
    """The VM's system calls and writers (a VMWorker mixin)."""

    async def mmap(self, length: int, vm_flags: int = 0) -> int:
        npages = check_range("mmap", 0, length, self.task_size)[1] >> PAGE_SHIFT
        return await self.drive(do_mmap(self.mm_id, npages, self.mm.npages, vm_flags))

    @property
    def task_size(self) -> int:
        return task_size(self.mm.npages)

    async def munmap(self, addr: int, length: int) -> None:
        addr, end = check_range("munmap", addr, length, self.task_size)
        await self.drive(do_munmap(self.mm_id, self.subs_list(), self.mm.npages, addr, end))

    async def madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise with the kernel's errno rules (see DESIGN.md, KSM semantics): MADV_DONTNEED
        (core.mm.madvise_dontneed), and ksm_madvise for MADV_MERGEABLE / MADV_UNMERGEABLE."""
        if advice not in (MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE):
            raise OSError(errno.EINVAL, f"advice {advice} is not MADV_DONTNEED, MADV_MERGEABLE or MADV_UNMERGEABLE")
        if advice != MADV_DONTNEED and not self.args.ksm:
            raise OSError(errno.EINVAL, "KSM is not enabled in this machine (CONFIG_KSM=n)")
        rng = check_range("madvise", addr, length, self.task_size)
        if rng is None:
            return
        if advice == MADV_DONTNEED:
            await self.drive(madvise_dontneed(self.mm_id, self.subs_list(), *rng))
            return
        await self.drive(ksm_madvise(self.mm_id, *rng, advice == MADV_MERGEABLE))

    async def mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect with the kernel's errno rules (do_mprotect_pkey): EINVAL for an unaligned start or
        unknown prot bits, 0 for length 0, ENOMEM for a range that wraps or is not all mapped (the
        part before the hole changed).  The work is core.mm.do_mprotect."""
        rng = check_range("mprotect", addr, length, self.task_size)
        if rng is None:
            return
        addr, end = rng
        if isinstance(prot, bool) or not isinstance(prot, int) or prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC | PROT_SEM):
            raise OSError(errno.EINVAL, f"prot {prot!r} has bits other than PROT_READ|PROT_WRITE|PROT_EXEC")
        vm_prot = ((VM_READ if prot & PROT_READ else 0) | (VM_WRITE if prot & PROT_WRITE else 0)
                   | (VM_EXEC if prot & PROT_EXEC else 0))
        await self.drive(do_mprotect(self.mm_id, self.subs_list(), addr, end, vm_prot))

    async def prctl(self, option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
        """PR_SET_MEMORY_MERGE (arg2 non-zero: merge-any on; 0: off, unmerging) and PR_GET_MEMORY_MERGE,
        with the kernel's EINVAL for unused arguments that are not 0, other options, or no KSM."""
        if not self.args.ksm or option not in (PR_SET_MEMORY_MERGE, PR_GET_MEMORY_MERGE):
            raise OSError(errno.EINVAL, f"prctl option {option} is not supported here")
        if option == PR_GET_MEMORY_MERGE:
            if arg2 or arg3 or arg4 or arg5:
                raise OSError(errno.EINVAL, "PR_GET_MEMORY_MERGE takes no arguments")
            return int(bool(int(self.mm.hdr[MMH_FLAGS]) & MMF_VM_MERGE_ANY))
        if arg3 or arg4 or arg5:
            raise OSError(errno.EINVAL, "PR_SET_MEMORY_MERGE takes one argument")
        if arg2:
            await self.drive(ksm_enable_merge_any(self.mm_id))
        else:
            await self.drive(ksm_disable_merge_any(self.mm_id))
        return 0

    async def fork(self, child: int) -> int:
        """Copy this address space into mm `child` (made by the supervisor, known to nobody else yet):
        core.mm.dup_mmap under this mm's ptl.  Returns how many pages the child maps."""
        seg = Segment.attach(seg_name(self.args.run, f"mm.{child}"))
        try:
            cmm = MMView(seg)
            if cmm.npages != self.mm.npages:
                raise OSError(errno.EINVAL, f"fork: mm {child} has {cmm.npages} pages, not {self.mm.npages}")
            self.shared.mms[child] = cmm
            try:
                return await self.drive(dup_mmap(self.mm_id, child, self.subs_list()))
            finally:
                del self.shared.mms[child]
                del cmm
        finally:
            seg.close()

    # ------------------------------------------------------------------ workloads
    async def writer(self, wid: int, addr: int, npages: int, seed: int, count: int, values: int,
                     period_ms: float, counter: bool = False) -> None:
        """Write `count` pages (count 0: until stopped) from a seeded RNG.

        Write k fills page rng.randrange(npages) with the byte rng.randrange(values) + 1 and
        stamps nothing else, so pages keep becoming identical (merge, COW, re-merge).  The parent
        replays the same RNG to know every byte, independently of this process.  values=0
        instead stamps a growing counter into each page in turn: pages that never settle;
        values=-v fills each page in turn with the byte v.

        counter=True (values > 0): every write carries a value of its own, so that no lost write
        can hide behind a later equal one, and pages still keep becoming identical.  The writes to
        a page alternate: a *stamp* (its first 16 bytes: the write's number k+1 and the seed, the
        rest of the page left as it is) then a *fill* (the whole page the byte drawn for write k),
        stamp, fill...: each write changes the page to bytes it never had (a fill follows a stamp,
        which no other write wrote).  Before each write the writer reads the page back
        (`counter_expect`: the page as the writes so far left it, from the first write on) and
        counts a mismatch in st["lost"] (the first few in st["lost_pages"]): a lost write is seen
        at the next write to its page, under load, not only in the final bytes.  The parent replays
        the same sequence (workers.tools.chaos.counter_sequence).
        """
        st = self.writers[wid]
        rng = random.Random(seed)
        k = 0
        if counter:
            return await self._counter_writer(st, rng, addr, npages, seed, count, values, period_ms)
        try:
            while not st["stop"] and (count == 0 or k < count):
                if values < 0:          # fill mode: every page in turn gets the byte -values
                    page = k % npages
                    await self.access(addr + page * PAGE_SIZE, PAGE_SIZE, True, bytes([-values]) * PAGE_SIZE)
                elif values == 0:       # stamp mode: a new counter into every page, in turn (volatile pages)
                    page = k % npages
                    await self.access(addr + page * PAGE_SIZE, 16, True,
                                      (k // npages + 1).to_bytes(8, "little") + page.to_bytes(8, "little"))
                else:
                    page = rng.randrange(npages)
                    val = rng.randrange(values) + 1
                    await self.access(addr + page * PAGE_SIZE, PAGE_SIZE, True, bytes([val]) * PAGE_SIZE)
                k += 1
                await self._writer_paced(st, k, period_ms)
        except Exception as e:   # reported by writer_stop
            st["error"] = repr(e)

    @staticmethod
    async def _writer_paced(st: dict, k: int, period_ms: float) -> None:
        """A writer's step k done: counted, then its pause (period_ms, or a loop turn every 64 writes)."""
        st["done"] = k
        if period_ms:
            await asyncio.sleep(period_ms / 1000)
        elif k % 64 == 0:
            await asyncio.sleep(0)

    async def _counter_writer(self, st: dict, rng, addr: int, npages: int, seed: int, count: int, values: int,
                              period_ms: float) -> None:
        """VMWorker.writer with counter=True (see there)."""
        stamped = [False] * npages          # the page's last write was a stamp (the next is a fill)
        expect: list = [None] * npages      # (fill byte, stamp bytes or None) once the page was written
        tail = 8                            # bytes read back from the page's end (the fill shows there)
        k = 0
        try:
            while not st["stop"] and (count == 0 or k < count):
                page = rng.randrange(npages)
                val = rng.randrange(values) + 1
                pa = addr + page * PAGE_SIZE
                want = expect[page]
                if want is not None:        # read back what the writes so far left there
                    head = bytes(await self.access(pa, 16, False))
                    end = bytes(await self.access(pa + PAGE_SIZE - tail, tail, False))
                    fill, stamp = want
                    if end != bytes([fill]) * tail or head != (stamp or bytes([fill]) * 16):
                        st["lost"] += 1
                        if len(st["lost_pages"]) < 8:
                            st["lost_pages"].append({"page": page, "write": k, "head": head.hex(),
                                                     "expected": (stamp or bytes([fill]) * 16).hex()})
                if stamped[page]:
                    await self.access(pa, PAGE_SIZE, True, bytes([val]) * PAGE_SIZE)
                    expect[page] = (val, None)
                else:
                    stamp = (k + 1).to_bytes(8, "little") + (seed & (2**64 - 1)).to_bytes(8, "little")
                    await self.access(pa, 16, True, stamp)
                    expect[page] = (want[0], stamp) if want is not None else None
                stamped[page] = not stamped[page]
                k += 1
                await self._writer_paced(st, k, period_ms)
        except Exception as e:   # reported by writer_stop
            st["error"] = repr(e)

    # ------------------------------------------------------------------ control
    def stats(self) -> dict:
        msgs: dict[str, int] = {}
        for s in self.subs.values():
            for k, v in s.msgs.items():
                msgs[k] = msgs.get(k, 0) + v
        return {
            "secondary_faults": sum(s.faults for s in self.subs.values()),
            "cow_faults": self.cow_faults,
            "primary_faults": self.primary_faults,
            "msgs": msgs,
            "subs": {s.name: {"secondary_faults": s.faults, "msgs": dict(s.msgs), "released": s.released,
                              "change_pte": s.has_change_pte} for s in self.subs.values()},
            "notifier_losses": dict(self.notifier_losses),
            "refused": self.refused,
            "fault_retries": self.fault_retries, "ended_on_loss": self.ended_on_loss,
            "fast_replies": self.fast_replies, "polled_replies": self.polled_replies,
        }
