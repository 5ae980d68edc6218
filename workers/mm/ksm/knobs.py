"""ksmd's knob rules, IO-free: the sysfs store functions of mm/ksm.c (which writes are refused, what a
change implies) and the knobs a restarted scanner loads.

`set_knobs` checks every value first (all or nothing: a bad knob changes none), then applies each in
turn: a knob fixed when the machine starts (scanners, fault_handlers) refuses a change with EBUSY;
max_page_sharing, merge_across_nodes and mitigation change only while nothing is merged (the stale
nodes pruned first; EBUSY while KSM pages are shared; the trees reset after); pages_to_scan is the
advisor's while advisor_mode is scan-time (EINVAL); a change of advisor_mode resets the advisor and
pages_to_scan (set_advisor_defaults); run=2 unmerges everything (ENOMEM, and run=0, if it cannot).
Each value written is a `SetKnob` effect (the scanner's knob and its sysfs copy in the stats
segment); run=2's unmerge is `UnmergeAll` (the actor's: every mm's KSM pages, then the rmap items).

`loaded_knobs` is what a scanner reads at start and after a restart: every knob from the stats
segment, where the supervisor and ksmd's writes keep them.  ksmd (actors/ksmd.py, ksmd_control.py)
and the checker's restart (check/delivery.py) both load so.
"""
from __future__ import annotations

import errno

from proto.knobs import BUSY_WHEN_MERGED, OWN, check_knob
from proto.layout import KNOBS

from workers.mm.effects import Effect
from workers.mm.ksm.advisor import DEFAULT_PAGES_TO_SCAN, advisor_start_pages


class SetKnob(Effect):
    """Write knob `name` (the scanner's value and the stats segment's copy)."""
    __slots__ = ("name", "value")

    def __init__(self, name: str, value: int):
        self.name, self.value = name, value

    def __repr__(self):
        return f"knob {self.name} <- {self.value}"


class UnmergeAll(Effect):
    """run=2: every KSM page and KSM zero page becomes a private copy, every rmap item goes."""
    __slots__ = ()

    def __repr__(self):
        return "unmerge everything"


def set_knobs(scan, changes: dict):
    """Apply knob writes `changes` ({name: value}) to scanner `scan` (the leader: its control requests
    reach every scanner); OSError (EINVAL, EBUSY, ENOMEM) for a write refused, the ones before it applied."""
    knobs = scan.knobs
    for name, value in changes.items():      # all or nothing: a bad knob changes none
        check_knob(name, value)
    for name, value in changes.items():
        v = check_knob(name, value)
        if name in OWN and v != knobs[name]:
            raise OSError(errno.EBUSY, f"{name} is chosen when the machine starts (it runs with {knobs[name]}): "
                                       f"EBUSY")
        if name in BUSY_WHEN_MERGED and v != knobs[name]:
            yield from scan.control("prune")
            shared = scan.total("pages_shared")
            if shared:
                raise OSError(errno.EBUSY, f"knob {name} cannot change while {shared} KSM pages are shared "
                                           f"(write run=2 first): EBUSY")
            yield from scan.control("reset_tree")
        if name == "pages_to_scan" and knobs["advisor_mode"] != 0:
            raise OSError(errno.EINVAL, "pages_to_scan is set by the advisor while advisor_mode is scan-time: EINVAL")
        if name == "advisor_mode" and v != knobs[name]:      # set_advisor_defaults()
            scan.advisor_ctx, start = advisor_start_pages(knobs["advisor_min_pages_to_scan"])
            yield SetKnob("pages_to_scan", DEFAULT_PAGES_TO_SCAN if v == 0 else start)
        if name == "run" and v == 2 and knobs["run"] != 2:
            yield SetKnob("run", 2)
            try:
                yield UnmergeAll()
            except OSError as e:        # out of frames, or a ptl that stayed busy
                if e.errno != errno.ENOMEM and not isinstance(e, TimeoutError):
                    raise
                yield SetKnob("run", 0)
                raise OSError(errno.ENOMEM, f"run=2 could not unmerge everything: {e}") from None
        yield SetKnob(name, v)


def loaded_knobs(read, nshards: int) -> dict:
    """Every knob as read(name) gives it from the stats segment (a scanner's start and restart); scanners is
    the scanner's own count."""
    knobs = {k: read(k) for k in KNOBS}
    knobs["scanners"] = nshards
    return knobs
