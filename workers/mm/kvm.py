"""A VM's memory access through a secondary MMU, IO-free: the guest's side of the protocol.

A VM touches frame bytes only through a secondary MMU's spte (`Touch`: look up the
spte and copy the bytes in one step, as one event-loop turn does in the VM worker).
A miss is a secondary fault: snapshot the invalidate sequence, read the primary PTE
without the page-table lock, install it only if no invalidation started or ended
meanwhile (KVM's mmu_invalidate_seq / in_progress scheme, `secondary_fault_check`).
A miss the primary PTE cannot serve (not present, or a write to a read-only page) is
a FAULT to the fault handler (`FaultCall`), after which the access retries.

Before a secondary fault installs anything, the VMA must allow the access (KVM's
hva_to_pfn goes through get_user_pages, which checks it): no VMA, PROT_NONE, or a write to
a read-only area raises OSError(EFAULT), the prototype's SIGSEGV, and the VM goes on.  The
VMA is read after the sequence snapshot, so an mprotect racing the fault (VMA store, then
START..END, which moves the sequence) makes the install retry and see the new flags.
"""
from __future__ import annotations

import errno

from proto.layout import PAGE_SHIFT, PAGE_SIZE, PTE_PRESENT, PTE_WRITE, PTE_YOUNG, USER_BASE
from proto.messages import FAULT_WRITE

from workers.mm.effects import PTE, VMAS, Effect, Load, bytes_footprint
from workers.mm.mmu_notifier import NEED_PRIMARY, OK, SecondaryMMU, secondary_fault_check
from workers.mm.pte import PROT_BITS, check_range, may_access, task_size, vma_flags_of

FAULT_BATCH = 4096


class Touch(Effect):
    """Access page i at off through sub's spte: copy chunk bytes data[pos:] -> frame (write) or
    frame -> out[pos:] (read).  True if the spte served it, False on a miss."""
    __slots__ = ("sub", "i", "off", "pos", "chunk", "write", "buf")

    def __init__(self, sub, i, off, pos, chunk, write, buf):
        self.sub, self.i, self.off, self.pos, self.chunk, self.write, self.buf = sub, i, off, pos, chunk, write, buf

    def footprint(self):
        s = int(self.sub.spte[self.i])
        return bytes_footprint([s >> PAGE_SHIFT], "w" if self.write else "r") if s else ()

    def __repr__(self):
        return f"{'write' if self.write else 'read'} page {self.i} +{self.off} x{self.chunk} via {self.sub.name}"


class WaitIdle(Effect):
    """Wait until no invalidation is in progress on sub (the driver bounds the wait: EAGAIN)."""
    __slots__ = ("sub",)

    def __init__(self, sub):
        self.sub = sub

    def __repr__(self):
        return f"wait {self.sub.name} idle"


class FaultCall(Effect):
    """Send FAULT for page indices idx (a list of ints) and wait for the reply (an error reply raises OSError)."""
    __slots__ = ("idx", "flags", "ncow")

    def __init__(self, idx, flags, ncow):
        self.idx, self.flags, self.ncow = idx, flags, ncow

    def __repr__(self):
        return f"fault {list(self.idx)} flags {self.flags}"


def touch(sub: SecondaryMMU, e: Touch, memory) -> bool:
    """Run a Touch against frame memory (a writable memoryview of all frames)."""
    s = int(sub.spte[e.i])
    need = PTE_PRESENT | (PTE_WRITE if e.write else 0)
    if s & need != need:
        return False
    if not s & PTE_YOUNG:        # the accessed bit, as the MMU sets it
        sub.spte[e.i] = s | PTE_YOUNG
    base = (s >> PAGE_SHIFT) * PAGE_SIZE + e.off
    if e.write:
        memory[base:base + e.chunk] = e.buf[e.pos:e.pos + e.chunk]
    else:
        e.buf[e.pos:e.pos + e.chunk] = memory[base:base + e.chunk]
    return True


def vm_access(mm: int, sub: SecondaryMMU, addr: int, length: int, write: bool, buf):
    """Read (into buf) or write (from buf) [addr, addr+length) through sub, faulting as needed."""
    if check_range("access", addr, length, task_size(len(sub.spte))) is None:
        return
    need = PTE_PRESENT | (PTE_WRITE if write else 0)
    pos = 0
    i = (addr - USER_BASE) >> PAGE_SHIFT
    off = (addr - USER_BASE) & (PAGE_SIZE - 1)
    last = (addr + length - 1 - USER_BASE) >> PAGE_SHIFT
    while pos < length:
        if sub.released:
            raise OSError(errno.EFAULT, f"secondary MMU {sub.name} was released")
        chunk = min(PAGE_SIZE - off, length - pos)
        if (yield Touch(sub, i, off, pos, chunk, write, buf)):
            pos += chunk
            i += 1
            off = 0
            continue
        if sub.in_progress:
            yield WaitIdle(sub)
            continue
        seq = sub.seq
        vmas = yield Load(VMAS, mm)
        vflags = vma_flags_of(vmas, i)
        if not may_access(vflags, write):
            raise OSError(errno.EFAULT, f"segfault: {'write to' if write else 'read of'} "
                                        f"{USER_BASE + (i << PAGE_SHIFT):#x}, which {_why(vflags, write)}")
        pte = yield Load(PTE, mm, i)
        r = secondary_fault_check(sub, seq, i, pte, need)
        if r == OK:
            continue
        if r != NEED_PRIMARY:
            yield WaitIdle(sub)
            continue
        yield from primary_fault(mm, i, last, write, vmas=vmas)


def primary_fault(mm: int, first: int, last: int, write: bool, flags: int = 0, vmas=None):
    """FAULT the pages in [first, last] that the primary PTEs cannot serve (at most FAULT_BATCH;
    with vmas, only up to the first page the access may not touch: that one faults on its own)."""
    span = list(range(first, min(last, first + FAULT_BATCH - 1) + 1))
    if vmas is not None:
        for k, i in enumerate(span):
            if not may_access(vma_flags_of(vmas, i), write):
                span = span[:max(1, k)]
                break
    pte = yield Load(PTE, mm, span)
    idx, ncow = [], 0
    for i, p in zip(span, pte):
        if not p & PTE_PRESENT:
            idx.append(i)
        elif write and not p & PTE_WRITE:       # a COW
            idx.append(i)
            ncow += 1
    if not idx:
        return   # raced with another fault that already fixed them: just retry
    yield FaultCall(idx, (FAULT_WRITE if write else 0) | flags, ncow)


def _why(flags: int, write: bool) -> str:
    if flags < 0:
        return "is not in any VMA"
    return "is read-only" if write and flags & PROT_BITS else "is PROT_NONE"
