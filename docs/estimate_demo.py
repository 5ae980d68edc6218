"""The README's `ksm-proto estimate` run: six processes on this machine, estimated, checked against the kernel.

    sudo .venv/bin/python docs/estimate_demo.py [--plot docs/estimate.png] [-- more estimate args]
    sudo .venv/bin/python docs/estimate_demo.py --watch 8 --interval 0.25 --pages-to-scan 1000 \
        --sleep-millisecs 20 --verify-kernel [--plot docs/estimate-watch.png]

With --watch the workload is the one of workers/estimate/watch_demo.py instead (see docs/estimate.md):
four processes whose memory has stable duplicates, unique pages, slowly changing pages
(each rewritten every 6 s) and fast-changing pages (every 50 ms).

Four "replicas" hold the same 32 MiB of data (as identical VMs or service replicas do) plus
16 MiB of zeroed buffers; two "batch" jobs hold 32 MiB each of their own data.  Each names
itself (prctl PR_SET_NAME) so the output says who is who.  The processes are ended by their
pid when the estimate is done.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = r"""
import ctypes, sys, numpy as np
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)          # PR_SET_NAME
data = np.random.default_rng(int(sys.argv[2])).integers(0, 2**62, 2**22)   # 32 MiB
zero = np.ones(2**21)
zero[:] = 0                                                          # 16 MiB of written zero pages
print("ready", flush=True)
sys.stdin.read()
"""


def main(argv: list[str]) -> int:
    if "--watch" in argv:
        sys.path.insert(0, ROOT)
        from workers.estimate.watch_demo import Demo
        with Demo() as d:
            cmd = [sys.executable, "-m", "workers.tools.cli", "estimate", "--pid", *map(str, d.pids), *argv]
            return subprocess.run(cmd, cwd=ROOT).returncode
    procs = []
    try:
        for name, seed in [(f"replica-{i}", 42) for i in range(1, 5)] + [("batch-1", 1), ("batch-2", 2)]:
            p = subprocess.Popen([sys.executable, "-c", WORKER, name, str(seed)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready"
        cmd = [sys.executable, "-m", "workers.tools.cli", "estimate", "--pid", *[str(p.pid) for p in procs], *argv]
        return subprocess.run(cmd, cwd=ROOT).returncode
    finally:
        for p in procs:                      # each by its pid
            p.stdin.close()
            p.wait(30)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
