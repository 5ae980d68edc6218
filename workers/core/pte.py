"""Address and VMA arithmetic shared by the cores: page indices, VMA masks, mergeable ranges."""
from __future__ import annotations

import numpy as np

from proto.layout import PAGE_SHIFT, USER_BASE, VM_MERGEABLE


def vma_mask(vmas, idx: np.ndarray) -> np.ndarray:
    """Which page indices fall inside a VMA of the list vmas [(start, end, flags)]."""
    ok = np.zeros(len(idx), dtype=bool)
    addrs = USER_BASE + (idx.astype(np.int64) << PAGE_SHIFT)
    for start, end, _ in vmas:
        ok |= (addrs >= start) & (addrs < end)
    return ok


def mergeable_ranges(vmas) -> list[tuple[int, int]]:
    """Page-index ranges [a, b) of the VM_MERGEABLE areas of a VMA list."""
    return [((s - USER_BASE) >> PAGE_SHIFT, (e - USER_BASE) >> PAGE_SHIFT) for s, e, f in vmas if f & VM_MERGEABLE]
