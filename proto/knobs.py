"""KSM knobs: their kernel defaults and the kernel's validation rules (EINVAL / EBUSY).

Pure definitions, shared by the scanner (which applies knobs) and the CLI and
scenario loader (which check them early to give a clear error).

Two knobs are ksm-proto's own (`OWN`), not the kernel's: `scanners`, the number of
scanner processes that share ksmd's work (workers/mm/ksm/shard.py), and
`fault_handlers`, the number of fault-handler processes (each serves the VMs whose
mm id is its number modulo their count).  Both are chosen when the machine starts
(Machine(scanners=N, fault_handlers=F), or a scenario's [ksm] table); writing
another value to a running machine is EBUSY.

A third, `fault_poll_us`, can change at any time: how long a fault handler, once it has
served a fault, and a VM waiting for its fault's reply poll their sockets before they
sleep (KVM's halt_poll_ns, for the same reason: waking a sleeping process costs more
than the wait); 0 sleeps at once.

A fourth, `mitigation`, picks a defence against the dedup timing side channel (docs/security.md):
"none" (0, the kernel's KSM), "vusion" (1: every merge candidate write-protected, merged or
not, every write fault on such a page copies, new KSM pages in frames taken at random: VUsion's
"same behaviour"), "domain" (2: pages
merge only with pages of VMs of the same security domain, `Machine.spawn_vm(..., domain=)`),
"zero" (3: only zero-filled pages merge).  Like max_page_sharing it cannot change while pages
are merged (EBUSY).
"""
from __future__ import annotations

import errno

UINT_MAX = 2**32 - 1

DEFAULTS = {
    "run": 0,
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
    "max_page_sharing": 256,
    "use_zero_pages": 0,
    "merge_across_nodes": 1,
    "smart_scan": 1,
    "stable_node_chains_prune_millisecs": 2000,
    "advisor_mode": 0,
    "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500,
    "advisor_max_pages_to_scan": 30000,
    "advisor_target_scan_time": 200,
    "scanners": 1,
    "fault_handlers": 1,
    "fault_poll_us": 200,
    "mitigation": 0,
}
OWN = ("scanners", "fault_handlers")
MAX_SCANNERS = 64
MAX_FAULT_POLL_US = 100_000
ADVISOR_MODES = ("none", "scan-time")
MITIGATIONS = ("none", "vusion", "domain", "zero")
# knobs that can only change while nothing is merged
BUSY_WHEN_MERGED = ("max_page_sharing", "merge_across_nodes", "mitigation")


def knob_error(msg: str, err: int = errno.EINVAL) -> OSError:
    return OSError(err, f"{msg}: {errno.errorcode[err]}")


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise knob_error(f"knob {name}={value!r} is not an integer")


def check_knob(name: str, value) -> int:
    """The value to store for knob `name`, or OSError(EINVAL) naming the knob and the problem."""
    if name not in DEFAULTS:
        raise knob_error(f"unknown knob {name!r} (known: {', '.join(DEFAULTS)})")
    if name == "advisor_mode":
        if isinstance(value, str):
            if value not in ADVISOR_MODES:
                raise knob_error(f"knob advisor_mode={value!r} must be one of {ADVISOR_MODES}")
            return ADVISOR_MODES.index(value)
        value = _as_int(name, value)
        if value not in (0, 1):
            raise knob_error(f"knob advisor_mode={value!r} must be 'none' or 'scan-time'")
        return value
    if name == "mitigation":
        if isinstance(value, str) and not value.strip().isdigit():
            if value not in MITIGATIONS:
                raise knob_error(f"knob mitigation={value!r} must be one of {MITIGATIONS}")
            return MITIGATIONS.index(value)
        value = _as_int(name, value)
        if not 0 <= value < len(MITIGATIONS):
            raise knob_error(f"knob mitigation={value!r} must be one of {MITIGATIONS} (or 0..{len(MITIGATIONS) - 1})")
        return value
    v = _as_int(name, value)
    limits = {
        "run": (0, 2),
        "pages_to_scan": (0, UINT_MAX),
        "sleep_millisecs": (0, 60_000),
        "max_page_sharing": (2, 2**31 - 1),
        "use_zero_pages": (0, 1),
        "merge_across_nodes": (0, 1),
        "smart_scan": (0, 1),
        "stable_node_chains_prune_millisecs": (0, UINT_MAX),
        "advisor_max_cpu": (0, 2**63 - 1),
        "advisor_min_pages_to_scan": (0, 2**63 - 1),
        "advisor_max_pages_to_scan": (0, 2**63 - 1),
        "advisor_target_scan_time": (1, 2**63 - 1),
        "scanners": (1, MAX_SCANNERS),
        "fault_handlers": (1, MAX_SCANNERS),
        "fault_poll_us": (0, MAX_FAULT_POLL_US),
    }
    lo, hi = limits[name]
    if not lo <= v <= hi:
        raise knob_error(f"knob {name}={v} out of range [{lo}, {hi}]")
    return v
