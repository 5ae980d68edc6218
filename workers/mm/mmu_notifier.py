"""The mmu_notifier protocol, IO-free: the notifying side's steps, the secondary MMU, the grammar.

Notifying side (mm/mmu_notifier.c of the seeds, as ksmd and the fault handler use it):
`set_pte_at_notify` sets primary PTEs and tells every secondary MMU registered on the mm,
in the Machine's notifier mode, waiting for every ack before it returns:

    change_pte  (2.6.32-3.6)  store PTEs; CHANGE_PTE (INVALIDATE_PAGE to a subscriber
                              registered without change_pte)
    wrapped     (3.7-6.9)     START, acks; store PTEs; CHANGE_PTE; END; acks
    invalidate  (6.10-)       START, acks; store PTEs; END; acks

The mm's own process (its VM worker) changes its page table too (core/mm.py: zap, mprotect,
fork); the secondary MMUs live in that process, so its invalidate_range_start/end are local
calls, `LocalNotify`: applied to each secondary MMU at once, no message, no ack.

Receiving side: `SecondaryMMU` is a KVM-like shadow page table: sptes, the
invalidate sequence number and in-progress count of KVM's mmu_invalidate scheme.
`secondary_fault_check` is the validation half of a secondary fault (snapshot
seq, read the primary PTE without its lock, install only if nothing moved).

`GRAMMAR` is the order of messages each secondary MMU must see:
REGISTER ( START [CHANGE_PTE] END | CHANGE_PTE | INVALIDATE_PAGE | CLEAR_YOUNG )* RELEASE.
"""
from __future__ import annotations

import collections

import numpy as np

from proto.layout import PAGE_SHIFT, PTE_PRESENT, PTE_YOUNG, USER_BASE
from proto.messages import Msg, NOTIFIER_TYPES

from proto.layout import SUB_ACTIVE, SUB_CHANGE_PTE

from workers.mm.breaks import NONE
from workers.mm.effects import PTE, SUBS, Effect, Load, Notify, Store, WaitAcks, under_ptl

MODES = ("change_pte", "wrapped", "invalidate")
U64 = np.uint64
LOG_LEN = 4096
_NAMES = {int(m): m.name for m in Msg}
_START, _END, _CHANGE_PTE, _INVALIDATE_PAGE, _CLEAR_YOUNG, _REGISTER, _RELEASE = (
    int(m) for m in (Msg.START, Msg.END, Msg.CHANGE_PTE, Msg.INVALIDATE_PAGE, Msg.CLEAR_YOUNG, Msg.REGISTER, Msg.RELEASE))


def entries_for(idx, ptes) -> np.ndarray:
    """n x (addr, pte) notifier entries for page indices idx."""
    idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
    e = np.empty((len(idx), 2), dtype=U64)
    e[:, 0] = (USER_BASE + (idx << PAGE_SHIFT)).astype(U64)
    e[:, 1] = ptes
    return e


def set_pte_at_notify(jobs, mode: str, wait: bool = True, wait_start: bool = True):
    """Store PTEs and notify the secondary MMUs of each mm, in `mode`; returns Notify handles.

    jobs: [(mm, idx, new_ptes)], one per mm (ksmd batches several mms, the fault handler
    one).  The caller holds each ptl(mm) throughout.  With wait (the kernel's synchronous
    callbacks) this returns only when every subscriber acked; wait=False returns the
    handles of the last messages, still unacknowledged, for the caller to WaitAcks
    (wait_start=False leaves the START acks to the caller too: the checker's breaks).
    """
    jobs = [(mm, idx, new, entries_for(idx, new)) for mm, idx, new in jobs]
    subs = {}
    for mm, *_ in jobs:
        subs[mm] = yield Load(SUBS, mm)
    handles = []
    if mode != "change_pte":
        starts = []
        for mm, _, _, entries in jobs:
            if subs[mm]:
                starts.append((yield Notify(mm, Msg.START, [s for s, _ in subs[mm]], entries)))
        if starts and wait_start:
            yield WaitAcks(starts)
            for mm, *_ in jobs:
                subs[mm] = yield Load(SUBS, mm)
        elif starts:
            handles += starts
    for mm, idx, new, entries in jobs:
        yield Store(PTE, mm, idx, new)
        with_cp = [s for s, c in subs[mm] if c]
        if mode == "change_pte":
            without = [s for s, c in subs[mm] if not c]
            if with_cp:
                handles.append((yield Notify(mm, Msg.CHANGE_PTE, with_cp, entries)))
            if without:
                handles.append((yield Notify(mm, Msg.INVALIDATE_PAGE, without, entries)))
        elif subs[mm]:
            if mode == "wrapped" and with_cp:
                handles.append((yield Notify(mm, Msg.CHANGE_PTE, with_cp, entries)))
            handles.append((yield Notify(mm, Msg.END, [s for s, _ in subs[mm]], entries)))
    if wait and handles:
        yield WaitAcks(handles)
        return []
    return handles


def set_pte_types(mode: str, has_change_pte: bool) -> tuple:
    """The messages one set_pte_at_notify gives one secondary MMU in `mode`, in order."""
    if mode == "change_pte":
        return (Msg.CHANGE_PTE,) if has_change_pte else (Msg.INVALIDATE_PAGE,)
    if mode == "wrapped" and has_change_pte:
        return (Msg.START, Msg.CHANGE_PTE, Msg.END)
    return (Msg.START, Msg.END)


def local_set_pte(subs, entries, mode: str):
    """set_pte_at_notify's messages for a COW reply's entries, applied by the VM that owns `subs` on
    the reply's arrival (core.fault.wp_page_copy_reply): each live secondary MMU gets, in one go, the
    messages set_pte_at_notify would have sent it (`set_pte_types`).  Yields (sub, type) after
    applying each, for the caller's log or grammar check."""
    for sub in subs:
        if sub.released:
            continue
        for t in set_pte_types(mode, sub.has_change_pte):
            sub.apply(t, entries)
            yield sub, t


# ---------------------------------------------------------------- the VM's side, as the VM worker and the checker run it
class NotifierLink:
    """A VM's end of one notifier's channel (ksmd, a fault handler): the invalidate_range_starts it
    sent each secondary MMU without their end yet, and whether its loss was handled.  A successor
    (after a restart) gets a new link."""
    __slots__ = ("peer", "open_starts", "lost")

    def __init__(self, peer: str):
        self.peer, self.open_starts, self.lost = peer, {}, False


def receive_notification(subs: dict, link: NotifierLink, t: int, s: int, entries, primary=None) -> int:
    """One notifier message from link's peer to secondary MMU s of subs: applied, its START/END
    counted on the link; returns the ack's flags.  KeyError for an unknown secondary MMU,
    ValueError for a message it cannot take (an address outside the mm, END without START):
    nothing is applied then, and the caller still acks.

    primary: the mm's PTEs.  A CHANGE_PTE is sent under the ptl, after the PTE was stored, and the
    sender keeps the ptl until the ack: a live sender's new PTE is the primary PTE when it arrives.
    One that is not was sent by a notifier that died (its ptl dropped by the kernel) before the
    mm changed that PTE again (the VM's own MADV_DONTNEED, say): it is stale, and the translation
    is dropped instead of changed (SecondaryMMU.apply)."""
    flags = subs[s].apply(t, entries, primary if t == _CHANGE_PTE else None)
    if t == _START:
        link.open_starts[s] = link.open_starts.get(s, 0) + 1
    elif t == _END:
        link.open_starts[s] = link.open_starts.get(s, 0) - 1
    return flags


def notifier_lost(subs: dict, link: NotifierLink, brk=NONE) -> dict:
    """link's notifier died (its channel closed, or the supervisor says so), once per link: each
    secondary MMU ends what it had started and drops every translation, since the dead one may
    have changed PTEs it never told us about (SecondaryMMU.notifier_lost).  Returns {s: ENDs
    supplied}, {} if already handled."""
    if link.lost:
        return {}
    link.lost = True
    ended = {}
    for s, sub in subs.items():
        n = link.open_starts.get(s, 0)
        if "no-spte-flush" in brk:          # (the break: the translations kept, trusting what was said)
            k = max(0, min(n, sub.in_progress))
            sub.in_progress -= k
            for _ in range(k):
                sub.note("END")
            ended[s] = k
        else:
            ended[s] = sub.notifier_lost(n)
    link.open_starts.clear()
    return ended


def apply_cow_reply(subs, entries, mode: str) -> list:
    """A COW reply's new PTEs (core.fault.wp_page_copy_reply), applied by the faulting VM on the
    reply's arrival: set_pte_at_notify's messages to each live secondary MMU; [(sub, type)]
    applied, in order.  The VM then answers APPLIED (ValueError: an entry outside the mm, the
    reply refused; APPLIED still goes back)."""
    return list(local_set_pte(subs, entries, mode))


def register(mm, subs) -> None:
    """mmu_notifier_register of each secondary MMU on mm (the caller holds its ptl): the notifiers
    read mm.subs to know whom to tell, and how (with change_pte or not)."""
    for sub in subs:
        mm.subs[sub.sub, SUB_CHANGE_PTE] = int(sub.has_change_pte)
        mm.subs[sub.sub, SUB_ACTIVE] = 1
        sub.note("REGISTER")


def unregister(mm, sub) -> bool:
    """mmu_notifier_unregister (the caller holds ptl: no callback is in flight then): ->release.
    False if it was released already."""
    mm.subs[sub.sub, SUB_ACTIVE] = 0
    if sub.released:
        return False
    sub.note("RELEASE")
    sub.release()
    return True


class LocalNotify(Effect):
    """invalidate_range_start (START) or _end (END) from the mm's own process: each SecondaryMMU in
    subs applies it at once (a local call; a released one is skipped).  Returns None."""
    __slots__ = ("mm", "type", "subs", "entries")

    def __init__(self, mm, type, subs, entries):
        self.mm, self.type, self.subs, self.entries = mm, type, subs, entries

    def footprint(self):
        return ((("vm", self.mm), "w"),)

    def __repr__(self):
        return f"local {self.type.name} x{len(self.entries)} to {[s.name for s in self.subs]}"


def clear_flush_young(mm: int, entries):
    """Ask every secondary MMU to test-and-clear young for entries; True if any was young."""
    subs = yield Load(SUBS, mm)
    if not subs:
        return False
    h = yield Notify(mm, Msg.CLEAR_YOUNG, [s for s, _ in subs], entries)
    acks = yield WaitAcks([h])
    return any(acks)


def page_referenced(mm: int, idx):
    """page_referenced (mm/rmap.c) for pages idx of mm: under its ptl, test and clear the young bit of
    each present PTE, then clear_flush_young of the secondary MMUs for those pages.  Returns how many
    pages were referenced (at least 1 if only a secondary MMU had seen an access)."""
    idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))

    def body(idx):
        pte = yield Load(PTE, mm, idx)
        live = (pte & U64(PTE_PRESENT)) != 0
        idx, pte = idx[live], pte[live]
        referenced = int(((pte & U64(PTE_YOUNG)) != 0).sum())
        if len(idx):
            old = pte & ~U64(PTE_YOUNG)
            yield Store(PTE, mm, idx, old)
            if (yield from clear_flush_young(mm, entries_for(idx, old))):
                referenced = max(referenced, 1)
        return referenced
    return (yield from under_ptl(mm, body(idx)))


class SecondaryMMU:
    """A shadow page table: sptes, invalidate sequence / in-progress count, message counts."""

    def __init__(self, sub: int, name: str, npages: int, has_change_pte: bool):
        self.sub = sub
        self.name = name
        self.has_change_pte = has_change_pte
        self.spte = np.zeros(npages, dtype=U64)
        self.seq = 0
        self.in_progress = 0
        self.released = False
        self.faults = 0
        self.msgs = {m.name: 0 for m in NOTIFIER_TYPES}
        self.log: collections.deque = collections.deque(maxlen=LOG_LEN)   # message types, in order
        self.logged = 0         # entries ever appended to log (the web view's sequence numbers)

    def note(self, name: str, n: int = 1) -> None:
        self.msgs[name] += n
        self.log.append(name)
        self.logged += 1

    def apply(self, t: int, entries, primary=None) -> int:
        """Apply one notifier message; returns the ack flags (young, for CLEAR_YOUNG).  entries: n x
        (addr, pte), an (n, 2) array or a list of pairs (a COW reply's).  One entry (a COW, a one-page
        merge) in plain ints; more with numpy, in one pass over all of them.  primary (the mm's PTEs,
        for a CHANGE_PTE from another process): a translation whose new PTE is no longer the primary
        PTE is dropped, not changed (receive_notification)."""
        n = len(entries)
        name = _NAMES.get(t) or Msg(t).name          # (Msg(t): ValueError for a type that is none)
        self.msgs[name] += n if t != _REGISTER and t != _RELEASE else 1
        self.log.append(name)
        self.logged += 1
        if n == 1:
            a, p = entries[0] if entries.__class__ is list else entries.tolist()[0]
            i = (a - USER_BASE) >> PAGE_SHIFT
            spte = self.spte
            if not 0 <= i < len(spte):
                raise ValueError(f"{name} for an address outside the mm")
            if t == _START:
                self.in_progress += 1
                spte[i] = 0
            elif t == _END:
                if self.in_progress <= 0:
                    raise ValueError("END without START")
                self.in_progress -= 1
                self.seq += 1
            elif t == _CHANGE_PTE:      # like kvm_set_spte_hva: only a translation that exists is changed
                if spte.item(i):
                    spte[i] = p if primary is None or primary.item(i) == p else 0
                self.seq += 1
            elif t == _INVALIDATE_PAGE:
                spte[i] = 0
                self.seq += 1
            elif t == _CLEAR_YOUNG:
                old = spte.item(i)
                if old & PTE_YOUNG:
                    spte[i] = old & ~PTE_YOUNG
                    return 1
                return 0
            elif t == _RELEASE:
                self.release()
            return 0
        if n and entries.__class__ is list:
            entries = np.array(entries, dtype=U64).reshape(n, 2)
        idx = ((entries[:, 0].astype(np.int64) - USER_BASE) >> PAGE_SHIFT) if n else None
        if idx is not None and (idx.min() < 0 or idx.max() >= len(self.spte)):
            raise ValueError(f"{name} for an address outside the mm")
        if t == _START:
            self.in_progress += 1
            self.spte[idx] = 0
        elif t == _END:
            if self.in_progress <= 0:
                raise ValueError("END without START")
            self.in_progress -= 1
            self.seq += 1
        elif t == _CHANGE_PTE:
            # like kvm_set_spte_hva: only translations that exist are changed, in place
            live = self.spte[idx] != 0
            if primary is not None:         # (stale: the primary PTE changed since: dropped)
                stale = live & (primary[idx] != entries[:, 1])
                self.spte[idx[stale]] = 0
                live &= ~stale
            self.spte[idx[live]] = entries[live, 1]
            self.seq += 1
        elif t == _INVALIDATE_PAGE:
            self.spte[idx] = 0
            self.seq += 1
        elif t == _CLEAR_YOUNG:
            young = bool((self.spte[idx] & U64(PTE_YOUNG)).any())
            self.spte[idx] &= ~U64(PTE_YOUNG)
            return int(young)
        elif t == _RELEASE:
            self.release()
        return 0

    def notifier_lost(self, open_starts: int) -> int:
        """A notifier died (or its channel broke) with `open_starts` invalidate_range_start
        without their end: end them, and drop every translation, for it may have changed
        PTEs it never told us about.  Returns how many were ended (each noted as an END, so
        the grammar holds for what the successor sends)."""
        ended = max(0, min(open_starts, self.in_progress))
        self.in_progress -= ended
        for _ in range(ended):
            self.note("END")
        self.spte[:] = 0
        self.seq += 1
        return ended

    def zap(self, i0: int, i1: int) -> None:
        """Drop translations [i0, i1) (the owner's own munmap: zap_page_range)."""
        self.spte[i0:i1] = 0
        self.seq += 1

    def release(self) -> None:
        self.released = True
        self.spte[:] = 0
        self.in_progress = 0


# secondary fault results
OK, NEED_PRIMARY, WAIT = 0, 1, 2


def secondary_fault_check(sub: SecondaryMMU, seq: int, i: int, pte: int, need: int) -> int:
    """The install half of a secondary fault: `pte` was read without the lock after `seq` was
    snapshotted; install it only if it serves the access and no invalidation ran meanwhile."""
    if pte & need != need:
        return NEED_PRIMARY
    if sub.in_progress or sub.seq != seq:
        return WAIT
    sub.spte[i] = pte
    sub.faults += 1
    return OK


# ---------------------------------------------------------------- the grammar, as a transition table
INIT, IDLE, IN_START, IN_START_CP, DONE, FAILED = range(6)
EXPECT = {INIT: "REGISTER", IDLE: "START, CHANGE_PTE, INVALIDATE_PAGE, CLEAR_YOUNG or RELEASE",
          IN_START: "CHANGE_PTE or END", IN_START_CP: "END", DONE: "nothing after RELEASE"}
GRAMMAR = {(INIT, "REGISTER"): IDLE,
           (IDLE, "START"): IN_START, (IDLE, "CHANGE_PTE"): IDLE, (IDLE, "INVALIDATE_PAGE"): IDLE,
           (IDLE, "CLEAR_YOUNG"): IDLE, (IDLE, "RELEASE"): DONE,
           (IN_START, "CHANGE_PTE"): IN_START_CP, (IN_START, "END"): IDLE, (IN_START_CP, "END"): IDLE}


def grammar_why(state: int, typ: str) -> str:
    if state == INIT:
        return f"{typ} before REGISTER"
    if state == DONE:
        return f"{typ} after RELEASE"
    if typ == "START":
        return "START inside START..END (nested START)"
    if typ == "END":
        return "END without START"
    if typ == "REGISTER":
        return "second REGISTER"
    if typ == "CHANGE_PTE" and state == IN_START_CP:
        return "second CHANGE_PTE inside START..END"
    if typ == "RELEASE":
        return "RELEASE inside START..END"
    return f"{typ} inside START..END"
