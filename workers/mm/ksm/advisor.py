"""The scan-time advisor of mm/ksm.c (Linux 6.7+, advisor_mode=scan-time), as one pure function.

This module owns the advisor's arithmetic, so that the scanner (workers/mm/ksm/scan.py,
at the end of each full scan) and the estimate (workers/estimate/watch.py, predicting
ksmd over time) run the very same steps and can never disagree.  No I/O, no clock:
the caller passes the scan's length and ksmd's CPU time.

What the kernel does at the end of every full scan while advisor_mode is scan-time
(scan_time_advisor(), called from advisor_stop_scan()), all in unsigned integers:

    scan_time   = the full scan's length in whole seconds (ms // 1000), at least 1
    cpu_percent = ksmd's CPU milliseconds since the last advice * 100 / (scan_time * 1000),
                  at least 1 (the CPU time is task_sched_runtime(ksmd), in ns)
    factor      = advisor_target_scan_time * 100 // scan_time, at least 1
    change      = scan_time * 100 // last_scan_time (the previous scan's, or this one's
                  the first time), at least 1, then smoothed:
    change      = ewma(ctx.change, change) = ((100 - 30) * ctx.change + 30 * change) // 100
    pages       = pages_to_scan * 100 // factor * change // 100
    per_page_cost = pages_to_scan // cpu_percent, at least 1   (pages per 1% of a CPU)
    pages       = min(pages, per_page_cost * advisor_max_cpu)
    pages       = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU)     (10)
    pages       = min(pages, advisor_max_pages_to_scan)
    ctx         = (change, scan_time, cpu_time)

Writing advisor_mode=scan-time zeroes the context (so the first advice counts every
nanosecond ksmd ran since boot, and smooths from change 0) and sets pages_to_scan to
advisor_min_pages_to_scan; writing none sets it back to 100 (DEFAULT_PAGES_TO_SCAN).
advisor_min_pages_to_scan is only that starting value: the advice itself is floored by
the 10% CPU rule, not by it.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EWMA_WEIGHT", "KSM_ADVISOR_MIN_CPU", "DEFAULT_PAGES_TO_SCAN", "AdvisorCtx", "ewma",
           "scan_time_advisor", "advisor_start_pages"]

EWMA_WEIGHT = 30
KSM_ADVISOR_MIN_CPU = 10
DEFAULT_PAGES_TO_SCAN = 100
_U64 = (1 << 64) - 1


@dataclass
class AdvisorCtx:
    """struct advisor_ctx without start_scan (the caller times the scan): all zero when the mode is set."""
    scan_time: int = 0          # the previous scan's length, whole seconds
    change: int = 0             # the smoothed change, percent
    cpu_time: int = 0           # ksmd's CPU time (ns) at the previous advice


def ewma(prev: int, curr: int) -> int:
    """The kernel's exponentially weighted moving average, in integers (weight 30 on the new value)."""
    return ((100 - EWMA_WEIGHT) * prev + EWMA_WEIGHT * curr) // 100


def advisor_start_pages(advisor_min_pages_to_scan: int) -> tuple[AdvisorCtx, int]:
    """What writing advisor_mode=scan-time does: a zeroed context and pages_to_scan = the minimum."""
    return AdvisorCtx(), int(advisor_min_pages_to_scan)


def scan_time_advisor(ctx: AdvisorCtx, pages_to_scan: int, scan_ms: int, cpu_time_ns: int, *,
                      target_scan_time: int, max_cpu: int, max_pages_to_scan: int) -> tuple[int, int]:
    """One advice at the end of a full scan: returns (new pages_to_scan, cpu_percent); updates ctx.

    scan_ms: the scan's length in milliseconds (from its first page to its end);
    cpu_time_ns: ksmd's total CPU time now.  The other arguments are the knobs
    advisor_target_scan_time, advisor_max_cpu and advisor_max_pages_to_scan.
    """
    scan_time = max(0, int(scan_ms)) // 1000 or 1
    cpu_diff_ms = ((int(cpu_time_ns) - ctx.cpu_time) & _U64) // 1000 // 1000
    cpu_percent = (cpu_diff_ms * 100 // (scan_time * 1000)) & 0xFFFFFFFF or 1     # an unsigned int
    last_scan_time = ctx.scan_time or scan_time
    factor = int(target_scan_time) * 100 // scan_time or 1
    change = scan_time * 100 // last_scan_time or 1
    change = ewma(ctx.change, change)
    pages = int(pages_to_scan) * 100 // factor
    pages = pages * change // 100
    per_page_cost = int(pages_to_scan) // cpu_percent or 1
    pages = min(pages, per_page_cost * int(max_cpu))
    pages = max(pages, per_page_cost * KSM_ADVISOR_MIN_CPU)
    pages = min(pages, int(max_pages_to_scan))
    ctx.change, ctx.scan_time, ctx.cpu_time = change, scan_time, int(cpu_time_ns)
    return pages, cpu_percent
