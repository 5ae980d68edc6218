"""The real kernel's KSM, driven through sysfs and madvise: the oracle ksm-proto is compared with.

`KernelKSM` saves every writable knob of /sys/kernel/mm/ksm on entry and restores
them on exit (also on an exception or Ctrl-C), always ending with run=0.  Each "VM"
is a child process of its own that maps anonymous memory, fills it, advises it
MADV_MERGEABLE and waits on a pipe; the parent drives sysfs and reads the
counters and each child's /proc/<pid>/ksm_stat.  Every wait has a timeout; the
children are ended by their pid.
"""
from __future__ import annotations

import errno
import mmap
import os
import select
import time

import numpy as np

KSM_SYSFS = "/sys/kernel/mm/ksm"
PAGE = 4096
COUNTER_FILES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned",
                 "pages_skipped", "full_scans", "general_profit", "stable_node_chains", "stable_node_dups",
                 "ksm_zero_pages")
# restored in this order, run last (max_page_sharing / merge_across_nodes need nothing merged)
KNOB_FILES = ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "smart_scan",
              "stable_node_chains_prune_millisecs", "advisor_max_cpu", "advisor_min_pages_to_scan",
              "advisor_max_pages_to_scan", "advisor_target_scan_time", "advisor_mode",
              "max_page_sharing", "merge_across_nodes")


def _path(name: str) -> str:
    return os.path.join(KSM_SYSFS, name)


def _read(name: str) -> str:
    with open(_path(name)) as f:
        v = f.read().strip()
    if v.startswith("[") or " [" in v:         # advisor_mode reads like "[none] scan-time"
        v = v[v.index("[") + 1:v.index("]")]
    return v


def _write(name: str, value) -> None:
    fd = os.open(_path(name), os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def available() -> tuple[bool, str]:
    """(True, "") if this process may drive the kernel's KSM, else (False, why)."""
    if not os.path.isdir(KSM_SYSFS):
        return False, f"{KSM_SYSFS} does not exist (kernel built without CONFIG_KSM?)"
    try:
        run = _read("run")
        _write("run", run)              # writing the current value changes nothing
    except OSError as e:
        return False, f"{_path('run')} is not writable ({e.strerror}; not root?)"
    if not hasattr(mmap, "MADV_MERGEABLE"):
        return False, "this Python has no mmap.MADV_MERGEABLE"
    return True, ""


class KernelKSM:
    """Drive /sys/kernel/mm/ksm; every knob is put back and run left at 0 on exit."""

    def __enter__(self) -> "KernelKSM":
        self.saved = {}
        for k in KNOB_FILES:
            if os.path.exists(_path(k)):
                self.saved[k] = _read(k)
        self.saved_run = _read("run")
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        try:
            _write("run", 0)
        finally:
            for k in ("advisor_mode",):          # pages_to_scan is EINVAL while the advisor is on
                if k in self.saved and _read(k) != "none":
                    _write(k, "none")
            busy = any(k in self.saved and _read(k) != self.saved[k] for k in ("max_page_sharing",
                                                                              "merge_across_nodes"))
            if busy and int(_read("pages_shared")):
                self.unmerge_all()
            for k, v in self.saved.items():
                if _read(k) != v:
                    try:
                        _write(k, v)
                    except OSError:
                        pass
            _write("run", 0)

    def set(self, **knobs) -> None:
        for k, v in knobs.items():
            if k not in KNOB_FILES and k != "run":
                raise OSError(errno.EINVAL, f"unknown knob {k!r}")
            _write(k, v)

    @staticmethod
    def stats() -> dict[str, int]:
        return {k: int(_read(k)) for k in COUNTER_FILES}

    def wait_full_scans(self, n: int, timeout: float) -> dict:
        start = int(_read("full_scans"))
        deadline = time.monotonic() + timeout
        while int(_read("full_scans")) < start + n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"kernel full_scans stayed at {_read('full_scans')} for {timeout}s: {self.stats()}")
            time.sleep(0.002)
        return self.stats()

    def wait_stable(self, timeout: float, keys=("pages_shared", "pages_sharing", "pages_unshared",
                                                  "stable_node_dups", "ksm_zero_pages")) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            s = self.wait_full_scans(1, max(0.1, deadline - time.monotonic()))
            cur = tuple(s[k] for k in keys)
            if cur == last:
                return s
            last = cur

    def unmerge_all(self, timeout: float = 60) -> None:
        _write("run", 2)
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if not (s["pages_shared"] or s["pages_sharing"] or s["ksm_zero_pages"]):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"run=2 did not unmerge within {timeout}s: {s}")
            time.sleep(0.005)
        _write("run", 0)


class KernelVM:
    """A child process holding one anonymous mapping with the given pages, advised mergeable."""

    _open_go: set[int] = set()       # write ends held for live children: a new child must not keep them

    def __init__(self, pages: np.ndarray, rewrite: int = 0):
        """`rewrite`: the child keeps stamping a new counter into its first `rewrite` pages."""
        self.npages = len(pages)
        r_ready, w_ready = os.pipe()
        r_go, w_go = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the child: map, fill, advise, wait
            code = 0
            try:
                os.close(r_ready)
                os.close(w_go)
                for fd in KernelVM._open_go:         # else an earlier child never sees its EOF
                    os.close(fd)
                m = mmap.mmap(-1, max(1, len(pages)) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                m[:len(pages) * PAGE] = pages.tobytes()
                m.madvise(mmap.MADV_MERGEABLE)
                os.write(w_ready, b"r")
                n = 0
                while rewrite and not select.select([r_go], [], [], 0.0005)[0]:
                    n += 1
                    for i in range(rewrite):           # volatile pages: new bytes all the time
                        m[i * PAGE:i * PAGE + 16] = n.to_bytes(8, "little") + i.to_bytes(8, "little")
                os.read(r_go, 1)                       # until the parent closes its end
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w_ready)
        os.close(r_go)
        self.pid = pid
        self._go = w_go
        KernelVM._open_go.add(w_go)
        ready, _, _ = select.select([r_ready], [], [], 60)
        ok = ready and os.read(r_ready, 1) == b"r"
        os.close(r_ready)
        if not ok:
            self.close()
            raise RuntimeError(f"kernel VM child {pid} did not get ready")

    def ksm_stat(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.pid}/ksm_stat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if v.strip().lstrip("-").isdigit():
                    out[k] = int(v)
        return out

    def close(self) -> None:
        if self.pid is None:
            return
        try:
            os.close(self._go)                         # EOF: the child exits
        except OSError:
            pass
        KernelVM._open_go.discard(self._go)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        else:
            os.kill(self.pid, 9)                       # ours, by pid
            os.waitpid(self.pid, 0)
        self.pid = None


def merge_counts(layouts: list[np.ndarray], knobs: dict, full_scans: int = 3, timeout: float = 60,
                 rewrite: list[int] | None = None) -> dict:
    """The oracle: put each layout in its own process, let ksmd merge, return the counters.

    rewrite[i] leading pages of layout i are rewritten continuously (never stable).
    """
    knobs = {"pages_to_scan": 100000, "sleep_millisecs": 0, **knobs}
    vms: list[KernelVM] = []
    with KernelKSM() as k:
        try:
            k.set(run=0)
            k.unmerge_all()
            k.set(**knobs)
            for i, lay in enumerate(layouts):
                vms.append(KernelVM(lay, (rewrite or [0] * len(layouts))[i]))
            k.set(run=1)
            k.wait_full_scans(full_scans, timeout)
            s = k.wait_stable(timeout)
            _write("run", 0)
            procs = [vm.ksm_stat() for vm in vms]
            s = k.stats()
            return {"ksm": s, "procs": procs}
        finally:
            _write("run", 0)
            for vm in vms:
                vm.close()
            k.unmerge_all()


def ksmd_throughput(pages: np.ndarray, timeout: float = 600) -> dict:
    """The kernel's ksmd at full speed on these bytes: time to merge everything, pages/s."""
    with KernelKSM() as k:
        vm = None
        try:
            k.set(run=0)
            k.unmerge_all()
            k.set(pages_to_scan=100000, sleep_millisecs=0, smart_scan=1)
            vm = KernelVM(pages)
            s0 = k.stats()
            t0 = time.monotonic()
            k.set(run=1)
            last, same, t_merged = None, 0, None
            deadline = t0 + timeout
            while True:
                s = k.wait_full_scans(1, max(0.1, deadline - time.monotonic()))
                cur = (s["pages_shared"], s["pages_sharing"])
                if cur != last:
                    t_merged = time.monotonic()
                same = same + 1 if cur == last else 0
                last = cur
                if same >= 2 and s["full_scans"] - s0["full_scans"] >= 2:
                    break
            elapsed = time.monotonic() - t0
            _write("run", 0)
            return {"pages_per_s": round((s["pages_scanned"] - s0["pages_scanned"]) / elapsed),
                    "merge_seconds": round(t_merged - t0, 3), "full_scans": s["full_scans"] - s0["full_scans"],
                    "pages_shared": s["pages_shared"], "pages_sharing": s["pages_sharing"]}
        finally:
            _write("run", 0)
            if vm:
                vm.close()
            k.unmerge_all()


def kernel_cow_us(npages: int = 4096) -> dict:
    """The kernel's own COW of a KSM page: write one byte into each of npages merged pages."""
    with KernelKSM() as k:
        m = None
        try:
            k.set(run=0)
            k.unmerge_all()
            k.set(pages_to_scan=100000, sleep_millisecs=0)
            m = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m[:] = b"\x05" * (npages * PAGE)
            m.madvise(mmap.MADV_MERGEABLE)
            k.set(run=1)
            deadline = time.monotonic() + 60
            while sum(k.stats()[c] for c in ("pages_shared", "pages_sharing")) < npages:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"kernel did not merge {npages} pages: {k.stats()}")
                time.sleep(0.005)
            _write("run", 0)                          # stop, keep merged
            view = memoryview(m)
            ts = np.empty(npages)
            pc = time.perf_counter_ns
            for i in range(npages):
                t = pc()
                view[i * PAGE] = 6                    # a COW fault on a KSM page
                ts[i] = pc() - t
            ts2 = np.empty(npages)
            for i in range(npages):
                t = pc()
                view[i * PAGE] = 7                    # now private and writable
                ts2[i] = pc() - t
            view.release()
            return {"cow_p50_us": round(float(np.median(ts)) / 1000, 2),
                    "cow_mean_us": round(float(ts.mean()) / 1000, 2),
                    "unmerged_p50_us": round(float(np.median(ts2)) / 1000, 3)}
        finally:
            _write("run", 0)
            if m is not None:
                m.close()
            k.unmerge_all()
