"""The frame accounting invariants, in one place: `Machine.check_frames` and `ksm-proto check` both ask.

On a quiet machine (no fault, merge or recovery in flight) the PTEs are the truth:

  * every frame's mapcount equals the number of PTEs that map it (the zero page aside);
  * a frame is free exactly when nothing maps it (free: on the free stack, or in a fault handler's
    reserve, flagged FRAME_RESERVED: runtime/frames.py);
  * the free stack holds each free frame exactly once, and nothing else (a reserved frame is on no stack).

`frame_problems` reads a FrameTable and the PTE arrays of every mm and returns one line per kind
of problem (empty: all hold).  The checker also checks its finer invariants after every step
(check/world.py); these are the ones that must hold at the end of any run, real or explored.
"""
from __future__ import annotations

import numpy as np

from proto.layout import FRAME_FREE, FRAME_KSM, FRAME_RESERVED, FTH_FREE_TOP, PAGE_SHIFT, PTE_PRESENT, ZERO_PFN

U64 = np.uint64


def mappings(ptes, nframes: int) -> np.ndarray:
    """How many PTEs map each frame, over the PTE arrays `ptes` (the zero page counted 0)."""
    maps = np.zeros(nframes, dtype=np.int64)
    for pte in ptes:
        present = (pte & U64(PTE_PRESENT)) != 0
        maps += np.bincount((pte[present] >> U64(PAGE_SHIFT)).astype(np.int64), minlength=nframes)
    maps[ZERO_PFN] = 0
    return maps


def ksm_pages_mapped(ft, ptes, nframes: int) -> dict:
    """pages_shared and pages_sharing as the PTEs say: each KSM frame mapped n > 0 times is one page
    shared and n - 1 sharing (what ksmd's counters must be once its scans have seen every page)."""
    n = mappings(ptes, nframes)[(ft.flags & FRAME_KSM) != 0]
    n = n[n > 0]
    return {"pages_shared": int(len(n)), "pages_sharing": int((n - 1).sum())}


def frame_problems(ft, ptes, nframes: int) -> list[str]:
    """The frame accounting invariants over frame table ft and every mm's PTE array; [] when they hold."""
    maps = mappings(ptes, nframes)
    mc = ft.mapcount.astype(np.int64).copy()
    mc[ZERO_PFN] = 0
    problems = []
    bad = np.flatnonzero(maps != mc)
    if len(bad):
        p = int(bad[0])
        problems.append(f"{len(bad)} frame(s) whose mapcount is not their number of mappings, e.g. frame {p}: "
                        f"mapcount {mc[p]} but {maps[p]} PTEs map it")
    top = int(ft.hdr[FTH_FREE_TOP])
    free = ft.free_stack[:top].astype(np.int64)
    flagged = np.flatnonzero(ft.flags == FRAME_FREE)
    if len(np.unique(free)) != len(free) or set(free.tolist()) != set(flagged.tolist()):
        problems.append(f"the free stack does not hold each free frame exactly once ({top} on it, "
                        f"{len(flagged)} flagged free)")
    if len(free) and ((ft.flags[free] != FRAME_FREE).any() or (maps[free] != 0).any()):
        problems.append("a frame on the free stack is in use")
    if len(free) and (ft.flags[free] == FRAME_RESERVED).any():
        problems.append("a reserved frame is on the free stack")
    reserved = np.flatnonzero(ft.flags == FRAME_RESERVED)
    if len(reserved) and (maps[reserved] != 0).any():
        problems.append(f"a reserved frame is mapped, e.g. frame {reserved[maps[reserved] != 0][0]}")
    unused = np.flatnonzero((maps == 0) & (ft.flags != FRAME_FREE) & (ft.flags != FRAME_RESERVED))
    unused = unused[unused != ZERO_PFN]
    if len(unused):
        problems.append(f"{len(unused)} frame(s) nothing maps are not free, e.g. frame {unused[0]}")
    return problems
