"""A toy protocol for the explorer's own tests: processes add 1 to a shared counter under a lock.

    BREAKS                      break name -> one-line description
    world_factory(mode, brk)    -> a callable building a fresh ToyWorld (ValueError on an unknown mode/break)

Each read or write of a shared field (sem, owner, counter) is its own step; after each increment
a process also adds 1 to its private log (a step independent of every other process's).  The
mode picks the size: change_pte 2 processes x 1 increment, wrapped 2 x 2, invalidate 3 x 1.
Without a break the lock is the kernel's: one atomic step, enabled only while the lock is free.
Each release is a message to whoever takes the lock next (a flow in the trace).  The breaks:

- owner-read-twice: ksm-proto's old ShmLock.  A contender whose sem trywait fails reads `owner`;
  0 counts as a dead pid, so it reads `owner` again and, finding it non-zero (the holder has
  written its pid meanwhile), takes the lock over: two holders.
- no-lock: a plain read-then-write increment; a lost update shows at the end.

Owns nothing but this model; `holders` is ghost state for the invariant, not part of the protocol.
"""
from __future__ import annotations

from functools import cache, partial

from workers.check.explore import Step

BREAKS = {
    "owner-read-twice": "the old ShmLock: a busy trylock reads owner twice and takes over a live holder",
    "no-lock": "increment the counter with no lock at all",
}
SIZES = {"change_pte": (2, 1), "wrapped": (2, 2), "invalidate": (3, 1)}

# pc -> (what the label says, the shared field it touches, "r" | "w"); log's field is p's own
OPS = {
    "lock": ("lock (kernel lock)", "sem", "w"),
    "unlock": ("unlock (kernel lock)", "sem", "w"),
    "trywait": ("sem trywait", "sem", "w"),
    "own": ("write owner = pid", "owner", "w"),
    "read1": ("read owner (holder dead?)", "owner", "r"),
    "read2": ("read owner again", "owner", "r"),
    "take": ("take over: write owner = pid", "owner", "w"),
    "unown": ("write owner = 0", "owner", "w"),
    "post": ("sem post", "sem", "w"),
    "read": ("read counter", "counter", "r"),
    "write": ("write counter", "counter", "w"),
    "log": ("log one increment", "log", "w"),
}
AFTER_WRITE = {None: "unlock", "owner-read-twice": "unown", "no-lock": "log"}


@cache
def _steps(procs: int) -> list[dict[str, Step]]:
    """Per process, pc -> its Step (made once: a Step depends only on the process and its pc)."""
    return [{pc: Step(f"p{p}", f"p{p}: {label}", frozenset({(f"log{p}" if key == "log" else key, how)}))
             for pc, (label, key, how) in OPS.items()} for p in range(procs)]


class ToyWorld:
    def __init__(self, procs: int, incs: int, brk: str | None):
        self.brk = brk
        self.start = {None: "lock", "owner-read-twice": "trywait", "no-lock": "read"}[brk]
        self.sem, self.owner, self.counter = 1, 0, 0
        self.pc = [self.start] * procs
        self.tmp = [0] * procs
        self.left = [incs] * procs
        self.log = [0] * procs
        self.released = self.handoff = 0        # releases so far; the one not yet taken up (0: none)
        self.holders: set[int] = set()
        self.steps = _steps(procs)
        self._en: list[tuple[int, Step]] | None = None

    def _enabled(self) -> list[tuple[int, Step]]:
        if self._en is None:
            self._en = [(p, self.steps[p][pc]) for p, pc in enumerate(self.pc)
                        if pc != "done" and not (pc == "lock" and self.sem == 0)]
        return self._en

    def enabled(self) -> list[Step]:
        return [s for _, s in self._enabled()]

    def take(self, i: int) -> dict:
        p, s = self._enabled()[i]
        self._en = None
        pc, pid, args, rec = self.pc[p], 100 + p, {}, {"actor": s.actor, "label": s.label}
        if pc in ("lock", "trywait"):
            got = self.sem > 0
            if got:
                self.sem -= 1
                if self.handoff:
                    rec["flow_in"], self.handoff = self.handoff, 0
            args["got"] = got
            nxt = ("read" if pc == "lock" else "own") if got else "read1"
            if pc == "lock":
                self.holders.add(p)
        elif pc in ("unlock", "post"):
            self.sem = args["sem"] = self.sem + 1
            self.released += 1
            rec["flow_out"] = self.handoff = self.released
            self.holders.discard(p)
            nxt = "log"
        elif pc in ("own", "take"):
            self.owner = args["owner"] = pid
            self.holders.add(p)
            nxt = "read"
        elif pc == "read1":
            args["owner"] = self.owner
            nxt = "read2" if self.owner == 0 else "trywait"        # pid 0 is not alive: "dead holder"
        elif pc == "read2":
            args["owner"] = self.owner
            nxt = "take" if self.owner != 0 else "trywait"
        elif pc == "unown":
            self.owner = 0
            nxt = "post"
        elif pc == "read":
            self.tmp[p] = args["counter"] = self.counter
            nxt = "write"
        elif pc == "write":
            self.counter = args["counter"] = self.tmp[p] + 1
            nxt = AFTER_WRITE[self.brk]
        else:                                                      # log
            self.log[p] = args["log"] = self.log[p] + 1
            self.left[p] -= 1
            nxt = self.start if self.left[p] else "done"
        self.pc[p] = nxt
        rec["args"] = args
        return rec

    def violations(self) -> list[str]:
        if len(self.holders) < 2:
            return []
        return ["two holders: " + " and ".join(f"p{p}" for p in sorted(self.holders))]

    def finished(self) -> bool:
        return all(pc == "done" for pc in self.pc)

    def final_violations(self) -> list[str]:
        out = []
        if self.counter != sum(self.log):
            out.append(f"lost update: counter is {self.counter}, the processes logged {sum(self.log)} increments")
        if self.brk != "no-lock" and (self.sem, self.owner) != (1, 0):
            out.append(f"lock left broken: sem {self.sem}, owner {self.owner}")
        return out

    def state_key(self) -> bytes:
        return repr((self.sem, self.owner, self.counter, self.pc, self.tmp, self.left, self.log, self.released,
                     self.handoff, sorted(self.holders))).encode()


def world_factory(mode: str, brk: str | None):
    if mode not in SIZES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(SIZES)}")
    if brk is not None and brk not in BREAKS:
        raise ValueError(f"unknown break {brk!r}: one of {', '.join(BREAKS)}")
    return partial(ToyWorld, *SIZES[mode], brk)
