"""`ksm-proto estimate`: exact counters on processes and files with known contents, the same answer
as ksm-proto's own scanner and as the real kernel, bad input, --json, --plot, and the scenario `pid:`.

Processes are real children started here (a region mapped, filled, some pages only read so they map
the shared zero page, some never touched, advised MADV_MERGEABLE); the estimate reads them through
/proc as root.  Where /sys/kernel/mm/ksm is writable the kernel then merges those very processes and
its counters must equal the estimate's (every knob restored, run left 0).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from proto import MADV_MERGEABLE, PAGE_SIZE
from workers.estimate import estimate as E
from workers.oracle import kernel_ksm
from workers.estimate.memsource import FileSource, PidSource
from workers.mm.ksm.pagehash import ZERO_KEY, page_digests, page_key
from workers.tools.scenario import ScenarioError, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KOK, KWHY = kernel_ksm.available()
COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages", "stable_node_chains",
            "stable_node_dups")
PROC = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="reading other processes' memory needs root")


def pages(*parts) -> np.ndarray:
    """(value_or_seed, count) parts: an int 0..255 fills a page, 'rN' is random seed N, b'...' is text."""
    out = []
    for what, count in parts:
        if isinstance(what, str):
            out.append(np.random.default_rng(int(what[1:])).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8))
        elif isinstance(what, bytes):
            page = np.frombuffer((what * (PAGE_SIZE // len(what) + 1))[:PAGE_SIZE], np.uint8)
            out.append(np.tile(page, (count, 1)))
        else:
            out.append(np.full((count, PAGE_SIZE), what, dtype=np.uint8))
    return np.concatenate(out)


def ksm_proto(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "workers.tools.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_json(*args, rc=0):
    r = ksm_proto("estimate", *args, "--json")
    assert r.returncode == rc, (r.returncode, r.stderr)
    return json.loads(r.stdout), r.stderr


def write(tmp_path, name, lay) -> str:
    p = tmp_path / name
    p.write_bytes(lay.tobytes())
    return str(p)


# ---------------------------------------------------------------------------- children with known memory
CHILD = r"""
import mmap, sys
path, nread, nuntouched = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = open(path, "rb").read()
npg = len(data) // 4096 + nread + nuntouched
m = mmap.mmap(-1, npg * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
m[:len(data)] = data
for i in range(nread):
    m[len(data) + i * 4096]              # a read fault: maps the shared zero page
m.madvise(mmap.MADV_MERGEABLE)
print("ready", flush=True)
for line in sys.stdin:
    if line.startswith("unmap"):         # unmap the first n pages of the region
        n = int(line.split()[1]) * 4096
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.munmap(addr, n) == 0
        print("unmapped", flush=True)
"""


class Child:
    """A process holding `lay` in one MADV_MERGEABLE region, plus `nread` zero-page and `nuntouched` pages."""

    def __init__(self, tmp_path, name, lay, nread=0, nuntouched=0):
        path = write(tmp_path, name + ".bin", lay)
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, path, str(nread), str(nuntouched)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def unmap(self, n):
        self.p.stdin.write(f"unmap {n}\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == "unmapped"

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)         # by its pid, never by name
                self.p.wait(10)


@pytest.fixture
def children(tmp_path):
    made = []

    def make(name, lay, nread=0, nuntouched=0):
        c = Child(tmp_path, name, lay, nread, nuntouched)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def kernel_merges(pids, knobs, timeout=120) -> dict:
    """The real KSM merges these running processes (their mergeable areas) under knobs; counters come back."""
    with kernel_ksm.KernelKSM() as k:
        try:
            k.set(run=0)
            k.unmerge_all(timeout)                      # counters from 0; max_page_sharing writable
            k.set(pages_to_scan=100000, sleep_millisecs=0, smart_scan=0, **knobs)
            k.set(run=1)
            k.wait_full_scans(3, timeout)
            k.wait_stable(timeout)
            k.set(run=0)
            return {"ksm": k.stats(), "procs": [kernel_ksm.ksm_stat(p) for p in pids],
                    "others": kernel_ksm.other_ksm_processes(exclude=pids)}
        finally:
            k.set(run=0)
            k.unmerge_all(timeout)


# Two processes: duplicates within and across them, zero pages, unique pages, more copies than
# max_page_sharing (4), pages that only map the shared zero page, and pages never touched.
LAY_A = pages((0x11, 5), (0, 3), ("r1", 4), (0x22, 2))
LAY_B = pages((0x11, 2), (0x33, 9), (0, 2), ("r2", 3))
EXPECT = {
    0: {"pages_scanned": 30, "pages_shared": 6, "pages_sharing": 15, "pages_unshared": 9, "ksm_zero_pages": 0,
        "stable_node_chains": 2, "stable_node_dups": 4, "ksm_rmap_items": 30,
        "procs": [{"ksm_rmap_items": 14, "ksm_merging_pages": 10, "ksm_zero_pages": 0},
                  {"ksm_rmap_items": 16, "ksm_merging_pages": 11, "ksm_zero_pages": 0}]},
    1: {"pages_scanned": 30, "pages_shared": 5, "pages_sharing": 12, "pages_unshared": 8, "ksm_zero_pages": 5,
        "stable_node_chains": 2, "stable_node_dups": 4, "ksm_rmap_items": 25,
        "procs": [{"ksm_rmap_items": 11, "ksm_merging_pages": 7, "ksm_zero_pages": 3},
                  {"ksm_rmap_items": 14, "ksm_merging_pages": 10, "ksm_zero_pages": 2}]},
}


def profit(p):
    return (p["ksm_merging_pages"] + p["ksm_zero_pages"]) * PAGE_SIZE - p["ksm_rmap_items"] * 64


@root_only
@pytest.mark.parametrize("use_zero", [0, 1])
def test_processes_exact_and_the_kernel_agrees(children, use_zero):
    a = children("a", LAY_A, nread=2, nuntouched=3)
    b = children("b", LAY_B, nread=1)
    res, err = run_json("--pid", str(a.pid), str(b.pid), "--only-mergeable", "--max-page-sharing", "4",
                        "--use-zero-pages", str(use_zero))
    want = EXPECT[use_zero]
    for k, v in want.items():
        if k != "procs":
            assert res[k] == v, (k, res[k], v)
    assert res["knobs"] == {"max_page_sharing": 4, "use_zero_pages": use_zero, "merge_across_nodes": 1}
    assert res["sources"][0]["skipped"] == {"not present (never touched)": 3,
                                            "the shared zero page (read, never written)": 2}
    assert res["sources"][1]["skipped"] == {"the shared zero page (read, never written)": 1}
    for got, w in zip(res["sources"], want["procs"]):
        for k, v in w.items():
            assert got[k] == v, (got["name"], k, got[k], v)
        assert got["ksm_process_profit"] == profit(w)
    assert res["general_profit"] == (res["pages_sharing"] + res["ksm_zero_pages"]) * PAGE_SIZE - 64 * want[
        "ksm_rmap_items"]
    if not KOK:
        pytest.skip(f"kernel KSM not usable here, estimate checked alone: {KWHY}")
    kern = kernel_merges([a.pid, b.pid], {"max_page_sharing": 4, "use_zero_pages": use_zero})
    if kern["others"]:      # (their pages merge with ours too: not even the per-process counters are ours alone)
        pytest.skip(f"other processes use KSM here ({sorted(kern['others'])}): the kernel's counters not comparable")
    for mine, theirs in zip(res["sources"], kern["procs"]):
        for k in PROC:
            assert mine[k] == theirs[k], (mine["name"], k, mine[k], theirs[k])
    for k in COUNTERS:
        assert res[k] == kern["ksm"][k], (k, res[k], kern["ksm"][k])


# ---------------------------------------------------------------------------- the rules themselves
def replay_page_by_page(n: int, m: int) -> tuple[int, int, int, int]:
    """ksmd's decisions for n copies of one content, one page at a time, on a StableTree."""
    from workers.mm.ksm.stable_tree import StableTree
    tree, waiting = StableTree(), -1
    for r in range(n):
        d = tree.candidate(7, m, lambda _d: True)
        if d >= 0:
            tree.count[d] += 1
        elif waiting >= 0:
            d = tree.insert(7)
            tree.count[d] = 2
            waiting = -1
        else:
            waiting = r
    return int((tree.count[:tree.top] > 0).sum()), tree.chains, tree.dups, waiting


@pytest.mark.parametrize("m", [2, 3, 4, 5, 256])
def test_content_outcome_is_the_page_by_page_replay(m):
    for n in list(range(1, 8 * m + 3)) + [10 * m, 10 * m + 1, 37 * m + 2]:
        assert E.content_outcome(n, m) == replay_page_by_page(n, m), (n, m)
        shared, chains, dups, left = E.content_outcome(n, m)
        assert shared == n // m + (n % m >= 2)               # the closed form, as a cross-check
        assert left == (n - 1 if n % m == 1 else -1)
        assert (chains, dups) == ((1, shared) if shared >= 2 else (0, 0))


def test_page_digest_is_the_scanners():
    from workers.mm import effects as ksmd     # the scanner's Checksum effect hashes with this digest
    assert ksmd.ZERO_KEY == ZERO_KEY and ksmd.page_key is page_key
    lay = pages(("r9", 600), (0, 5), (3, 2), ("r8", 1))
    lay[10, :8] = 0                                          # zero first word, not a zero page
    for threads in (1, 2, 3):
        d = page_digests(lay, len(lay), threads=threads)
        assert [int(x) for x in d[:, 0]] == [ksmd._digest(bytes(p))[0] for p in lay]
        assert [int(x) for x in d[:, 1]] == [ksmd._digest(bytes(p))[1] for p in lay]
    assert page_key(bytes(PAGE_SIZE)) == ZERO_KEY


# ---------------------------------------------------------------------------- files: exact, and = our scanner
FILES = {   # the kernel oracle's layouts (tests/test_kernel_oracle.py), one file per "VM"
    "dups": ([pages((1, 5), (2, 3), ("r1", 20)), pages((1, 2), (3, 4), (2, 1), ("r2", 7))], {}),
    "chains-small": ([pages((7, 23)), pages((7, 10), (6, 9))], {"max_page_sharing": 4}),
    "zero-on": ([pages((0, 40), ("r3", 5)), pages((0, 3), (4, 2))], {"use_zero_pages": 1}),
}


def estimate_files(tmp_path, layouts, knobs):
    paths = [write(tmp_path, f"f{i}.img", lay) for i, lay in enumerate(layouts)]
    args = []
    for k in E.KNOB_NAMES:
        args += [f"--{k.replace('_', '-')}", str({**{"max_page_sharing": 256, "use_zero_pages": 0,
                                                      "merge_across_nodes": 1}, **knobs}[k])]
    return run_json("--file", *paths, *args)[0]


def test_files_exact(tmp_path):
    res = estimate_files(tmp_path, *FILES["chains-small"])
    # content 7: 33 copies, max_page_sharing 4 -> 8 KSM pages in one chain, the 33rd copy unshared;
    # content 6: 9 copies -> 2 KSM pages in a chain, the 9th unshared
    assert {k: res[k] for k in COUNTERS} == {"pages_shared": 10, "pages_sharing": 30, "pages_unshared": 2,
                                             "ksm_zero_pages": 0, "stable_node_chains": 2, "stable_node_dups": 10}
    a, b = res["sources"]
    assert (a["pages"], a["ksm_merging_pages"], b["pages"], b["ksm_merging_pages"]) == (23, 23, 19, 17)
    assert res["bytes_saved"] == 30 * PAGE_SIZE and res["saved_share"] == round(30 / 42, 6)
    # sharing: all 23 of a's pages hold content 7, which b has merged too; b: 9 of its merged pages
    cells = {(x, y): n for x, y, n in res["sharing"]}
    assert cells == {(0, 1): 23, (1, 0): 9, (0, 0): 23, (1, 1): 17}
    top = res["top_contents"]
    assert [(t["copies"], t["pages_saved"], t["sources"]) for t in top] == [(33, 24, 2), (9, 6, 1)]
    assert top[0]["description"] == "one repeated byte 0x07" and top[0]["first_seen"].endswith("f0.img @ 0x0")
    assert top[1]["first_seen"].endswith(f"f1.img @ {10 * PAGE_SIZE:#x}")


def test_zero_pages_and_descriptions(tmp_path):
    text = pages((b"hello KSM, hello page\n", 3), (b"\x00\x01binary\xff", 2))
    for use_zero in (0, 1):
        res = estimate_files(tmp_path, [pages((0, 6), ("r1", 1)), text, pages((0, 1))], {"use_zero_pages": use_zero})
        if use_zero:
            assert (res["ksm_zero_pages"], res["pages_shared"], res["pages_sharing"]) == (7, 2, 3)
            assert [s["ksm_rmap_items"] for s in res["sources"]] == [1, 5, 0]
            assert [s["ksm_zero_pages"] for s in res["sources"]] == [6, 0, 1]
        else:
            assert (res["ksm_zero_pages"], res["pages_shared"], res["pages_sharing"]) == (0, 3, 9)
            assert [s["ksm_merging_pages"] for s in res["sources"]] == [6, 5, 1]
        kinds = {t["kind"]: t for t in res["top_contents"]}
        assert kinds["zero"]["description"] == "zero page" and kinds["zero"]["copies"] == 7
        assert kinds["text"]["description"].startswith("text: 'hello KSM, hello page")
        assert kinds["other"]["copies"] == 2


@pytest.mark.parametrize("name", list(FILES))
def test_same_counters_as_our_scanner(tmp_path, ksm_machine_factory, name):
    layouts, knobs = FILES[name]
    res = estimate_files(tmp_path, layouts, knobs)
    m = ksm_machine_factory(frames=4096)
    m.ksm.set(pages_to_scan=100000, sleep_millisecs=0, smart_scan=0, **knobs)
    vms = []
    for i, lay in enumerate(layouts):
        vm = m.spawn_vm(f"p{i}", pages=len(lay) + 64)
        x = vm.mmap(len(lay) * PAGE_SIZE)
        vm.write(x, lay.tobytes())
        vm.madvise(x, len(lay) * PAGE_SIZE, MADV_MERGEABLE)
        vms.append(vm)
    m.ksm.set(run=1)
    s = m.ksm.wait_stable(60, scans=3)
    m.ksm.set(run=0)
    for k in COUNTERS:
        assert res[k] == s[k], (k, res[k], s[k])
    for src, vm in zip(res["sources"], vms):
        st = vm.ksm_stat()
        for k in ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages"):
            assert src[k] == st[k], (src["name"], k, src[k], st[k])


def test_sparse_file_holes_are_zero_pages_not_read(tmp_path):
    p = tmp_path / "sparse.img"
    with open(p, "wb") as f:
        f.truncate(1 << 30)                                   # 1 GiB hole
        f.seek(5 * PAGE_SIZE)
        f.write(bytes([9]) * 2 * PAGE_SIZE)
        f.seek((1 << 30) - 100)
        f.write(b"end")                                       # the last page, partial
    src = FileSource(str(p)).open()
    segs = src._segments(os.open(str(p), os.O_RDONLY))
    assert sum(n for kind, _, n in segs if kind == "data") <= 32
    # what reading hands to the hashing: the holes as counts of zero pages, a few pages of data
    pieces = list(src.read(lambda: np.zeros((64, PAGE_SIZE), np.uint8)))
    assert sum(pc.npages for pc in pieces) == (1 << 30) // PAGE_SIZE
    assert sum(pc.npages for pc in pieces if pc.kind == "data") <= 32
    res, _ = run_json("--file", str(p), "--use-zero-pages", "0", "--max-page-sharing", "256")
    total = (1 << 30) // PAGE_SIZE
    assert res["pages_scanned"] == total
    # zero pages: all but the two 9-pages and the last one: 262141 copies, 1024 KSM pages in a chain
    assert E.content_outcome(total - 3, 256) == (1024, 1, 1024, -1)
    assert (res["pages_shared"], res["pages_sharing"], res["pages_unshared"]) == (1025, total - 3 - 1024 + 1, 1)
    assert (res["stable_node_chains"], res["stable_node_dups"]) == (1, 1024)


# ---------------------------------------------------------------------------- the kernel, through the CLI
@pytest.mark.kernel
@pytest.mark.skipif(not KOK, reason=f"kernel KSM not usable here: {KWHY}")
def test_verify_kernel_flag(tmp_path):
    layouts, knobs = FILES["chains-small"]
    paths = [write(tmp_path, f"v{i}.img", lay) for i, lay in enumerate(layouts)]
    r = ksm_proto("estimate", "--file", *paths, "--max-page-sharing", "4", "--use-zero-pages", "1",
                  "--verify-kernel", "--json")
    out = json.loads(r.stdout)
    if r.returncode == 3 and "in use" in out["kernel"].get("error", ""):
        pytest.skip(out["kernel"]["error"])
    assert r.returncode == 0, (r.stderr, out.get("kernel"))
    k = out["kernel"]
    assert k["match"] and not k["mismatches"]
    for c in ("pages_shared", "pages_sharing", "stable_node_chains", "stable_node_dups"):
        assert k["ksm"][c] == out[c]
    assert [p["ksm_merging_pages"] for p in k["procs"]] == [23, 17]
    assert kernel_ksm.read_knob("run") == "0"


# ---------------------------------------------------------------------------- bad input
def test_bad_files_named_and_the_rest_counted(tmp_path):
    good = write(tmp_path, "good.img", pages((5, 3)))
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x.img").write_bytes(pages((5, 2)).tobytes())
    (d / "empty").write_bytes(b"")                               # empty files in a --dir: skipped quietly
    os.symlink(good, d / "link")                                  # symlinks in a --dir: not followed
    res, err = run_json("--file", good, str(tmp_path / "missing.img"), str(empty), str(fifo), str(d),
                        "--dir", str(d), str(tmp_path / "nodir"), "--file", good, rc=1)
    assert f"file:{tmp_path}/missing.img: no such file" in err
    assert f"file:{empty}: empty (0 pages)" in err
    assert f"file:{fifo}: not a regular file or block device" in err
    assert f"file:{d}: is a directory (use --dir" in err
    assert f"dir:{tmp_path}/nodir: no such directory" in err
    assert f"file:{good}: the same file as file:{good}; counted once" in err
    assert len(res["problems"]) == 6
    assert [s["name"] for s in res["sources"]] == [f"file:{good}", f"file:{d}/sub/x.img"]
    assert (res["pages_scanned"], res["pages_shared"], res["pages_sharing"]) == (5, 1, 4)
    r = ksm_proto("estimate", "--file", str(tmp_path / "missing.img"))
    assert r.returncode == 2 and "no readable source" in r.stderr
    r = ksm_proto("estimate")
    assert r.returncode == 2 and "nothing to estimate" in r.stderr
    r = ksm_proto("estimate", "--file", good, "--max-page-sharing", "1")
    assert r.returncode == 2 and "--max-page-sharing" in r.stderr and "out of range" in r.stderr


@root_only
def test_bad_pids_named_and_the_rest_counted(tmp_path, children):
    c = children("c", pages((4, 3), ("r5", 2)))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    kthread = next((p for p in ("2", "3") if os.path.exists(f"/proc/{p}/comm")
                    and os.path.getsize(f"/proc/{p}/maps") == 0 and not open(f"/proc/{p}/maps").read()), None)
    res, err = run_json("--pid", str(gone.pid), str(c.pid), "nope", *(["--pid", kthread] if kthread else []),
                        "--only-mergeable", rc=1)
    assert f"pid:{gone.pid}: no such process (it is gone)" in err
    assert "pid:nope: not a process id" in err
    if kthread:
        assert f"pid:{kthread} (" in err and "no user memory (a kernel thread" in err
    assert [s["name"] for s in res["sources"]] == [f"pid:{c.pid} (python)"]
    assert (res["pages_scanned"], res["pages_shared"], res["pages_sharing"]) == (5, 1, 2)


# The same `ksm-proto estimate --pid` twice in one child: as root, then after dropping to nobody (as setpriv
# --reuid --regid --clear-groups does). The first call loads the CLI while the checkout, its venv and the
# interpreter are readable (a clone in a 0700 directory, as in root's home, is not readable by nobody); in
# the second only the credentials differ, and the read of the other process is nobody's.
AS_ROOT_THEN_NOBODY = """
import os, sys
from workers.tools import cli
rc = cli.main(sys.argv[1:])
print(f"as root: exit {rc}", file=sys.stderr, flush=True)
sys.stdout.flush()
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
assert (os.getresuid(), os.getresgid(), os.getgroups()) == ((65534,) * 3, (65534,) * 3, [])
os.chdir("/")
sys.exit(cli.main(sys.argv[1:]))
"""


@root_only
def test_pid_not_readable_without_rights(children):
    """Wherever the checkout lives: the call that reads the process as root, made without rights over it,
    exits 2 with the error that names the process and the rights it lacks, and prints no result."""
    c = children("c", pages((4, 3)))
    r = subprocess.run([sys.executable, "-c", AS_ROOT_THEN_NOBODY, "estimate", "--pid", str(c.pid),
                        "--only-mergeable", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    _, root_ok, second = r.stderr.partition("as root: exit 0\n")
    assert root_ok, r.stderr
    res = json.loads(r.stdout)                             # the root call's result, and only its
    assert [s["name"] for s in res["sources"]] == [f"pid:{c.pid} (python)"]
    assert (res["pages_scanned"], res["pages_shared"], res["pages_sharing"]) == (3, 1, 2)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in second, second
    assert f"pid:{c.pid} (python): " in second and "not readable" in second and "ptrace" in second


def _on_first_read(monkeypatch, action):
    """Run `action` just before the first read of process memory (after the pages were picked from pagemap)."""
    from workers.estimate import memsource
    real, done = os.preadv, []

    def preadv(fd, bufs, offset):
        if not done:
            done.append(1)
            action()
        return real(fd, bufs, offset)
    monkeypatch.setattr(memsource.os, "preadv", preadv)


@root_only
def test_area_unmapped_while_read_is_named_and_the_rest_counted(children, monkeypatch):
    c = children("c", pages((6, 8), ("r1", 4)))
    src = PidSource(c.pid, only_mergeable=True).open()
    assert src.count_pages() == 12
    _on_first_read(monkeypatch, lambda: c.unmap(3))          # 3 pages go away under the reader
    res, _ = E.estimate([src], {"max_page_sharing": 256, "use_zero_pages": 0})
    assert len(res["problems"]) == 1
    assert res["problems"][0].startswith(f"{src.name}: 0x")
    assert "3 of its pages unreadable" in res["problems"][0] and "the rest counted" in res["problems"][0]
    assert res["sources"][0]["skipped"] == {"unreadable": 3}
    assert (res["pages_scanned"], res["pages_shared"], res["pages_sharing"], res["pages_unshared"]) == (9, 1, 4, 4)


@root_only
def test_process_that_exits_while_being_read(children, monkeypatch):
    c = children("c", pages((6, 8)))
    src = PidSource(c.pid, only_mergeable=True).open()
    _on_first_read(monkeypatch, c.close)
    res, _ = E.estimate([src], {})
    assert res["pages_scanned"] == 0
    assert res["problems"] == [f"{src.name}: exited while being read; 0 pages counted"]


# ---------------------------------------------------------------------------- output
def test_json_schema(tmp_path):
    res, _ = run_json("--file", write(tmp_path, "a.img", pages((1, 3), ("r1", 2))))
    for k in ("pages_scanned", "pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages",
              "stable_node_chains", "stable_node_dups", "ksm_rmap_items", "general_profit", "bytes_saved",
              "peak_memory_bytes", "pages_per_s", "cpu_seconds"):
        assert isinstance(res[k], int) or (k == "cpu_seconds" and isinstance(res[k], float)), k
    assert isinstance(res["saved_share"], float) and isinstance(res["problems"], list)
    assert set(res["knobs"]) == {"max_page_sharing", "use_zero_pages", "merge_across_nodes"}
    (s,) = res["sources"]
    assert {"name", "pages", "ksm_process_profit", "ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages",
            "kind", "skipped", "problems"} <= set(s)
    assert all(isinstance(x, int) for cell in res["sharing"] for x in cell)
    assert {"copies", "pages_saved", "sources", "kind", "description"} <= set(res["top_contents"][0])


def test_plain_output_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    a = write(tmp_path, "a.img", pages((1, 30), (0, 4), ("r1", 2)))
    b = write(tmp_path, "b.img", pages((1, 3), (2, 8)))
    png = tmp_path / "e.png"
    r = ksm_proto("estimate", "--file", a, b, "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "pages_sharing" in r.stdout and "one repeated byte 0x01" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


@root_only
def test_all_pids_smoke(children):
    c = children("c", pages((8, 4)))
    r = ksm_proto("estimate", "--all-pids", "--only-mergeable", "--json")
    assert r.returncode in (0, 1), r.stderr
    res = json.loads(r.stdout)
    names = [s["name"] for s in res["sources"]]
    mine = res["sources"][names.index(f"pid:{c.pid} (python)")]
    assert (mine["pages"], mine["ksm_merging_pages"]) == (4, 4)
    problems: list = []
    srcs = E.open_sources([("all-pids", "")], {"only_mergeable": True}, problems)
    assert c.pid in [s.pid for s in srcs] and os.getpid() not in [s.pid for s in srcs]   # never itself
    assert not any("kthreadd" in p for p in problems)              # kernel threads: skipped quietly


# ---------------------------------------------------------------------------- the scenario source pid:PID
@root_only
def test_scenario_pid_source(children):
    lay = pages((3, 5), ("r2", 3))
    c = children("c", lay, nread=2)
    os.kill(c.pid, signal.SIGSTOP)      # a running Python may touch a new page between two counts: freeze it
    try:
        sc = parse({"ksm": {"smart_scan": 0}, "vm": [{"name": "v", "region": [{"source": f"pid:{c.pid}"}]}]})
        (r,) = sc.vms[0].regions
        assert r.pages == PidSource(c.pid).open().count_pages() >= 8       # all its anonymous pages
    finally:
        os.kill(c.pid, signal.SIGCONT)
    with pytest.raises(ScenarioError, match=r"vm\[0\]\.region\[0\]\.source: pid:\d+: no such process"):
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        parse({"vm": [{"region": [{"source": f"pid:{gone.pid}"}]}]})
    with pytest.raises(ScenarioError, match="pid: needs a process id"):
        parse({"vm": [{"region": [{"source": "pid:me"}]}]})
    # --only-mergeable would give the region alone; pid: takes all anonymous memory: the region is in it
    data = PidSource(c.pid, only_mergeable=True).open().read_all()
    assert data == lay.tobytes()
    toml = f'[ksm]\nsmart_scan = 0\n[[vm]]\nname = "a"\n  [[vm.region]]\n  source = "pid:{c.pid}"\n'
    path = os.path.join(os.path.dirname(c.p.args[3]), "s.toml")
    with open(path, "w") as f:
        f.write(toml)
    r = ksm_proto("run", path, "--json", "--until-stable")
    assert r.returncode == 0, r.stderr
    ran = json.loads(r.stdout)
    est, _ = run_json("--pid", str(c.pid), "--use-zero-pages", "0", "--max-page-sharing", "256")
    assert ran["pages_loaded"] == est["pages_scanned"]      # the same pages (an idle process)...
    for k in COUNTERS:                                       # ...merged live as estimated
        assert ran["ksm"][k] == est[k], (k, ran["ksm"][k], est[k])


@root_only
def test_merge_across_nodes_0_keeps_nodes_apart(children):
    """With a two-node map (here: every other page of a run on node 1), pages only merge within a node."""
    from workers.estimate.memsource import NodeMap

    class EveryOther(NodeMap):
        def __init__(self):
            pass

        def node_of(self, pfns):
            return (np.arange(len(pfns)) % 2).astype(np.int16)

    c = children("c", pages((5, 8), (6, 3), (0, 4)))
    for man, want in ((0, (5, 9, 1)), (1, (3, 12, 0))):
        src = PidSource(c.pid, only_mergeable=True, node_map=EveryOther() if not man else None).open()
        res, _ = E.estimate([src], {"max_page_sharing": 256, "use_zero_pages": 0, "merge_across_nodes": man})
        # nodes 0/1 -- 5: 4/4 copies, 6: 2/1, zero: 2/2; on one node: 8, 3, 4
        assert (res["pages_shared"], res["pages_sharing"], res["pages_unshared"]) == want, (man, res)
