"""core.pte.check_range against a model of the kernel's checks, and through a real VM.

The model below is the kernel's C, line by line, in unsigned 64-bit arithmetic (the
syscall arguments are unsigned long / size_t): do_vmi_munmap, do_madvise,
do_mprotect_pkey, do_mmap's length rules, and copy_{to,from}_user's range check.  Our
address space is [USER_BASE, TASK): USER_BASE plays mmap_min_addr for munmap (a range
starting below it is EINVAL, as one past TASK_SIZE is), TASK plays TASK_SIZE.
"""
from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proto import MADV_MERGEABLE, PAGE_SIZE, USER_BASE
from workers.mm.pte import RANGE_OPS, check_range, task_size

M64 = (1 << 64) - 1
NPAGES = 1 << 20
TASK = task_size(NPAGES)


def u64(x: int) -> int:
    return x & M64


def page_align(n: int) -> int:            # PAGE_ALIGN on an unsigned long: wraps to 0
    return u64(n + PAGE_SIZE - 1) & u64(~(PAGE_SIZE - 1))


def model(op: str, addr: int, length: int, task: int):
    """The kernel's answer: ("ok", start, end) | ("nop",) | ("err", errno)."""
    if (op != "mmap" and not -(1 << 63) <= addr <= M64) or not -(1 << 63) <= length <= M64:
        return ("err", errno.EINVAL)           # (mmap takes no address here)
    start, len_in = u64(addr), u64(length)
    if op == "mmap":
        if len_in == 0:
            return ("err", errno.EINVAL)
        ln = page_align(len_in)
        if not ln or ln > task - USER_BASE:
            return ("err", errno.ENOMEM)
        return ("ok", 0, ln)
    if op == "access":
        if len_in == 0:
            return ("nop",)
        end = u64(start + len_in)
        if end < start or start < USER_BASE or end > task:
            return ("err", errno.EFAULT)
        return ("ok", start, end)
    if start & (PAGE_SIZE - 1):
        return ("err", errno.EINVAL)
    if op == "munmap":
        if start < USER_BASE or start > task or len_in > task - start:
            return ("err", errno.EINVAL)
        ln = page_align(len_in)
        if ln == 0:
            return ("err", errno.EINVAL)
        return ("ok", start, start + ln)
    if op == "madvise":
        ln = page_align(len_in)
        if len_in and not ln:
            return ("err", errno.EINVAL)
        end = u64(start + ln)
        if end < start:
            return ("err", errno.EINVAL)
        return ("nop",) if end == start else ("ok", start, end)
    assert op == "mprotect"
    if not len_in:
        return ("nop",)
    ln = page_align(len_in)
    end = u64(start + ln)
    if end <= start:
        return ("err", errno.ENOMEM)
    return ("ok", start, end)


def ours(op, addr, length, task):
    try:
        r = check_range(op, addr, length, task)
    except OSError as e:
        return ("err", e.errno)
    return ("nop",) if r is None else ("ok", *r)


EDGES = [0, 1, PAGE_SIZE - 1, PAGE_SIZE, USER_BASE - PAGE_SIZE, USER_BASE - 1, USER_BASE, USER_BASE + 1,
         TASK - PAGE_SIZE, TASK - 1, TASK, TASK + PAGE_SIZE, M64 - PAGE_SIZE + 1, M64, 1 << 63, -1, -PAGE_SIZE,
         -(1 << 63), 1 << 64, -(1 << 63) - 1]
addresses = st.one_of(st.sampled_from(EDGES),
                      st.integers(USER_BASE - 4 * PAGE_SIZE, TASK + 4 * PAGE_SIZE),
                      st.integers(-(1 << 64), 1 << 65))
lengths = st.one_of(st.sampled_from(EDGES + [TASK - USER_BASE, TASK - USER_BASE + 1]),
                    st.integers(-4 * PAGE_SIZE, 64 * PAGE_SIZE),
                    st.integers(-(1 << 64), 1 << 65))


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(RANGE_OPS), addresses, lengths)
def test_check_range_is_the_kernels(op, addr, length):
    assert ours(op, addr, length, TASK) == model(op, addr, length, TASK)


@given(st.sampled_from(RANGE_OPS), st.integers(-(1 << 64), 1 << 65), st.integers(-(1 << 64), 1 << 65),
       st.integers(1, 1 << 30))
@settings(max_examples=2000, deadline=None)
def test_check_range_any_address_space(op, addr, length, npages):
    task = task_size(npages)
    assert ours(op, addr, length, task) == model(op, addr, length, task)


def test_wrapping_and_negative_examples():
    assert ours("munmap", USER_BASE - 2 * PAGE_SIZE, PAGE_SIZE, TASK) == ("err", errno.EINVAL)   # the finding
    assert ours("munmap", USER_BASE, -PAGE_SIZE, TASK) == ("err", errno.EINVAL)
    assert ours("madvise", USER_BASE, -1, TASK) == ("err", errno.EINVAL)          # PAGE_ALIGN overflows
    assert ours("madvise", M64 - PAGE_SIZE + 1, 2 * PAGE_SIZE, TASK) == ("err", errno.EINVAL)   # wraps
    assert ours("mprotect", -PAGE_SIZE, PAGE_SIZE, TASK) == ("err", errno.ENOMEM)  # end wraps to 0
    assert ours("access", USER_BASE, -1, TASK) == ("err", errno.EFAULT)
    assert ours("access", TASK - 1, 1, TASK) == ("ok", TASK - 1, TASK)
    assert ours("mmap", 0, 1 << 64, TASK) == ("err", errno.EINVAL)               # does not fit in 64 bits
    assert ours("mmap", 0, True, TASK) == ("err", errno.EINVAL)
    with pytest.raises(ValueError):
        check_range("mremap", 0, 1, TASK)


# The real kernel on this machine judges the same (start, length) pairs: an anonymous mapping
# of our own, offsets from it that are or are not page aligned, and lengths at the edges of
# 64-bit arithmetic.  Only the early verdicts are compared (EINVAL, ENOMEM for a wrap, or
# "nothing to do" for length 0): past them the kernel walks its own VMAs, which are not ours.
# madvise runs with MADV_NORMAL, which changes nothing here whatever range passes; mprotect
# only where ours stops early, so the kernel stops before it changes any protection.
KERNEL_LENGTHS = [0, 1, PAGE_SIZE - 1, PAGE_SIZE, 3 * PAGE_SIZE, M64, M64 - PAGE_SIZE + 1, M64 - PAGE_SIZE + 2,
                  1 << 63, (1 << 63) + PAGE_SIZE, M64 - 2 * PAGE_SIZE]


def _kernel(op: str, addr: int, length: int) -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, op)
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    MADV_NORMAL, PROT_RW = 0, 3
    ctypes.set_errno(0)
    r = fn(addr, length, MADV_NORMAL if op == "madvise" else PROT_RW)
    return ctypes.get_errno() if r else 0


@pytest.mark.parametrize("op", ["madvise", "mprotect"])
def test_early_errnos_are_the_real_kernels(op):
    import mmap
    region = mmap.mmap(-1, 8 * PAGE_SIZE)
    import ctypes
    ptr = ctypes.c_char.from_buffer(region)
    base = (ctypes.addressof(ptr) + PAGE_SIZE) & ~(PAGE_SIZE - 1)
    del ptr
    compared = 0
    for off in (0, 1, PAGE_SIZE - 1):
        for length in KERNEL_LENGTHS:
            o = ours(op, USER_BASE + off, length, task_size(1 << 30))
            if op == "mprotect" and o[0] == "ok":
                continue
            k = _kernel(op, base + off, length)
            why = (op, off, hex(length), o, errno.errorcode.get(k, k))
            if o[0] == "err":
                assert k == o[1], why
                compared += 1
            elif o == ("nop",):
                assert k == 0, why
                compared += 1
            else:
                assert k != errno.EINVAL, why          # the kernel found nothing wrong early either
    region.close()
    assert compared >= 10


def test_munmap_below_user_base_leaves_the_vm_alone(ksm_machine):
    vm = ksm_machine.spawn_vm("a")
    a = vm.mmap(4 * PAGE_SIZE)
    data = b"\x11" * PAGE_SIZE + b"\x22" * PAGE_SIZE + b"\x33" * 2 * PAGE_SIZE
    vm.write(a, data)
    for addr, length in ((USER_BASE - 2 * PAGE_SIZE, PAGE_SIZE), (USER_BASE - PAGE_SIZE, 3 * PAGE_SIZE),
                         (0, PAGE_SIZE), (-PAGE_SIZE, PAGE_SIZE), (a, -PAGE_SIZE)):
        with pytest.raises(OSError) as ei:
            vm.munmap(addr, length)
        assert ei.value.errno == errno.EINVAL, (addr, length)
        assert vm.read(a, len(data)) == data
    vm.munmap(a + 4 * PAGE_SIZE, PAGE_SIZE)       # a hole inside the address space: fine, as in the kernel
    assert vm.read(a, len(data)) == data
    assert ksm_machine.check_frames() == []


def test_real_vm_agrees_with_the_model(ksm_machine):
    """Random ranges through a real VM: the errno the caller gets is the model's, and a refused
    call changes nothing (same VMAs, same bytes)."""
    from proto.layout import MMView
    m = ksm_machine
    vm = m.spawn_vm("a", pages=64)
    task = task_size(64)
    a = vm.mmap(8 * PAGE_SIZE)
    vm.write(a, bytes(range(256)) * 128)
    seg, _ = m.mm_segs[vm.mm_id]

    def state():
        return MMView(seg).vma_list(), vm.read(a, 8 * PAGE_SIZE) if MMView(seg).vma_list() else b""

    near = st.integers(USER_BASE - 3 * PAGE_SIZE, task + 3 * PAGE_SIZE)
    ranges = st.tuples(st.one_of(near, st.sampled_from(EDGES)),
                       st.one_of(st.integers(-2 * PAGE_SIZE, 80 * PAGE_SIZE), st.sampled_from(EDGES)))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["munmap", "madvise", "read"]), ranges)
    def probe(op, rng):
        addr, length = rng
        kind = "access" if op == "read" else op
        want = model(kind, addr, length, task)
        assume(want[0] == "err")                  # (a successful munmap would change the layout under test)
        before = state()
        with pytest.raises(OSError) as ei:
            if op == "munmap":
                vm.munmap(addr, length)
            elif op == "madvise":
                vm.madvise(addr, length, MADV_MERGEABLE)
            else:
                vm.read(addr, length)
        assert ei.value.errno == want[1], (op, hex(addr), length)
        assert state() == before

    probe()
    assert m.check_frames() == []
