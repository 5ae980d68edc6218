"""The no-lost-writes stress: VMs write while ksmd merges, copies and re-merges their pages.

A driver over the public API (no process of its own).  Each VM's region holds
pages that keep becoming identical (few distinct byte values), so merges, COW
faults and re-merges happen all the time while ksmd runs at full speed.  Two
kinds of writers run at once:

  * one thread per VM in this process, writing sub-page ranges through
    vm.write(); each write is recorded here, in an independent bytearray;
  * a writer workload inside each VM worker, writing whole pages from a seeded
    RNG; its writes are replayed here from the same seed.

At the end every byte of every VM is read back and compared with the record.
"""
from __future__ import annotations

import random
import threading
import time

from proto import MADV_MERGEABLE, PAGE_SIZE


def replay_writer(npages: int, seed: int, count: int, values: int, into: bytearray, base_page: int) -> None:
    """What VMWorker.writer wrote: the same RNG calls, in the same order."""
    rng = random.Random(seed)
    for _ in range(count):
        page = rng.randrange(npages)
        val = rng.randrange(values) + 1
        o = (base_page + page) * PAGE_SIZE
        into[o:o + PAGE_SIZE] = bytes([val]) * PAGE_SIZE


def no_lost_writes(m, nvms: int = 3, pages: int = 64, thread_writes: int = 300, worker_writes: int = 300,
                   values: int = 3, seed: int = 0, timeout: float = 300.0, progress=None) -> dict:
    """Run the stress on a started Machine; returns writes, mismatches and churn figures."""
    half = pages // 2
    m.ksm.set(pages_to_scan=100000, sleep_millisecs=0, smart_scan=0)
    vms, addrs, records = [], [], []
    for i in range(nvms):
        vm = m.spawn_vm(f"stress{i}", pages=pages + 64)
        a = vm.mmap(pages * PAGE_SIZE)
        rec = bytearray(b"\x01" * pages * PAGE_SIZE)
        vm.write(a, bytes(rec))
        vm.madvise(a, pages * PAGE_SIZE, MADV_MERGEABLE)
        vms.append(vm)
        addrs.append(a)
        records.append(rec)
    m.ksm.set(run=1)
    m.ksm.wait_full_scans(2, 60)
    before = m.ksm.stats()
    t0 = time.monotonic()
    wids = [vm.writer_start(a + half * PAGE_SIZE, pages - half, seed * 1000 + i, worker_writes, values)
            for i, (vm, a) in enumerate(zip(vms, addrs))]
    errors: list[BaseException] = []
    done = [0] * nvms

    def thread_writer(i: int) -> None:
        rng = random.Random(seed * 7919 + i)
        vm, a, rec = vms[i], addrs[i], records[i]
        try:
            for k in range(thread_writes):
                p = rng.randrange(half)
                if rng.random() < 0.5:          # whole page: often identical to others
                    off, ln = 0, PAGE_SIZE
                    data = bytes([rng.randrange(values) + 1]) * PAGE_SIZE
                else:                           # a sub-page write, possibly crossing into the next page
                    off = rng.randrange(PAGE_SIZE)
                    ln = min(rng.randrange(1, PAGE_SIZE), half * PAGE_SIZE - (p * PAGE_SIZE + off))
                    data = bytes([rng.randrange(values) + 1]) * ln
                o = p * PAGE_SIZE + off
                vm.write(a + o, data)
                rec[o:o + len(data)] = data
                done[i] = k + 1
        except BaseException as e:  # reported to the caller
            errors.append(e)

    threads = [threading.Thread(target=thread_writer, args=(i,), daemon=True) for i in range(nvms)]
    for t in threads:
        t.start()
    deadline = t0 + timeout
    for t in threads:
        while t.is_alive() and time.monotonic() < deadline:
            t.join(0.2)
            if progress:
                progress(sum(done))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"stress writers still running after {timeout:.0f}s")
    if errors:
        raise errors[0]
    worker_done = []
    for i, (vm, wid) in enumerate(zip(vms, wids)):
        while not vm.writer_peek(wid)["finished"]:     # count-limited writers end by themselves
            if time.monotonic() > deadline:
                raise TimeoutError(f"writer in {vm.name} still running after {timeout:.0f}s")
            time.sleep(0.05)
        st = vm.writer_stop(wid)
        if st["error"]:
            raise RuntimeError(f"writer in {vm.name} failed: {st['error']}")
        worker_done.append(st["done"])
        replay_writer(pages - half, seed * 1000 + i, st["done"], values, records[i], half)
    elapsed = time.monotonic() - t0
    after = m.ksm.stats()
    mismatched_pages = 0
    examples = []
    for vm, a, rec in zip(vms, addrs, records):
        got = vm.read(a, pages * PAGE_SIZE)
        for p in range(pages):
            g, want = got[p * PAGE_SIZE:(p + 1) * PAGE_SIZE], rec[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
            if g != want:
                mismatched_pages += 1
                bad = [k for k in range(PAGE_SIZE) if g[k] != want[k]]
                if len(examples) < 5:
                    examples.append(f"{vm.name} page {p} ({'worker' if p >= half else 'thread'} half): "
                                    f"{len(bad)} bytes differ in [{bad[0]}, {bad[-1]}], "
                                    f"got {g[bad[0]]} want {want[bad[0]]}")
    vstats = [vm.stats() for vm in vms]
    m.ksm.set(run=0)
    frame_problems = m.check_frames()
    for vm in vms:
        vm.close()
    writes = nvms * thread_writes + sum(worker_done)
    return {
        "writes": writes,
        "thread_writes": nvms * thread_writes,
        "worker_writes": sum(worker_done),
        "mismatches": mismatched_pages,
        "mismatch_examples": examples,
        "frame_problems": frame_problems,
        "seconds": round(elapsed, 3),
        "writes_per_s": round(writes / elapsed, 1) if elapsed else None,
        "cow_faults": sum(v["cow_faults"] for v in vstats),
        "secondary_faults": sum(v["secondary_faults"] for v in vstats),
        "full_scans": after["full_scans"] - before["full_scans"],
        "pages_sharing_end": after["pages_sharing"],
    }
