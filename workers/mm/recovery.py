"""The supervisor's recovery after kill -9 of ksmd or a fault handler, as one IO-free program.

`recover` is what the supervisor does once it has seen an actor die, in order:

  1. freeze ksmd between two rounds (a fault handler died and the scanners live): no scanner
     then holds a ptl or a pinned frame outside the page tables while the frames are repaired
     (renewed right before the repair; a live ksmd that cannot be frozen means no repair);
  2. each VM the dead actor served handles its loss (`NotifierLost`: the VM ends the
     invalidations the dead one started and drops every secondary translation, for the dead one
     may have changed PTEs it never told about: mmu_notifier.notifier_lost);
  3. repair the frame table from the PTEs under every ptl (repair.repair_frames): whatever the
     dead actor left half done (a frame allocated and not mapped, a mapcount not yet dropped);
  4. thaw ksmd (the repair was all it had to wait for);
  5. start the successor (`Respawn`: new processes, fresh channels to every VM it serves, which
     reconnect and send again the faults the dead one never answered; new scanners rebuild
     their state from shared memory, the followers before the leader).

`vm_died` is what the supervisor does once a VM died (kill -9: its secondary MMUs died with it,
the kernel dropped its ptl if it held it, its channels closed, so ksmd and its fault handler
waiting on its acks or APPLIED went on as for a subscriber that does not answer), or exited:

  1. the scanners and its fault handler forget its mm (`ForgetMM`; ksm_exit: its rmap items leave
     the trees, at a batch boundary);
  2. exit_mmap (mm/vma.py) under its ptl: every frame it maps loses that mapping (freed when it
     was the last), so a fault or merge still finishing on it under ptl completes first; without
     the ptl if a hung actor holds it past the timeout;
  3. a VM that died (not one that exited): ksmd frozen, the frame table repaired from the PTEs under
     every ptl, ksmd thawed: the VM changes its own page table in its own process (MADV_DONTNEED,
     mprotect, fork) and a kill -9 halfway leaves a PTE cleared whose frame was not put yet.

The supervisor (actors/supervisor.py) runs both with effects that are control calls to real
processes; `ksm-proto check` (check/world.py) runs them as one more thread of its world, with a
kill -9 at any step of the others.  Their breaks (mm/breaks.py) remove a step.
"""
from __future__ import annotations

from workers.mm.breaks import NONE
from workers.mm.effects import Effect
from workers.mm.repair import repair_frames
from workers.mm.vma import exit_mmap


class Freeze(Effect):
    """Hold the scanners at their next round boundary (again: renew the hold); returns True (held),
    False (they live but did not stop) or None (no live scanner to hold)."""
    __slots__ = ()

    def __repr__(self):
        return "freeze ksmd at a batch boundary"


class Thaw(Effect):
    __slots__ = ()

    def __repr__(self):
        return "thaw ksmd"


class NotifierLost(Effect):
    """VM `mm` handles the loss of notifier `peer` (once the dead one's messages are drained)."""
    __slots__ = ("mm", "peer")

    def __init__(self, mm: int, peer: str):
        self.mm, self.peer = mm, peer

    def footprint(self):
        return ((("vm", self.mm), "w"),)

    def __repr__(self):
        return f"vm{self.mm}: {self.peer} lost"


class Respawn(Effect):
    """Start `group` again ("ksmd": every scanner; else that fault handler) and reconnect it to the
    VMs it serves."""
    __slots__ = ("group",)

    def __init__(self, group: str):
        self.group = group

    def __repr__(self):
        return f"restart {self.group}"


class ForgetMM(Effect):
    """`actor` forgets mm `mm`: "ksmd" (the leader has every scanner drop it: ksm_exit, at a batch
    boundary) or a fault handler (its channel and mapping of the mm go)."""
    __slots__ = ("actor", "mm")

    def __init__(self, actor: str, mm: int):
        self.actor, self.mm = actor, mm

    def footprint(self):
        return ((("scans",), "w"),) if self.actor == "ksmd" else ()

    def __repr__(self):
        return f"{self.actor} forgets mm {self.mm}"


def vm_died(mm: int, notifiers=(), all_mms=None, nframes: int = 0, brk=NONE):
    """The teardown of mm `mm` whose VM died or exited: each of `notifiers` (the actors that know the mm:
    "ksmd" and its fault handler) forgets it, then exit_mmap under its ptl (without it if a hung actor
    holds it past the lock's timeout: the mm goes all the same).

    all_mms (a VM that died, not one that exited cleanly): then the frame table is repaired from the
    PTEs of all_mms() with ksmd frozen, as after any actor's death: a VM killed halfway through its own
    MADV_DONTNEED, mprotect or fork leaves what the kernel would never leave (a PTE cleared and its
    frame not yet put, a child's PTE set before its reference was taken).  Returns {"unmapped": mappings
    dropped, "unlocked": True where the ptl could not be taken, and the repair's counts}."""
    if "no-vm-forget" not in brk:
        for a in notifiers:
            yield ForgetMM(a, mm)
    try:
        done = {"unmapped": (yield from exit_mmap(mm))}
    except TimeoutError:
        done = {"unmapped": (yield from exit_mmap(mm, lock=False)), "unlocked": True}
    if all_mms is None or "no-vm-repair" in brk:
        return done
    frozen = yield Freeze()
    if frozen is False:             # a live ksmd may hold frame references outside any ptl: no repair
        done["repair_skipped"] = "ksmd could not be frozen"
        return done
    try:
        done.update((yield from repair_frames(all_mms(), nframes)))
    except TimeoutError as x:
        done["repair_failed"] = str(x)
    if frozen:
        yield Thaw()
    return done


def victims(groups, scanners: list[str]) -> list[str]:
    """The actors that stop with `groups`: a dead scanner takes every scanner down (the round
    protocol has no way to take one back into a mesh), a fault handler goes alone."""
    return [n for g in groups for n in (scanners if g == "ksmd" else [g])]


def recover(groups: list[str], scanners: list[str], live_vms, all_mms, serves, nframes: int, brk=NONE):
    """The recovery after the death of `groups` ("ksmd" for the scanners, or fault handlers' names).

    scanners: every scanner's name; live_vms(): the mms whose VM worker runs now; all_mms(): every
    mm with a page table now (one being filled by a fork, before its worker starts, included: its
    PTEs count); serves(actor, mm): whether that actor
    notifies mm (a fault handler serves the mms whose id is its number modulo their count, each
    scanner every mm).  Returns the repair's counts (repair_frames)."""
    dead = victims(groups, scanners)
    frozen = None                   # (None: no live ksmd to hold; False: a live one that did not stop)
    if "ksmd" not in groups:
        frozen = yield Freeze()
    if "no-notifier-lost" not in brk:
        for mm in live_vms():
            for name in dead:
                if serves(name, mm):
                    yield NotifierLost(mm, name)
    fixed = {}
    if "respawn-before-repair" in brk:      # (the break: the successor runs, ksmd thawed, during the repair)
        for g in groups:
            yield Respawn(g)
        if frozen:
            yield Thaw()
            frozen = None
    elif frozen:
        frozen = yield Freeze()     # renewed: the repair never meets a ksmd whose freeze ran out
    if frozen is False:             # a live ksmd may hold frame references outside any ptl: no repair
        fixed = {"repair_skipped": "ksmd could not be frozen"}
    elif "no-repair" not in brk:
        try:
            fixed = yield from repair_frames(all_mms(), nframes)
        except TimeoutError as x:       # a ptl a hung actor holds: the successor starts all the same
            fixed = {"repair_failed": str(x)}
    if frozen:                      # the repair was all ksmd had to wait for
        yield Thaw()
    if "respawn-before-repair" not in brk:
        for g in groups:
            yield Respawn(g)
    return fixed
