"""ksm-proto's shared definitions: layout, PTE bits, messages, channel framing, trace format, knobs.

Nothing in proto/ starts a process; every actor imports from here.
"""
from .layout import (PAGE_SIZE, PAGE_SHIFT, USER_BASE, VM_HUGETLB, VM_IO, VM_MERGEABLE, VM_MIXEDMAP,
                     VM_PFNMAP, VM_SHARED, VM_DONTEXPAND)

# the kernel's values (include/uapi/asm-generic/mman-common.h, include/uapi/linux/prctl.h)
MADV_DONTNEED = 4
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68
NOTIFIER_MODES = ("change_pte", "wrapped", "invalidate")

__all__ = ["PAGE_SIZE", "PAGE_SHIFT", "USER_BASE", "MADV_DONTNEED", "MADV_MERGEABLE", "MADV_UNMERGEABLE",
           "PROT_NONE", "PROT_READ", "PROT_WRITE", "PROT_EXEC", "PR_SET_MEMORY_MERGE", "PR_GET_MEMORY_MERGE",
           "NOTIFIER_MODES", "VM_SHARED", "VM_HUGETLB", "VM_PFNMAP", "VM_IO", "VM_MIXEDMAP", "VM_DONTEXPAND",
           "VM_MERGEABLE"]
