"""The dedup timing side channel: the attack on ksm-proto and on the real kernel, and its defences.

A victim holds a secret page or not (at random, per trial); an attacker fills a page with its
guess of the secret, waits for the scanner (full scans, as an attacker would wait) and times a
one-byte write to its page: a merged page takes a copy-on-write fault, an unmerged one does
not (Suzaki et al. 2011; Bosman et al., "Dedup Est Machina", S&P 2016).  Many trials run in
one scan, one page each, each with its own random secret.

This module owns the attack (`attack_proto`, `attack_kernel`), its statistics (`roc_auc`,
`best_accuracy`, `summarize`), the side-by-side comparison of the defences (`compare`, the
`mitigation` knob of proto/knobs.py) and their plots; `ksm-proto sidechannel` is its command
line and `ksm-proto bench --only sidechannel` its bench part.

On ksm-proto the attacker's VM worker times each write itself (`VM.timed_writes`), around the
access and its fault.  On the kernel (`--kernel`) the victim is a child process holding its
pages MADV_MERGEABLE, the attacker this process, the write timed with perf_counter_ns around a
one-byte store into the page through a memoryview; every knob of /sys/kernel/mm/ksm is saved
and restored (workers/oracle/kernel_ksm.py) and run is never left at 1.

Besides the trials, the victim shares `shared` pages with a neighbour VM of its own security
domain (half zero-filled, half random): what domain isolation must keep merging.  The
attacker is in another domain.  saved_fraction is the pages saved (pages_sharing +
ksm_zero_pages) over those of the undefended run on the same data (same seed).
"""
from __future__ import annotations

import os
import time

import numpy as np

from proto import MADV_MERGEABLE, PAGE_SIZE
from proto.knobs import MITIGATIONS

SCANS = 3                   # full scans to wait: a page merges at the earliest on the second that sees it
CHUNK_PAGES = 256           # pages per VM.write call
VICTIM_DOMAIN, ATTACKER_DOMAIN = 0, 1


# ---------------------------------------------------------------------------- statistics
def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    end = np.cumsum(cnt)
    return (end - (cnt - 1) / 2.0)[inv.reshape(-1)]


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of `scores` (higher: more likely labelled True), Mann-Whitney U."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        raise ValueError(f"roc_auc needs both classes ({n1} positive, {n0} negative)")
    r = _ranks(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) for every threshold "positive if score >= t", from (0, 0) to (1, 1)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    t = np.unique(s)[::-1]
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    tpr = (len(pos) - np.searchsorted(pos, t, side="left")) / max(1, len(pos))
    fpr = (len(neg) - np.searchsorted(neg, t, side="left")) / max(1, len(neg))
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def best_accuracy(scores, labels) -> tuple[float, float]:
    """(accuracy, threshold) of the best rule "present if score >= threshold" (inf: always absent)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    t = np.concatenate([np.unique(s), [np.inf]])
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    tp = len(pos) - np.searchsorted(pos, t, side="left")
    tn = np.searchsorted(neg, t, side="left")
    acc = (tp + tn) / len(s)
    k = int(np.argmax(acc))
    return float(acc[k]), float(t[k])


def _pct(x: np.ndarray, q: float) -> float:
    return round(float(np.percentile(x, q)), 2) if len(x) else float("nan")


def summarize(ns, present, backend: str, mitigation: str) -> dict:
    """The attack's verdict from per-trial write times (ns) and the truth (present)."""
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    y = np.asarray(present, dtype=bool)
    acc, thr = best_accuracy(us, y)
    return {"backend": backend, "mitigation": mitigation, "trials": int(len(us)),
            "present": int(y.sum()), "auc": round(roc_auc(us, y), 4), "accuracy": round(acc, 4),
            "threshold_us": round(thr, 2) if np.isfinite(thr) else None,
            "write_p50_us": {"present": _pct(us[y], 50), "absent": _pct(us[~y], 50)},
            "write_p99_us": {"present": _pct(us[y], 99), "absent": _pct(us[~y], 99)}}


# ---------------------------------------------------------------------------- the data
def make_data(trials: int, seed: int, shared: int) -> dict:
    """The trials' secrets, who holds what, and the victim's and neighbour's shared pages."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 2:
        raise ValueError(f"trials={trials!r}: at least 2 trials")
    rng = np.random.default_rng(seed)
    secrets = rng.integers(0, 256, (trials, PAGE_SIZE), dtype=np.uint8)
    present = rng.random(trials) < 0.5
    if present.all() or not present.any():        # both classes, always (the AUC needs them)
        present[0] = not present[0]
    decoys = rng.integers(0, 256, (trials, PAGE_SIZE), dtype=np.uint8)
    victim = np.where(present[:, None], secrets, decoys)
    common = np.zeros((shared, PAGE_SIZE), dtype=np.uint8)
    common[shared // 2:] = rng.integers(0, 256, (shared - shared // 2, PAGE_SIZE), dtype=np.uint8)
    return {"secrets": secrets, "present": present, "victim": victim, "common": common}


# ---------------------------------------------------------------------------- ksm-proto
def _fill(vm, pages: np.ndarray) -> int:
    n = len(pages)
    addr = vm.mmap(n * PAGE_SIZE)
    flat = pages.reshape(-1)
    for k in range(0, n, CHUNK_PAGES):
        vm.write(addr + k * PAGE_SIZE, flat[k * PAGE_SIZE:(k + CHUNK_PAGES) * PAGE_SIZE].tobytes())
    return addr


def _same_frames(a: list, b: list) -> int:
    return sum(1 for x, y in zip(a, b) if x is not None and x == y)


def run_proto(trials: int, mitigation: str = "none", seed: int = 0, shared: int | None = None,
              notifier_mode: str = "change_pte", timeout: float = 120.0) -> dict:
    """One run of the attack on ksm-proto: the raw per-trial times and what merged."""
    if mitigation not in MITIGATIONS:
        raise ValueError(f"mitigation {mitigation!r} is not one of {', '.join(MITIGATIONS)}")
    from workers.actors.supervisor import Machine
    shared = max(16, trials // 4) if shared is None else shared
    d = make_data(trials, seed, shared)
    n = trials
    frames = 4 * (n + shared) + 1024
    pages = n + shared + 16
    with Machine(frames=frames, notifier_mode=notifier_mode, mitigation=mitigation) as m:
        victim = m.spawn_vm("victim", pages=pages, domain=VICTIM_DOMAIN)
        neighbour = m.spawn_vm("neighbour", pages=pages, domain=VICTIM_DOMAIN)
        attacker = m.spawn_vm("attacker", pages=pages, domain=ATTACKER_DOMAIN)
        v_sec = _fill(victim, d["victim"])
        v_com = _fill(victim, d["common"])
        n_com = _fill(neighbour, d["common"])
        a_sec = _fill(attacker, d["secrets"])
        for vm, addr, k in ((victim, v_sec, n), (victim, v_com, shared), (neighbour, n_com, shared),
                            (attacker, a_sec, n)):
            vm.madvise(addr, k * PAGE_SIZE, MADV_MERGEABLE)
        m.ksm.set(pages_to_scan=100000, sleep_millisecs=0, run=1)
        c0 = m.ksm.wait_full_scans(1, timeout)      # the scan that saw the pages first may have started early
        t1 = time.monotonic()
        c = m.ksm.wait_full_scans(SCANS, timeout)
        t2 = time.monotonic()
        m.ksm.set(run=0)                            # stopped: what merged stays merged
        scan_rate = (c["pages_scanned"] - c0["pages_scanned"]) / max(1e-9, t2 - t1)
        within = _same_frames(victim.pagemap(v_com, shared), neighbour.pagemap(n_com, shared))
        cross = _same_frames(victim.pagemap(v_sec, n), attacker.pagemap(a_sec, n))
        faults0 = attacker.stats()["primary_faults"]
        ns = attacker.timed_writes(a_sec, n)
        faults = attacker.stats()["primary_faults"] - faults0
    return {"ns": ns, "present": d["present"], "saved_pages": int(c["pages_sharing"] + c["ksm_zero_pages"]),
            "within_domain_pages": within, "cross_domain_pages": cross, "probe_faults": int(faults),
            "scan_pages_per_s": round(scan_rate), "shared": shared, "counters": c}


def attack_proto(trials: int, mitigation: str = "none", seed: int = 0, shared: int | None = None,
                 notifier_mode: str = "change_pte", baseline: dict | None = None) -> dict:
    """The attack on ksm-proto under `mitigation`, its savings against the undefended run's on the same
    data (`baseline`: that run, if already made, else made here)."""
    raw = run_proto(trials, mitigation, seed, shared, notifier_mode)
    if mitigation == "none":
        baseline = raw
    elif baseline is None:
        baseline = run_proto(trials, "none", seed, shared, notifier_mode)
    return _result(raw, baseline, mitigation)


def _result(raw: dict, base: dict, mitigation: str) -> dict:
    r = summarize(raw["ns"], raw["present"], "proto", mitigation)
    us = np.asarray(raw["ns"], dtype=np.float64) / 1000.0
    r.update(saved_pages=raw["saved_pages"],
             saved_fraction=round(raw["saved_pages"] / base["saved_pages"], 4) if base["saved_pages"] else None,
             within_domain_pages=raw["within_domain_pages"],
             within_domain_saved_fraction=(round(raw["within_domain_pages"] / base["within_domain_pages"], 4)
                                           if base["within_domain_pages"] else None),
             cross_domain_pages=raw["cross_domain_pages"], shared_pages=raw["shared"],
             faults_per_full_scan=raw["probe_faults"],
             write_p50_all_us=_pct(us, 50), write_p99_all_us=_pct(us, 99),
             scan_pages_per_s=raw["scan_pages_per_s"], _ns=list(map(int, raw["ns"])),
             _present=[bool(x) for x in raw["present"]])
    return r


def compare(trials: int, seed: int = 0, mitigations=MITIGATIONS, shared: int | None = None,
            notifier_mode: str = "change_pte") -> list[dict]:
    """Every defence side by side on the same data; the undefended run first (the savings' yardstick)."""
    base = run_proto(trials, "none", seed, shared, notifier_mode)
    out = []
    for mit in mitigations:
        raw = base if mit == "none" else run_proto(trials, mit, seed, shared, notifier_mode)
        out.append(_result(raw, base, mit))
    return out


# ---------------------------------------------------------------------------- the real kernel
def kernel_unavailable() -> str | None:
    """Why the attack cannot run on this kernel's KSM (None: it can)."""
    from workers.oracle import kernel_ksm
    ok, why = kernel_ksm.available()
    if not ok:
        return why
    others = kernel_ksm.other_ksm_processes()
    if others:
        return f"KSM is in use by other processes (pids {sorted(others)[:8]}): their pages would share ksmd"
    return None


def attack_kernel(trials: int, seed: int = 0, timeout: float = 120.0) -> dict:
    """The attack on the real kernel: a victim child process, this process the attacker, ksmd merging.

    RuntimeError naming the reason where the kernel's KSM cannot be driven (kernel_unavailable)."""
    from workers.oracle import kernel_ksm as kk
    why = kernel_unavailable()
    if why:
        raise RuntimeError(f"the kernel's KSM cannot be used here: {why}")
    d = make_data(trials, seed, 0)
    n = trials
    deadline = time.monotonic() + timeout
    with kk.KernelKSM() as k:
        region = victim = None
        try:
            kk._start(k, {"pages_to_scan": 100000, "sleep_millisecs": 0}, timeout)
            victim = kk.KernelVM(d["victim"])
            region = kk.KernelRegion(n)
            region.fill(d["secrets"])
            region.madvise_mergeable()
            k.set(run=1)
            k.wait_full_scans(1, max(1.0, deadline - time.monotonic()))
            c = k.wait_full_scans(SCANS, max(1.0, deadline - time.monotonic()))
            k.set(run=0)                          # stopped; the pages stay merged
            merged = kk.ksm_stat()["ksm_merging_pages"]
            pc = time.perf_counter_ns
            ns = [0] * n
            with memoryview(region.mmap) as mv:
                for i in range(n):
                    off = i * PAGE_SIZE
                    t = pc()
                    mv[off] = 0xA5                 # one byte: a COW fault if the page was merged
                    ns[i] = pc() - t
        finally:
            try:
                if victim is not None:
                    victim.close()
            finally:
                kk._stop_close_unmerge(k, region, deadline)
    r = summarize(ns, d["present"], "kernel", "none")
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    r.update(saved_pages=int(c["pages_sharing"] + c.get("ksm_zero_pages", 0)), saved_fraction=1.0,
             cross_domain_pages=int(merged), write_p50_all_us=_pct(us, 50), write_p99_all_us=_pct(us, 99),
             _ns=list(map(int, ns)), _present=[bool(x) for x in d["present"]])
    return r


# ---------------------------------------------------------------------------- plots
def _plt():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'ksm-proto[bench]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(results: list[dict], path: str) -> None:
    """For each result: both latency distributions (log x), and every result's ROC curve together."""
    plt = _plt()
    k = len(results)
    fig, axes = plt.subplots(1, k + 1, figsize=(4.2 * (k + 1), 3.6))
    for ax, r in zip(axes[:k], results):
        us = np.asarray(r["_ns"], dtype=np.float64) / 1000.0
        y = np.asarray(r["_present"], dtype=bool)
        bins = np.logspace(np.log10(max(0.01, us.min())), np.log10(us.max() * 1.01), 50)
        ax.hist(us[~y], bins=bins, alpha=0.6, label="victim does not hold it")
        ax.hist(us[y], bins=bins, alpha=0.6, label="victim holds it")
        ax.set_xscale("log")
        ax.set_xlabel("attacker's write (us)")
        ax.set_title(f"{r['backend']} / {r['mitigation']}: AUC {r['auc']:.2f}")
        ax.legend(fontsize=7)
    ax = axes[k]
    for r in results:
        fpr, tpr = roc_curve(np.asarray(r["_ns"]), np.asarray(r["_present"]))
        ax.plot(fpr, tpr, label=f"{r['backend']}/{r['mitigation']} ({r['auc']:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def public(r: dict) -> dict:
    """A result without its raw samples (the keys starting with _)."""
    return {k: v for k, v in r.items() if not k.startswith("_")}


def table(results: list[dict]) -> str:
    """The side-by-side table (markdown)."""
    head = ("| mitigation | AUC | accuracy | saved (of undefended) | within-domain kept | faults/full scan | "
            "write p50 / p99 us (held) | write p50 / p99 us (not held) | scan pages/s |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        f = r.get("saved_fraction")
        w = r.get("within_domain_saved_fraction")
        lines.append(f"| {r['backend']}/{r['mitigation']} | {r['auc']:.3f} | {r['accuracy']:.3f} | "
                     f"{'-' if f is None else f'{f:.2f}'} | {'-' if w is None else f'{w:.2f}'} | "
                     f"{r.get('faults_per_full_scan', '-')} | "
                     f"{r['write_p50_us']['present']} / {r['write_p99_us']['present']} | "
                     f"{r['write_p50_us']['absent']} / {r['write_p99_us']['absent']} | "
                     f"{r.get('scan_pages_per_s', '-')} |")
    return "\n".join(lines)


def default_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# ---------------------------------------------------------------------------- command line
def add_arguments(s) -> None:
    s.add_argument("--trials", type=int, default=400, help="trials, one page each (default 400)")
    s.add_argument("--mitigation", default="none", choices=[*MITIGATIONS, "all"],
                   help="the defence in ksm-proto (the `mitigation` knob); all: every one side by side")
    s.add_argument("--kernel", action="store_true", help="attack the real kernel's KSM instead (root; no defence)")
    s.add_argument("--seed", type=int, help="seed of the secrets (default: random)")
    s.add_argument("--notifier-mode", choices=["change_pte", "wrapped", "invalidate"], default="change_pte")
    s.add_argument("--json", action="store_true", help="print one JSON object (a list with --mitigation all)")
    s.add_argument("--plot", metavar="FILE.png", help="plot both latency distributions and the ROC curve")


def cli(a) -> int:
    """`ksm-proto sidechannel`: exit 0 done, 1 the kernel's KSM cannot be used here, 2 bad usage."""
    import json
    import sys
    if not 2 <= a.trials <= 65536:
        print(f"ksm-proto sidechannel: --trials {a.trials}: must be in 2..65536", file=sys.stderr)
        return 2
    if a.seed is not None and not 0 <= a.seed < 2**63:
        print(f"ksm-proto sidechannel: --seed {a.seed}: must be in 0..2**63-1", file=sys.stderr)
        return 2
    if a.kernel and a.mitigation != "none":
        print("ksm-proto sidechannel: --kernel attacks the kernel's own KSM, which has no --mitigation",
              file=sys.stderr)
        return 2
    seed = default_seed() if a.seed is None else a.seed
    if a.kernel:
        why = kernel_unavailable()
        if why:
            print(f"ksm-proto sidechannel --kernel: cannot run: {why}", file=sys.stderr)
            return 1
        results = [attack_kernel(a.trials, seed)]
    elif a.mitigation == "all":
        results = compare(a.trials, seed, notifier_mode=a.notifier_mode)
    else:
        results = [attack_proto(a.trials, a.mitigation, seed, notifier_mode=a.notifier_mode)]
    for r in results:
        r["seed"] = seed
    if a.plot:
        plot(results, a.plot)
    if a.json:
        out = [public(r) for r in results]
        print(json.dumps(out if a.mitigation == "all" else out[0]))
    else:
        print(table(results))
        print(f"(seed {seed}; AUC 0.5: the attacker guesses; 1.0: it always knows)")
    return 0
