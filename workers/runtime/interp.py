"""The one interpreter of the cores' effects, over a backend: every actor and the checker run the
cores (workers/mm/) through it.

A core is a generator of effects (mm/effects.py).  `run_until_blocked` resumes it and performs its
effects through a *backend* as long as the backend answers them at once; it stops at the core's end
or at the first effect the backend must wait for (the effect's op returns `BLOCK`) and hands that
effect back.  Who called it waits in its own way and resumes the core with the answer:

  * an actor on its event loop (runtime/driver.py `Driver.run`: a busy ptl's backoff, the acks, the
    scanners' mesh; the fault handler's fast path parks a COW on its APPLIED, faultd_fast.py);
  * the VM worker's access path (a secondary MMU's wait for an invalidation's end, a FAULT);
  * the supervisor in its own thread, whose ops wait themselves (`run_sync`);
  * the checker (check/world.py), which performs one effect per scheduling point (`perform`,
    `resume`): its backend is in-process arrays and queues, and its scheduler, not an op, decides
    when a lock or a message is there.

A backend is a table, effect class -> op(effect) that returns the effect's result, or BLOCK; an op's
exception is thrown into the core at that effect, so the core's own cleanup runs.  `Backend`
starts the table with the memory effects (mm/effects.py APPLY_MEM, bound to the backend's `Memory`:
POSIX shared memory for the actors, plain arrays for the checker); each backend adds its locks,
channels and processes, and may override a memory effect (the VM reads its own PTEs and VMAs its
own faster way).  An effect no op knows goes to the backend's `fallback` (by default: a TypeError
thrown into the core).
"""
from __future__ import annotations

import functools

from workers.mm.effects import APPLY_MEM


class _Block:
    __slots__ = ()

    def __repr__(self):
        return "BLOCK"


BLOCK = _Block()        # what an op returns for an effect that must wait: the caller waits, then resumes


class Backend:
    """The effects one runner performs at once: `table` (effect class -> op), and `fallback`."""

    name = "backend"

    def __init__(self, mem=None, ops: dict | None = None):
        self.mem = mem
        self.table = {} if mem is None else {c: functools.partial(f, mem) for c, f in APPLY_MEM.items()}
        if ops:
            self.table.update(ops)

    def fallback(self, e):
        raise TypeError(f"effect {e!r} has no driver in {self.name}")

    def perform(self, e):
        """One effect's op (the checker's scheduling point); its result, or BLOCK."""
        return self.table.get(e.__class__, self.fallback)(e)


def resume(gen, send=None, exc=None):
    """Resume gen with send (or throw exc into it): (its next effect, None), or (None, its value) at its
    end.  Its own exception propagates."""
    try:
        return (gen.throw(exc) if exc is not None else gen.send(send)), None
    except StopIteration as s:
        return None, s.value


def run_until_blocked(gen, backend: Backend, send=None, exc=None, observe=None):
    """Resume gen and perform its effects through backend while they are answered at once.

    Returns (None, value) at gen's end, or (effect, None) at the first effect whose op returned BLOCK
    (gen is then suspended at it: resume it with the effect's result).  observe(effect), if given,
    sees each effect before its op (tracing).  An op's exception is thrown into gen; gen's own
    propagates."""
    table, fallback = backend.table, backend.fallback
    while True:
        try:
            e = gen.throw(exc) if exc is not None else gen.send(send)
        except StopIteration as s:
            return None, s.value
        exc = None
        try:
            if observe is not None:
                observe(e)
            send = table.get(e.__class__, fallback)(e)
        except Exception as x:          # thrown into the core: its cleanup runs
            send, exc = None, x
            continue
        if send is BLOCK:
            return e, None


def run_sync(gen, backend: Backend):
    """Run gen to its end in this thread, through a backend whose ops wait themselves (the supervisor's:
    a ptl taken with its timeout, a control call answered); returns gen's value."""
    e, value = run_until_blocked(gen, backend)
    if e is not None:
        gen.close()
        raise TypeError(f"effect {e!r} must wait, and {backend.name} runs its cores without waiting")
    return value
