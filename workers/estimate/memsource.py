"""Where real pages come from: running processes and files, read page by page, in bounded memory.

This module owns reading real data for the estimate (estimate.py) and for the
`pid:PID` scenario source (scenario.py).  A source is opened once (`open()`:
problems that make it unreadable raise SourceError naming it), then streamed
(`read()`) into buffers it is handed, a piece at a time, so memory stays at the
size of those buffers whatever the size of the input.

    PidSource   the pages KSM would scan in one process, read as root through
                /proc/PID/smaps (which areas), /proc/PID/pagemap (which pages) and
                /proc/PID/mem (their bytes)
    FileSource  any file or block device (a raw memory image), page by page; the
                last page zero-padded; holes of sparse files are zero pages, found
                with SEEK_DATA/SEEK_HOLE and never read
    dir_sources every regular file below a directory, one FileSource each

Which pages of a process count is the kernel's rule (mm/ksm.c,
scan_get_next_rmap_item): an area KSM may merge (vma_ksm_compatible: private,
not VM_IO / VM_PFNMAP / VM_HUGETLB / VM_MIXEDMAP / VM_DONTEXPAND), and in it only
pages that are present and anonymous.  Pages never touched, swapped out, mapping
the shared zero page (read but never written) or belonging to the page cache
(file pages of a private file mapping not yet copied on write) are not scanned
by ksmd and are counted in `skipped` instead.  By default only anonymous areas
are taken (no file behind them: heap, stacks, anonymous mmaps); --all-mappings
adds private file-backed areas (their copied-on-write pages);
--only-mergeable keeps the areas already advised MADV_MERGEABLE (or under
PR_SET_MEMORY_MERGE), which is exactly what ksmd would scan if run were 1 now.

Reading another process's memory is a snapshot taken while it runs, not an
atomic one: a page written during the read is counted with whichever bytes
were read.  A page whose read fails (the area was unmapped meanwhile, or the
process exited) is reported with its area and left out; the rest still counts.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import mmap
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from proto.layout import PAGE_SIZE

PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61           # a page-cache page, or shared anonymous memory
PFN_MASK = (1 << 55) - 1
PAGEMAP_BATCH = 1 << 16     # pagemap entries per read (512 KiB)
# VmFlags of areas that vma_ksm_compatible() refuses: shared, may-share, VM_PFNMAP,
# VM_IO, VM_DONTEXPAND, VM_HUGETLB, VM_MIXEDMAP.
KSM_INCOMPATIBLE = {"sh", "ms", "pf", "io", "de", "ht", "mm"}
SPECIAL_AREAS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]", "[sigpage]", "[vectors]")

__all__ = ["SourceError", "Source", "PidSource", "FileSource", "dir_sources", "zero_pfn", "NodeMap",
           "PM_PRESENT", "PM_FILE", "PM_SWAP"]


class SourceError(Exception):
    """A source that cannot be read at all; the message names it."""


@dataclass
class Piece:
    """What read() produced: `npages` pages at the front of the buffer, or `npages` zero pages (kind "zero")."""
    kind: str                        # "data" | "zero"
    npages: int
    nodes: np.ndarray | None = None  # NUMA node of each page (pid sources on a multi-node machine), else None
    buf: object = None               # where the pages are, if not in the buffer get_buffer() handed out


@dataclass
class Source:
    """Common bookkeeping: counted pages, skipped pages by reason, problems, and where the pages came from."""
    name: str
    kind: str = ""
    pages: int = 0                                        # pages counted (given to the estimate)
    expected: int = 0                                     # pages expected when opened (for a progress bar)
    skipped: dict = field(default_factory=dict)           # reason -> pages not counted
    problems: list = field(default_factory=list)          # one line each, already naming the source
    runs: list = field(default_factory=list)              # (first counted index, offset/address, npages)

    def problem(self, msg: str) -> None:
        self.problems.append(f"{self.name}: {msg}")

    def skip(self, reason: str, n: int) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)

    def _ran(self, offset: int, npages: int) -> None:
        """Record that the next npages counted pages came from offset (merging adjacent runs)."""
        if self.runs:
            i, o, n = self.runs[-1]
            if i + n == self.pages and o + n * PAGE_SIZE == offset:
                self.runs[-1] = (i, o, n + npages)
                self.pages += npages
                return
        self.runs.append((self.pages, offset, npages))
        self.pages += npages

    def where(self, index: int) -> int | None:
        """Offset (file) or address (process) of counted page number `index`, if it was read (not a hole)."""
        lo, hi = 0, len(self.runs)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.runs[mid][0] <= index:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        i, o, n = self.runs[lo - 1]
        return o + (index - i) * PAGE_SIZE if index < i + n else None


# ---------------------------------------------------------------------------- NUMA
class NodeMap:
    """pfn -> NUMA node, from /sys/devices/system/node/node*/memory* (None on a one-node machine)."""

    def __init__(self, starts: np.ndarray, nodes: np.ndarray):
        self.starts, self.nodes = starts, nodes

    @classmethod
    def of_this_machine(cls) -> "NodeMap | None":
        try:
            with open("/sys/devices/system/memory/block_size_bytes") as f:
                block = int(f.read().strip(), 16)
        except (OSError, ValueError):
            return None
        pairs = []
        for d in glob.glob("/sys/devices/system/node/node*/memory*"):
            m = re.search(r"node(\d+)/memory(\d+)$", d)
            if m:
                pairs.append((int(m.group(2)) * block // PAGE_SIZE, int(m.group(1))))
        if len({n for _, n in pairs}) < 2:
            return None
        pairs.sort()
        return cls(np.array([p for p, _ in pairs], np.int64), np.array([n for _, n in pairs], np.int16))

    def node_of(self, pfns: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.starts, pfns, side="right") - 1
        return self.nodes[np.maximum(i, 0)]


_ZERO_PFN: int | None | bool = False


def zero_pfn() -> int | None:
    """The pfn of the shared zero page, as pagemap shows it to root (None where pfns are hidden)."""
    global _ZERO_PFN
    if _ZERO_PFN is not False:
        return _ZERO_PFN
    import ctypes
    import mmap
    m = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m[0]                                                   # a read fault maps the zero page
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            with open("/proc/self/pagemap", "rb") as f:
                e = int.from_bytes(os.pread(f.fileno(), 8, addr // PAGE_SIZE * 8), "little")
        finally:
            del addr
        pfn = e & PFN_MASK
        _ZERO_PFN = pfn if (e & PM_PRESENT and pfn) else None
    except OSError:
        _ZERO_PFN = None
    finally:
        m.close()
    return _ZERO_PFN


# ---------------------------------------------------------------------------- processes
@dataclass
class Area:
    start: int
    end: int
    perms: str
    path: str
    flags: set
    anon_kb: int = -1          # smaps "Anonymous:" (-1: unknown)

    @property
    def label(self) -> str:
        return f"{self.start:#x}-{self.end:#x} {self.path or '[anon]'}"


def _parse_smaps(text: str) -> list[Area]:
    areas: list[Area] = []
    head = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
    for line in text.splitlines():
        m = head.match(line)
        if m:
            areas.append(Area(int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4).strip(), set()))
        elif areas and line.startswith("Anonymous:"):
            areas[-1].anon_kb = int(line.split()[1])
        elif areas and line.startswith("VmFlags:"):
            areas[-1].flags = set(line.split()[1:])
    return areas


def _proc_error(src: "PidSource", what: str, e: OSError) -> SourceError:
    if e.errno in (errno.ENOENT, errno.ESRCH):
        return SourceError(f"{src.name}: no such process (it is gone)")
    if e.errno in (errno.EACCES, errno.EPERM):
        return SourceError(f"{src.name}: {what} not readable ({e.strerror}; reading another process's memory "
                           f"needs root or ptrace rights over it)")
    return SourceError(f"{src.name}: {what}: {e.strerror or e}")


class PidSource(Source):
    """The pages ksmd would scan in process `pid` (see the module docstring for which)."""

    def __init__(self, pid: int, all_mappings: bool = False, only_mergeable: bool = False,
                 node_map: NodeMap | None = None, quiet_gone: bool = False):
        super().__init__(name=f"pid:{pid}", kind="pid")
        self.pid = int(pid)
        self.all_mappings = all_mappings
        self.only_mergeable = only_mergeable
        self.node_map = node_map
        self.quiet_gone = quiet_gone        # --all-pids: a process that ends meanwhile is no error
        self.gone = False
        self.comm = ""
        self.areas: list[Area] = []
        self.kernel_thread = False

    def open(self) -> "PidSource":
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                self.comm = f.read().strip()
            self.name = f"pid:{self.pid} ({self.comm})"
        except OSError as e:
            raise _proc_error(self, "comm", e) from None
        try:
            with open(f"/proc/{self.pid}/smaps") as f:
                text = f.read()
        except OSError as e:
            raise _proc_error(self, "/proc/PID/smaps", e) from None
        all_areas = _parse_smaps(text)
        if not all_areas:
            self.kernel_thread = True
            raise SourceError(f"{self.name}: no user memory (a kernel thread, or a process that is exiting)")
        for a in all_areas:
            if a.path in SPECIAL_AREAS or a.start >= 1 << 63:
                continue
            if a.perms[3] != "p" or (a.flags & KSM_INCOMPATIBLE):
                continue
            anon = not a.path or (a.path.startswith("[") and a.path.endswith("]")) or a.path.startswith("[anon:")
            if not anon and not self.all_mappings:
                continue
            if self.only_mergeable and "mg" not in a.flags:
                continue
            self.areas.append(a)
        self.expected = sum(max(a.anon_kb, 0) for a in self.areas) * 1024 // PAGE_SIZE
        for what in ("pagemap", "mem"):
            try:
                os.close(os.open(f"/proc/{self.pid}/{what}", os.O_RDONLY))
            except OSError as e:
                raise _proc_error(self, f"/proc/PID/{what}", e) from None
        return self

    def _eligible(self, entries: np.ndarray, zpfn: int | None) -> np.ndarray:
        present = (entries & np.uint64(PM_PRESENT)) != 0
        file = (entries & np.uint64(PM_FILE)) != 0
        self.skip("not present (never touched)", int((~present & ((entries & np.uint64(PM_SWAP)) == 0)).sum()))
        self.skip("swapped out", int(((entries & np.uint64(PM_SWAP)) != 0).sum()))
        self.skip("page cache (file page not copied on write)", int((present & file).sum()))
        ok = present & ~file
        if zpfn is not None:
            z = ok & ((entries & np.uint64(PFN_MASK)) == np.uint64(zpfn))
            self.skip("the shared zero page (read, never written)", int(z.sum()))
            ok &= ~z
        return ok

    def read(self, get_buffer) -> Iterator[Piece]:
        """Yield pieces; `get_buffer()` hands the uint8 buffer to fill (a multiple of PAGE_SIZE long).

        A piece is yielded when its buffer is full, and at the end; the caller must be done
        with a buffer before it asks for the next one only if it hands out the same one again.
        """
        zpfn = zero_pfn()
        try:
            pm = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
        except OSError as e:
            raise _proc_error(self, "/proc/PID/pagemap", e) from None
        try:
            mem = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        except OSError as e:
            os.close(pm)
            raise _proc_error(self, "/proc/PID/mem", e) from None
        buf, fill, nodes = None, 0, []

        def piece() -> Piece:
            return Piece("data", fill, np.concatenate(nodes) if nodes else None)

        try:
            for area in self.areas:
                npg = (area.end - area.start) // PAGE_SIZE
                unreadable, why = 0, ""
                for b0 in range(0, npg, PAGEMAP_BATCH):
                    b1 = min(npg, b0 + PAGEMAP_BATCH)
                    try:
                        raw = os.pread(pm, (b1 - b0) * 8, (area.start // PAGE_SIZE + b0) * 8)
                    except OSError as e:
                        raw = b""
                        why = why or e.strerror
                    if not raw and not _alive(self.pid):
                        self._exited()
                        if fill:
                            yield piece()
                        return
                    if len(raw) < (b1 - b0) * 8:
                        unreadable += (b1 - b0) - len(raw) // 8
                        why = why or "area unmapped while being read"
                    entries = np.frombuffer(raw, dtype=np.uint64)
                    idx = np.flatnonzero(self._eligible(entries, zpfn))
                    if not len(idx):
                        continue
                    pfns = (entries[idx] & np.uint64(PFN_MASK)).astype(np.int64) if self.node_map else None
                    cuts = np.flatnonzero(np.diff(idx) != 1) + 1        # runs of consecutive eligible pages
                    for s, e in zip([0, *cuts.tolist()], [*cuts.tolist(), len(idx)]):
                        j = s
                        while j < e:
                            if buf is None:
                                buf, fill, nodes = get_buffer(), 0, []
                            k = min(e - j, len(buf) // PAGE_SIZE - fill)
                            addr = area.start + (b0 + int(idx[j])) * PAGE_SIZE
                            kept = self._read_run(mem, buf, fill, addr, k)
                            if kept is None:                              # the process is gone
                                self._exited()
                                if fill:
                                    yield piece()
                                return
                            if len(kept) < k:
                                unreadable += k - len(kept)
                                why = why or self._why
                            if pfns is not None and len(kept):
                                nodes.append(self.node_map.node_of(pfns[j + kept]))
                            fill += len(kept)
                            j += k
                            if fill * PAGE_SIZE == len(buf):
                                yield piece()
                                buf = None
                if unreadable:
                    self.skip("unreadable", unreadable)
                    self.problem(f"{area.label}: {unreadable} of its pages unreadable ({why}); the rest counted")
            if buf is not None and fill:
                yield piece()
        finally:
            os.close(pm)
            os.close(mem)

    def count_pages(self) -> int:
        """How many pages read() would give now (from pagemap alone: no byte is read)."""
        zpfn, saved, n = zero_pfn(), dict(self.skipped), 0
        try:
            fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
        except OSError as e:
            raise _proc_error(self, "/proc/PID/pagemap", e) from None
        try:
            for area in self.areas:
                npg = (area.end - area.start) // PAGE_SIZE
                for b0 in range(0, npg, PAGEMAP_BATCH):
                    b1 = min(npg, b0 + PAGEMAP_BATCH)
                    try:
                        raw = os.pread(fd, (b1 - b0) * 8, (area.start // PAGE_SIZE + b0) * 8)
                    except OSError:
                        continue
                    n += int(np.count_nonzero(self._eligible(np.frombuffer(raw, dtype=np.uint64), zpfn)))
        finally:
            os.close(fd)
            self.skipped = saved
        return n

    def _exited(self) -> None:
        self.gone = True
        if not self.quiet_gone:
            self.problem(f"exited while being read; {self.pages} pages counted")

    def _read_run(self, mem: int, buf: np.ndarray, fill: int, addr: int, k: int) -> np.ndarray | None:
        """Read k pages at addr into buf from page `fill` on, page by page where reading the run fails.

        Returns the indices (0..k-1) of the pages kept, packed at the front, or None if the
        process is gone (its mm reads as 0 bytes).
        """
        view = memoryview(buf)[fill * PAGE_SIZE:(fill + k) * PAGE_SIZE]
        try:
            n = os.preadv(mem, [view], addr)
            if n == k * PAGE_SIZE:
                self._ran(addr, k)
                return np.arange(k)
            if n == 0:
                return None
        except OSError as e:
            if e.errno == errno.ESRCH:
                return None
        kept = []
        self._why = ""
        for i in range(k):                       # salvage what can be read, page by page
            at = fill + len(kept)
            dst = memoryview(buf)[at * PAGE_SIZE:(at + 1) * PAGE_SIZE]
            try:
                n = os.preadv(mem, [dst], addr + i * PAGE_SIZE)
            except OSError as e:
                self._why = self._why or f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
                continue
            if n == 0 and not kept and not _alive(self.pid):
                return None
            if n == PAGE_SIZE:
                self._ran(addr + i * PAGE_SIZE, 1)
                kept.append(i)
        self._why = self._why or "area unmapped while being read"
        return np.array(kept, dtype=np.int64)

    def read_page(self, address: int) -> bytes | None:
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        except OSError:
            return None
        try:
            b = os.pread(fd, PAGE_SIZE, address)
            return b if len(b) == PAGE_SIZE else None
        except OSError:
            return None
        finally:
            os.close(fd)

    def read_all(self, limit_pages: int | None = None) -> bytes:
        """Every counted page, concatenated (for the scenario `pid:` source; up to limit_pages)."""
        bufs, out = [], []
        total = 0

        def get():
            bufs.append(np.empty(1024 * PAGE_SIZE, np.uint8))
            return bufs[-1]

        for piece in self.read(get):
            out.append(bufs[-1][:piece.npages * PAGE_SIZE].tobytes())
            total += piece.npages
            if limit_pages is not None and total >= limit_pages:
                break
        data = b"".join(out)
        return data if limit_pages is None else data[:limit_pages * PAGE_SIZE]


def _alive(pid: int) -> bool:
    """True while the process still has its memory (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def all_pids() -> list[int]:
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit())


# ---------------------------------------------------------------------------- files
class FileSource(Source):
    """A file or block device read page by page; the last page zero-padded; holes counted as zero pages."""

    def __init__(self, path: str, in_dir: bool = False):
        super().__init__(name=f"file:{path}", kind="file")
        self.path = path
        self.in_dir = in_dir
        self.size = 0
        self.ident: tuple | None = None
        self.regular = True

    def open(self) -> "FileSource":
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise SourceError(f"{self.name}: no such file") from None
        except OSError as e:
            raise SourceError(f"{self.name}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise SourceError(f"{self.name}: is a directory (use --dir for every file below it)")
        if stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            self.regular = False
        else:
            raise SourceError(f"{self.name}: not a regular file or block device")
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{self.name}: cannot open ({e.strerror})") from None
        try:
            if not self.regular:
                self.size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if self.size == 0:
            raise SourceError(f"{self.name}: empty (0 pages)")
        self.ident = (st.st_dev, st.st_ino) if self.regular else None
        self.expected = -(-self.size // PAGE_SIZE)
        return self

    def _segments(self, fd: int) -> list[tuple[str, int, int]]:
        """[(kind, first page, pages)] covering the file in order: "zero" for whole pages inside a hole."""
        npg = self.expected
        if not self.regular or not hasattr(os, "SEEK_DATA"):
            return [("data", 0, npg)]
        holes = []
        pos = 0
        try:
            while pos < self.size:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
                    data = self.size                                  # a hole up to the end
                if data > pos:
                    p0 = -(-pos // PAGE_SIZE)
                    p1 = npg if data >= self.size else data // PAGE_SIZE
                    if p1 > p0:
                        holes.append((p0, p1))
                if data >= self.size:
                    break
                pos = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            return [("data", 0, npg)]
        out, at = [], 0
        for p0, p1 in holes:
            if p0 > at:
                out.append(("data", at, p0 - at))
            out.append(("zero", p0, p1 - p0))
            at = p1
        if at < npg:
            out.append(("data", at, npg - at))
        return out

    def read(self, get_buffer, window: int = 1024) -> Iterator[Piece]:
        """Yield pieces.  Data is mapped (mmap, `window` pages at a time, no copy) where the kernel lets
        us, else read into the buffer `get_buffer()` hands out."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{self.name}: cannot open ({e.strerror})") from None
        self._unreadable, self._why = 0, ""
        try:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for kind, p0, n in self._segments(fd):
                if kind == "zero":
                    self.pages += n
                    yield Piece("zero", n)
                    continue
                p = p0
                while p < p0 + n:
                    k = min(window, p0 + n - p)
                    m = self._map(fd, p, k)
                    if m is not None:
                        self._ran(p * PAGE_SIZE, k)
                        yield Piece("data", k, buf=m)
                        p += k
                        continue
                    buf = get_buffer()
                    k = min(k, len(buf) // PAGE_SIZE)
                    kept, stop = self._read_into(fd, buf, p, k)
                    if kept:
                        yield Piece("data", kept)
                    if stop:
                        return
                    p += k
        finally:
            os.close(fd)
            if self._unreadable:
                self.skip("unreadable", self._unreadable)
                self.problem(f"{self._unreadable} pages unreadable ({self._why}); the rest counted")

    def _map(self, fd: int, p: int, k: int):
        """Pages p..p+k mapped read-only, or None (then they are read instead).

        Only whole pages inside the file as it is now are mapped (touching a mapped page
        past the end of a file that shrank would be SIGBUS); the last partial page is read.
        """
        try:
            size = os.fstat(fd).st_size if self.regular else self.size
        except OSError:
            return None
        if (p + k) * PAGE_SIZE > size or size < self.size:
            return None
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            return mmap.mmap(fd, k * PAGE_SIZE, flags, mmap.PROT_READ, offset=p * PAGE_SIZE)
        except (OSError, ValueError):
            return None

    def _read_into(self, fd: int, buf: np.ndarray, p: int, k: int) -> tuple[int, bool]:
        """Read pages p..p+k into buf; returns (pages kept, stop: the file ended early)."""
        view = memoryview(buf)[:k * PAGE_SIZE]
        try:
            got = _pread_full(fd, view, p * PAGE_SIZE)
        except OSError as e:
            self._why = self._why or e.strerror
            kept = 0
            for i in range(k):                         # salvage what can be read, page by page
                dst = memoryview(buf)[kept * PAGE_SIZE:(kept + 1) * PAGE_SIZE]
                try:
                    g = _pread_full(fd, dst, (p + i) * PAGE_SIZE)
                except OSError:
                    self._unreadable += 1
                    continue
                dst[g:] = bytes(PAGE_SIZE - g)
                self._ran((p + i) * PAGE_SIZE, 1)
                kept += 1
            return kept, False
        if got == k * PAGE_SIZE:
            self._ran(p * PAGE_SIZE, k)
            return k, False
        kp = -(-got // PAGE_SIZE)                      # EOF: the last partial page, or it shrank
        view[got:kp * PAGE_SIZE] = bytes(kp * PAGE_SIZE - got)
        if kp:
            self._ran(p * PAGE_SIZE, kp)
        if p + kp < self.expected:
            self.skip("file shrank while being read", self.expected - p - kp)
            self.problem(f"shrank while being read: ends at {p * PAGE_SIZE + got} bytes, not {self.size}")
        return kp, True

    def read_page(self, offset: int) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                b = f.read(PAGE_SIZE)
        except OSError:
            return None
        return b + bytes(PAGE_SIZE - len(b)) if b else None


def _pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Read until view is full or EOF; returns bytes read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def dir_sources(path: str, problems: list[str]) -> list[FileSource]:
    """A FileSource for every regular file below path (symlinks not followed), in sorted order."""
    if not os.path.exists(path):
        problems.append(f"dir:{path}: no such directory")
        return []
    if not os.path.isdir(path):
        problems.append(f"dir:{path}: not a directory (use --file for one file)")
        return []
    out = []

    def onerror(e: OSError) -> None:
        problems.append(f"dir:{e.filename}: {e.strerror}")

    for root, dirs, files in os.walk(path, onerror=onerror):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except OSError as e:
                problems.append(f"file:{p}: {e.strerror}")
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(FileSource(p, in_dir=True))
    return out
