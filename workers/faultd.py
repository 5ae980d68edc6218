"""The fault handler process: handle_mm_fault for every VM (do_anonymous_page, do_wp_page).

A VM worker whose access cannot be served by its secondary MMU or by the
primary PTE sends a FAULT for a batch of pages of its mm.  Under the mm's
page-table lock this actor:

  * maps a not-present page: a new zeroed frame on a write, the shared zero
    page (read-only) on a read;
  * breaks COW on a write to a read-only page (do_wp_page): a KSM frame, the
    zero page or a frame with mapcount > 1 is copied into a new frame and the
    PTE set with set_pte_at_notify (every secondary MMU hears of it, in the
    Machine's notifier mode, and acks); an anonymous frame with mapcount 1 is
    reused in place;
  * unshares KSM pages without a write (FAULT_UNSHARE: break_ksm, for
    MADV_UNMERGEABLE);
  * answers page_referenced calls with clear_flush_young.

Out of frames, the fault fails with ENOMEM to the writer; nothing is changed.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time

import numpy as np

from proto.channel import Channel, abstract_listener
from proto.layout import (FRAME_ANON, FRAME_KSM, FRAME_ZERO, PAGE_SHIFT, PTE_DIRTY, PTE_PRESENT,
                          PTE_SPECIAL, PTE_WRITE, PTE_YOUNG, USER_BASE, ZERO_PFN)
from proto.messages import FAULT_UNSHARE, FAULT_WRITE, Frame, Msg, call_payload, encode
from proto.trace import Tracer

from .actor import RunMemory, actor_args, run_actor, setup
from .frames import ksm_zero_pages_add
from .notifier import MMUNotifier

log = logging.getLogger("ksm_proto.faultd")
U64 = np.uint64
# Replying before the acks are in saves a hop, but the stress found a rare lost write with it on
# (wrapped mode, ~1 run in 60); off until that race is understood.
EARLY_REPLY = os.environ.get("KSM_PROTO_EARLY_REPLY", "0") == "1"


async def lock_ptl(ptl, timeout: float) -> None:
    """Take a page-table lock without blocking the event loop (trylock, yield, retry)."""
    deadline = time.monotonic() + timeout
    spins = 0
    while not ptl.try_acquire():
        spins += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"page-table lock {ptl.name} busy for {timeout:.1f}s")
        await asyncio.sleep(0 if spins < 50 else 0.0005)


def vma_mask(mm, idx: np.ndarray) -> np.ndarray:
    """Which page indices fall inside a VMA."""
    ok = np.zeros(len(idx), dtype=bool)
    addrs = USER_BASE + (idx.astype(np.int64) << PAGE_SHIFT)
    for start, end, _ in mm.vma_list():
        ok |= (addrs >= start) & (addrs < end)
    return ok


async def copy_pages(mem: RunMemory, notifier, mm, idx: np.ndarray, old: np.ndarray, special: np.ndarray,
                     writable: bool, early=None) -> None:
    """wp_page_copy for a batch: copy each frame, set the PTEs with notification, drop the old frames.

    The caller holds the mm's page-table lock.  OutOfFrames leaves everything as it was.
    """
    new = mem.alloc.alloc(len(idx), FRAME_ANON, zero=False)
    mem.pages[new] = mem.pages[old]
    bits = PTE_PRESENT | PTE_DIRTY | PTE_YOUNG | (PTE_WRITE if writable else 0)
    new_ptes = (new.astype(U64) << U64(PAGE_SHIFT)) | U64(bits)
    ksm_zero_pages_add(mem.frame_lock, mem.stats, mm.id, -int(special.sum()))
    if notifier is None:
        mm.pte[idx] = new_ptes
    else:
        addrs = (USER_BASE + (idx.astype(np.int64) << PAGE_SHIFT)).astype(U64)
        await notifier.set_ptes_notify(idx, new_ptes, addrs, early)
    mem.alloc.put(old)


class MMState:
    def __init__(self, mm, ptl):
        self.mm = mm
        self.ptl = ptl
        self.peer = f"vm:{mm.id}"
        self.notifier: MMUNotifier | None = None


class FaultHandler:
    name = "faultd"

    def __init__(self, args):
        self.args = args
        self.mem = RunMemory(args.run)
        self.alloc = self.mem.alloc
        self.ft = self.mem.ft
        self.mode = args.mode
        self.tr = Tracer.open(args.trace, self.name)
        self.mms: dict[int, MMState] = {}
        self.faults = 0
        self.cow_copies = 0
        self.reuses = 0

    # ---- channels ----
    def on_vm_frame(self, ch: Channel, f: Frame) -> None:
        if f.type == Msg.HELLO:
            st = self.mms.get(f.mm)
            if st is None:
                st = self.mms[f.mm] = MMState(*self.mem.attach_mm(f.mm))
            st.peer = f.json().get("name", f"vm:{f.mm}") if f.payload else f"vm:{f.mm}"
            st.notifier = MMUNotifier(self.name, st.peer, st.mm, ch, self.mode, self.tr, self.args.ack_timeout)
            ch.peer = f.mm
        elif f.type == Msg.FAULT:
            if self.tr:
                st = self.mms.get(f.mm)
                self.tr.recv(st.peer if st else f"vm:{f.mm}", "FAULT", f.mm, -1, f.addr, f.n, 0, 0, f.corr)
            asyncio.get_running_loop().create_task(self.fault(ch, f))
        else:
            log.error("faultd: unexpected %s from vm channel", Msg(f.type).name)

    def on_vm_close(self, ch: Channel) -> None:
        st = self.mms.get(ch.peer)
        if st and st.notifier and st.notifier.ch is ch:
            st.notifier.ch = None

    async def fault(self, ch: Channel, f: Frame) -> None:
        replied = False

        def reply(err: int = 0, msg: str = "") -> None:
            """FAULT_REPLY, once: as soon as the new PTEs are set and their notifications sent."""
            nonlocal replied
            if replied:
                return
            replied = True
            if self.tr:
                st = self.mms.get(f.mm)
                self.tr.send(st.peer if st else f"vm:{f.mm}", "FAULT_REPLY", f.mm, -1, f.addr, f.n, 0, 0, f.corr)
            if not ch.closed:
                ch.send(encode(Msg.FAULT_REPLY, flags=err, mm=f.mm, corr=f.corr, addr=f.addr,
                               payload=call_payload({"error": msg}) if err else b""))

        try:
            st = self.mms[f.mm]
            await self.handle_mm_fault(st, f.entries[:, 0], f.flags, reply if EARLY_REPLY else None)
            reply()
        except OSError as e:
            reply(e.errno or errno.EIO, str(e))
        except TimeoutError as e:
            reply(errno.EAGAIN, str(e))
        except KeyError:
            reply(errno.EFAULT, f"unknown mm {f.mm}")

    async def handle_mm_fault(self, st: MMState, addrs: np.ndarray, flags: int, early=None) -> None:
        if len(addrs) == 1:
            return await self.fault_one(st, int(addrs[0]), flags, early)
        mm = st.mm
        idx = ((addrs.astype(np.int64) - USER_BASE) >> PAGE_SHIFT)
        if len(idx) and (idx.min() < 0 or idx.max() >= mm.npages):
            raise OSError(errno.EFAULT, f"fault address outside the address space of mm {mm.id}")
        self.faults += 1
        t0 = time.monotonic_ns()
        await lock_ptl(st.ptl, self.args.ack_timeout * 2)
        try:
            inside = vma_mask(mm, idx)
            if not inside.all():
                bad = int(addrs[~inside][0])
                raise OSError(errno.EFAULT, f"segfault: {bad:#x} is not in any VMA of mm {mm.id}")
            write = bool(flags & FAULT_WRITE)
            unshare = bool(flags & FAULT_UNSHARE)
            pte = mm.pte[idx]
            present = (pte & U64(PTE_PRESENT)) != 0
            self.do_anonymous_page(mm, idx[~present], write)
            if write or unshare:
                await self.do_wp_page(st, idx[present], pte[present], write, early)
        finally:
            st.ptl.release()
        if self.tr:
            self.tr.span("handle_mm_fault", t0, time.monotonic_ns(), mm=mm.id, pages=len(idx), write=int(flags & 1))

    async def fault_one(self, st: MMState, addr: int, flags: int, early) -> None:
        """handle_mm_fault for one page: the same steps as the batch path, in scalar code (latency)."""
        mm = st.mm
        i = (addr - USER_BASE) >> PAGE_SHIFT
        if not 0 <= i < mm.npages:
            raise OSError(errno.EFAULT, f"fault address outside the address space of mm {mm.id}")
        self.faults += 1
        if not st.ptl.try_acquire():
            await lock_ptl(st.ptl, self.args.ack_timeout * 2)
        try:
            if not any(s <= addr < e for s, e, _ in mm.vma_list()):
                raise OSError(errno.EFAULT, f"segfault: {addr:#x} is not in any VMA of mm {mm.id}")
            write = flags & FAULT_WRITE
            pte = int(mm.pte[i])
            if not pte & PTE_PRESENT:                       # do_anonymous_page
                if write:
                    pfn = self.alloc.alloc_one(FRAME_ANON)
                    self.mem.pages[pfn] = 0
                    mm.pte[i] = (pfn << PAGE_SHIFT) | PTE_PRESENT | PTE_WRITE | PTE_DIRTY | PTE_YOUNG
                else:
                    mm.pte[i] = (ZERO_PFN << PAGE_SHIFT) | PTE_PRESENT | PTE_YOUNG
                return
            if not write and not flags & FAULT_UNSHARE:
                return
            pfn = pte >> PAGE_SHIFT
            special = pte & PTE_SPECIAL
            shared = (int(self.ft.flags[pfn]) & (FRAME_KSM | FRAME_ZERO)) or special
            if write:
                if pte & PTE_WRITE:
                    return
                if not shared and int(self.ft.mapcount[pfn]) == 1:   # wp_page_reuse
                    mm.pte[i] = pte | PTE_WRITE | PTE_DIRTY | PTE_YOUNG
                    self.reuses += 1
                    return
            elif not shared:
                return
            new = self.alloc.alloc_one(FRAME_ANON)               # wp_page_copy
            pages = self.mem.pages
            pages[new] = pages[pfn]
            new_pte = (new << PAGE_SHIFT) | PTE_PRESENT | PTE_DIRTY | PTE_YOUNG | (PTE_WRITE if write else 0)
            if special:     # counted as the PTE changes, before the faulting VM hears back
                ksm_zero_pages_add(self.mem.frame_lock, self.mem.stats, mm.id, -1)
            if st.notifier is None:
                mm.pte[i] = new_pte
            else:
                await st.notifier.set_ptes_notify(np.array([i]), np.array([new_pte], dtype=U64),
                                                  np.array([addr], dtype=U64), early)
            self.alloc.put_one(pfn)
            self.cow_copies += 1
        finally:
            st.ptl.release()

    def do_anonymous_page(self, mm, idx: np.ndarray, write: bool) -> None:
        if not len(idx):
            return
        if write:
            pfns = self.alloc.alloc(len(idx), FRAME_ANON, zero=True)
            mm.pte[idx] = (pfns.astype(U64) << U64(PAGE_SHIFT)) | U64(PTE_PRESENT | PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
        else:
            mm.pte[idx] = U64((ZERO_PFN << PAGE_SHIFT) | PTE_PRESENT | PTE_YOUNG)

    async def do_wp_page(self, st: MMState, idx: np.ndarray, pte: np.ndarray, write: bool, early=None) -> None:
        """Break COW (write) or unshare KSM pages (no write) for present pages."""
        if not len(idx):
            return
        pfn = (pte >> U64(PAGE_SHIFT)).astype(np.int64)
        fflags = self.ft.flags[pfn]
        shared = ((fflags & (FRAME_KSM | FRAME_ZERO)) != 0) | ((pte & U64(PTE_SPECIAL)) != 0)
        if write:
            need = (pte & U64(PTE_WRITE)) == 0
            reuse = need & ~shared & (self.ft.mapcount[pfn] == 1)
            copy = need & ~reuse
        else:
            reuse = np.zeros(len(idx), dtype=bool)
            copy = shared
        if reuse.any():   # wp_page_reuse: make writable in place, no notification
            r = idx[reuse]
            st.mm.pte[r] = st.mm.pte[r] | U64(PTE_WRITE | PTE_DIRTY | PTE_YOUNG)
            self.reuses += int(reuse.sum())
        if not copy.any():
            return
        c_idx = idx[copy]
        special = (pte[copy] & U64(PTE_SPECIAL)) != 0
        await copy_pages(self.mem, st.notifier, st.mm, c_idx, pfn[copy], special, write, early)
        self.cow_copies += len(c_idx)

    async def page_referenced(self, mm_id: int, addr: int, npages: int) -> int:
        """Test and clear the young bit of each page, primary and secondary (clear_flush_young)."""
        st = self.mms[mm_id]
        idx = np.arange(npages, dtype=np.int64) + ((addr - USER_BASE) >> PAGE_SHIFT)
        await lock_ptl(st.ptl, self.args.ack_timeout * 2)
        try:
            pte = st.mm.pte[idx]
            live = (pte & U64(PTE_PRESENT)) != 0
            idx, pte = idx[live], pte[live]
            young = (pte & U64(PTE_YOUNG)) != 0
            st.mm.pte[idx] = pte & ~U64(PTE_YOUNG)
            referenced = int(young.sum())
            if len(idx) and st.notifier is not None:
                entries = np.empty((len(idx), 2), dtype=U64)
                entries[:, 0] = (USER_BASE + (idx << PAGE_SHIFT)).astype(U64)
                entries[:, 1] = st.mm.pte[idx]
                if await st.notifier.clear_flush_young(entries):
                    referenced = max(referenced, 1)
            return referenced
        finally:
            st.ptl.release()

    # ---- control ----
    async def on_ctl(self, ch: Channel, f: Frame) -> None:
        req = f.json()
        op = req.get("op")
        reply: dict = {}
        try:
            if op == "mm_exit":
                st = self.mms.pop(req["mm"], None)
                if st is not None:
                    st.ptl.close()
                    st.mm.seg.close()
            elif op == "page_referenced":
                reply["referenced"] = await self.page_referenced(req["mm"], req["addr"], req["npages"])
            elif op == "stats":
                reply = {"faults": self.faults, "cow_copies": self.cow_copies, "reuses": self.reuses}
            elif op == "ping":
                pass
            else:
                raise OSError(errno.EINVAL, f"unknown faultd op {op!r}")
        except (OSError, KeyError) as e:
            reply = {"errno": getattr(e, "errno", None) or errno.EINVAL, "error": str(e)}
        ch.send(encode(Msg.REPLY, corr=f.corr, payload=call_payload(reply)))

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        server = await loop.create_unix_server(
            lambda: Channel("faultd<-vm", self.on_vm_frame, self.on_vm_close), sock=abstract_listener(f"{self.args.run}.faultd"))
        ctl_sock = socket.socket(fileno=self.args.ctl_fd)
        _, ctl = await loop.create_connection(
            lambda: Channel("faultd<-ctl", lambda ch, f: loop.create_task(self.on_ctl(ch, f)),
                            lambda ch: done.done() or done.set_result(None)), sock=ctl_sock)
        ctl.send(encode(Msg.REPLY, corr=0, payload=call_payload({"ready": True})))
        await done
        server.close()
        if self.tr:
            self.tr.close()


def main() -> None:
    setup("faultd")
    args = actor_args()
    run_actor("faultd", FaultHandler(args).main)


if __name__ == "__main__":
    main()
