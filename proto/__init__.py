"""ksm-proto's shared definitions: layout, PTE bits, messages, channel framing, trace format, knobs.

Nothing in proto/ starts a process; every actor imports from here.
"""
from .layout import (PAGE_SIZE, PAGE_SHIFT, USER_BASE, VM_HUGETLB, VM_IO, VM_MERGEABLE, VM_MIXEDMAP,
                     VM_PFNMAP, VM_SHARED, VM_DONTEXPAND)

MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
NOTIFIER_MODES = ("change_pte", "wrapped", "invalidate")

__all__ = ["PAGE_SIZE", "PAGE_SHIFT", "USER_BASE", "MADV_MERGEABLE", "MADV_UNMERGEABLE", "NOTIFIER_MODES",
           "VM_SHARED", "VM_HUGETLB", "VM_PFNMAP", "VM_IO", "VM_MIXEDMAP", "VM_DONTEXPAND", "VM_MERGEABLE"]
