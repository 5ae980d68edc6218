"""A workload for `ksm-proto estimate --watch`: processes whose memory holds still, changes slowly, changes fast.

This module owns the demo workload used by docs/estimate_demo.py --watch, by the bench
part estimate-live and by tests/test_estimate_watch.py.  Each process (a small pure
Python interpreter, named with prctl PR_SET_NAME) maps one anonymous private area
(no THP) and fills it with

    dup    pages with the same bytes in every process (as identical VMs or replicas hold)
    uniq   pages of its own that never change
    slow   pages of its own, each rewritten once every `slow_s` seconds (staggered)
    fast   pages of its own, each rewritten once every `fast_s` seconds (staggered)

then prints "ready" and keeps rewriting until its stdin closes.  Nothing here is
advised MADV_MERGEABLE: ksmd never touches these processes; the estimate reads them.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

__all__ = ["DemoShape", "Demo", "WORKLOADS"]

WORKER = r"""
import ctypes, mmap, os, random, select, sys, time
name, seed, ndup, nuniq, nslow, nfast, slow_s, fast_s = sys.argv[1:9]
seed, ndup, nuniq, nslow, nfast = map(int, (seed, ndup, nuniq, nslow, nfast))
slow_s, fast_s = float(slow_s), float(fast_s)
ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)                       # PR_SET_NAME
P = 4096
n = ndup + nuniq + nslow + nfast
m = mmap.mmap(-1, n * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if hasattr(mmap, "MADV_NOHUGEPAGE"):
    m.madvise(mmap.MADV_NOHUGEPAGE)
shared, own = random.Random(7), random.Random(1000 + seed)
for i in range(n):
    m[i * P:(i + 1) * P] = (shared if i < ndup else own).randbytes(P)
slow0, fast0 = ndup + nuniq, ndup + nuniq + nslow
print("ready", flush=True)
t0 = time.monotonic()
done_slow = done_fast = 0
stamp = 0
while not select.select([sys.stdin], [], [], 0.005)[0]:
    t = time.monotonic() - t0
    for first, count, period, done in ((slow0, nslow, slow_s, "s"), (fast0, nfast, fast_s, "f")):
        if not count:
            continue
        want = int(t / period * count)
        have = done_slow if done == "s" else done_fast
        for k in range(have, want):                  # round robin: page k % count, once per period
            stamp += 1
            off = (first + k % count) * P
            m[off:off + 16] = stamp.to_bytes(8, "little") + seed.to_bytes(8, "little")
        if done == "s":
            done_slow = max(have, want)
        else:
            done_fast = max(have, want)
"""


@dataclass
class DemoShape:
    """How many processes and pages of each kind per process; the two rewrite periods in seconds."""
    procs: int = 4
    dup: int = 1024
    uniq: int = 512
    slow: int = 512
    fast: int = 256
    slow_s: float = 6.0
    fast_s: float = 0.05


# The workloads `bench --only estimate-live` checks the estimate on (name, shape), the demo first:
#   demo      mostly duplicates, a small volatile part; slow pages much slower than any full scan
#             (they hold still over every scan), fast ones far faster (always volatile)
#   volatile  six processes, few duplicates and a volatile part larger than the rest; slow pages
#             every 2.5 s, as long as a full scan at pages_to_scan 100 and a few times one at 1000
#             or with the advisor, so that a part of them changes between two scans and the
#             prediction rests on the changed-between-scans probability, not on all or nothing
WORKLOADS: list[tuple[str, DemoShape]] = [
    ("demo", DemoShape()),
    ("volatile", DemoShape(procs=6, dup=384, uniq=256, slow=768, fast=512, slow_s=2.5, fast_s=0.15)),
]


class Demo:
    """Start the processes (context manager); `pids` in start order; each ended by its pid on exit."""

    def __init__(self, shape: DemoShape | None = None, timeout: float = 60.0):
        self.shape = shape or DemoShape()
        self.timeout = timeout
        self.procs: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> "Demo":
        s = self.shape
        try:
            for i in range(s.procs):
                p = subprocess.Popen([sys.executable, "-S", "-c", WORKER, f"demo-{i + 1}", str(i + 1), str(s.dup),
                                      str(s.uniq), str(s.slow), str(s.fast), str(s.slow_s), str(s.fast_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                self.procs.append(p)
                line = p.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"demo process {p.pid} did not start (said {line!r})")
        except BaseException:
            self.close()
            raise
        return self

    def end(self, i: int) -> None:
        """End process i now (for a source that exits during the watch)."""
        p = self.procs[i]
        if p.poll() is None:
            p.stdin.close()
            p.wait(self.timeout)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(self.timeout)
            except subprocess.TimeoutExpired:
                p.kill()                      # this Popen's own pid
                p.wait(10)
            if p.stdout:
                p.stdout.close()

    def __exit__(self, *exc) -> None:
        self.close()
