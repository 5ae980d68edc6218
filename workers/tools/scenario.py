"""Scenarios: the TOML format, its validation, and the built-in demo.

Pure logic (reads files, starts nothing).  A malformed scenario raises
ScenarioError with one line naming the field and the problem, e.g.

    demo.toml: vm[1].region[0].source: unknown kind 'disk:x' (expected "file:PATH", "pid:PID", "zero" or "random:SEED")

Format (see README):

    [machine]                      # optional
    frames = 65536
    notifier_mode = "change_pte"   # change_pte | wrapped | invalidate
    [ksm]                          # any knob of /sys/kernel/mm/ksm
    pages_to_scan = 100000
    [[vm]]
    name = "vm0"
    device = false                 # attach a device TLB (a secondary MMU without change_pte)
    node = 0                       # simulated NUMA node
    merge_any = false              # prctl(PR_SET_MEMORY_MERGE, 1) first: every region mergeable
    fork_of = "vmX"                # optional: start as fork(2) of an earlier VM (its regions, COW-shared)
    [[vm.region]]
    source = "file:/usr/lib/x86_64-linux-gnu/libc.so.6"   # or "pid:PID", "zero", "random:SEED"
    pages = 16                     # required for zero/random; caps a file or a process
    mergeable = true
    prot = "rw"                    # mprotect after loading: "rw", "r" or "none"
    writer = { pages = 8, period_ms = 5, values = 4, seed = 1 }   # optional workload (rw regions only)
"""
from __future__ import annotations

import glob
import math
import os
import stat
import sys
from dataclasses import dataclass, field

import numpy as np

from proto.knobs import check_knob
from proto.layout import PAGE_SIZE

try:
    import tomllib
except ImportError:  # pragma: no cover - python < 3.11
    import tomli as tomllib

MODES = ("change_pte", "wrapped", "invalidate")
MAX_SCENARIO_BYTES = 1 << 20        # a scenario is a small text file
MAX_PAGES = 1 << 32                 # pages of one region (the capacity check comes on top)
MAX_PERIOD_MS = 3_600_000
VM_NAME_MAX = 64


class ScenarioError(ValueError):
    pass


@dataclass
class Writer:
    pages: int
    period_ms: float = 5.0
    values: int = 4
    seed: int = 1


PROTS = ("rw", "r", "none")


@dataclass
class Region:
    source: str
    pages: int
    mergeable: bool = True
    writer: Writer | None = None
    prot: str = "rw"

    def content(self) -> bytes:
        """The region's bytes, zero-padded to whole pages."""
        kind, _, arg = self.source.partition(":")
        n = self.pages * PAGE_SIZE
        if kind == "zero":
            return bytes(n)
        if kind == "random":
            return np.random.default_rng(int(arg)).integers(0, 256, n, dtype=np.uint8).tobytes()
        if kind == "pid":
            from workers.estimate.memsource import PidSource, SourceError
            try:
                data = PidSource(int(arg)).open().read_all(self.pages)
            except SourceError as e:
                raise ScenarioError(f"source {self.source}: {e}") from None
            return data + bytes(n - len(data))
        with open(arg, "rb") as f:
            data = f.read(n)
        return data + bytes(n - len(data))


@dataclass
class VMSpec:
    name: str
    regions: list[Region] = field(default_factory=list)
    device: bool = False
    node: int = 0
    merge_any: bool = False
    fork_of: str | None = None
    domain: int = 0                 # security domain (the mitigation "domain": merges stay inside one)

    @property
    def pages(self) -> int:
        return sum(r.pages for r in self.regions)


@dataclass
class Scenario:
    name: str
    vms: list[VMSpec]
    ksm: dict
    frames: int | None = None
    notifier_mode: str | None = None

    @property
    def pages(self) -> int:
        return sum(v.pages for v in self.vms)

    def address_space(self, spec: VMSpec) -> int:
        """Pages of address space for a VM: its regions and those of every VM forked from it (a
        fork has its parent's address space), with room for guard pages."""
        own = spec.pages + 2 * len(spec.regions) + 64
        return max(1024, own + sum(self.address_space(k) for k in self.vms if k.fork_of == spec.name))


def _err(where: str, msg: str) -> ScenarioError:
    return ScenarioError(f"{where}: {msg}")


def _typed(where, d, key, types, default=None, required=False):
    if key not in d:
        if required:
            raise _err(f"{where}.{key}", "is required")
        return default
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _err(f"{where}.{key}", f"must be {types if isinstance(types, type) else types[0]}, not a boolean")
    if not isinstance(v, types):
        tn = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise _err(f"{where}.{key}", f"must be {tn}, not {type(v).__name__} {v!r}")
    return v


def _region(where: str, r: dict) -> Region:
    if not isinstance(r, dict):
        raise _err(where, "must be a table")
    unknown = set(r) - {"source", "pages", "mergeable", "writer", "prot"}
    if unknown:
        raise _err(f"{where}.{sorted(unknown)[0]}", "unknown field (expected source, pages, mergeable, prot, writer)")
    prot = _typed(where, r, "prot", str, "rw")
    if prot not in PROTS:
        raise _err(f"{where}.prot", f"{prot!r} is not one of {', '.join(PROTS)}")
    if prot != "rw" and r.get("writer") is not None:
        raise _err(f"{where}.writer", f"a writer needs a writable region, not prot {prot!r}")
    source = _typed(where, r, "source", str, "zero")
    pages = _typed(where, r, "pages", int)
    if pages is not None and pages <= 0:
        raise _err(f"{where}.pages", f"must be positive, not {pages}")
    if pages is not None and pages > MAX_PAGES:
        raise _err(f"{where}.pages", f"must be at most {MAX_PAGES}, not {pages}")
    kind, _, arg = source.partition(":")
    if kind == "file":
        if not arg:
            raise _err(f"{where}.source", "file: needs a path (\"file:PATH\")")
        size = _readable_file(f"{where}.source", arg, "file")
        if size == 0:
            raise _err(f"{where}.source", f"file {arg!r} is empty")
        fp = (size + PAGE_SIZE - 1) // PAGE_SIZE
        pages = min(pages, fp) if pages else fp
    elif kind == "random":
        if not arg.isdigit():
            raise _err(f"{where}.source", f"random: needs a non-negative integer seed (\"random:SEED\"), "
                                          f"not {arg!r}")
        if pages is None:
            raise _err(f"{where}.pages", "is required for a random region")
    elif kind == "pid":
        if not arg.isdigit():
            raise _err(f"{where}.source", f"pid: needs a process id (\"pid:PID\"), not {arg!r}")
        from workers.estimate.memsource import PidSource, SourceError
        try:
            fp = PidSource(int(arg)).open().count_pages()
        except SourceError as e:
            raise _err(f"{where}.source", str(e)) from None
        if fp == 0:
            raise _err(f"{where}.source", f"process {arg} has no anonymous pages to load")
        pages = min(pages, fp) if pages else fp
    elif kind == "zero" and not arg:
        if pages is None:
            raise _err(f"{where}.pages", "is required for a zero region")
    else:
        raise _err(f"{where}.source",
                   f"unknown kind {source!r} (expected \"file:PATH\", \"pid:PID\", \"zero\" or \"random:SEED\")")
    mergeable = _typed(where, r, "mergeable", bool, True)
    w = r.get("writer")
    writer = None
    if w is not None:
        ww = f"{where}.writer"
        if not isinstance(w, dict):
            raise _err(ww, "must be a table")
        unknown = set(w) - {"pages", "period_ms", "values", "seed"}
        if unknown:
            raise _err(f"{ww}.{sorted(unknown)[0]}", "unknown field (expected pages, period_ms, values, seed)")
        wp = _typed(ww, w, "pages", int, min(8, pages))
        if not 0 < wp <= pages:
            raise _err(f"{ww}.pages", f"must be in 1..{pages} (the region's pages), not {wp}")
        period = float(_typed(ww, w, "period_ms", (int, float), 5.0))
        if not math.isfinite(period) or not 0 <= period <= MAX_PERIOD_MS:
            raise _err(f"{ww}.period_ms", f"must be a finite number in [0, {MAX_PERIOD_MS}], not {period}")
        values = _typed(ww, w, "values", int, 4)
        if not 1 <= values <= 255:
            raise _err(f"{ww}.values", f"must be in 1..255, not {values}")
        writer = Writer(wp, period, values, _typed(ww, w, "seed", int, 1))
    return Region(source, pages, mergeable, writer, prot)


def parse(doc: dict, name: str = "scenario") -> Scenario:
    unknown = set(doc) - {"machine", "ksm", "vm"}
    if unknown:
        raise _err(f"{name}: {sorted(unknown)[0]}", "unknown table (expected [machine], [ksm], [[vm]])")
    m = doc.get("machine", {})
    if not isinstance(m, dict):
        raise _err(f"{name}: machine", "must be a table")
    unknown = set(m) - {"frames", "notifier_mode"}
    if unknown:
        raise _err(f"{name}: machine.{sorted(unknown)[0]}", "unknown field (expected frames, notifier_mode)")
    frames = _typed(f"{name}: machine", m, "frames", int)
    if frames is not None and frames < 16:
        raise _err(f"{name}: machine.frames", f"must be at least 16, not {frames}")
    mode = _typed(f"{name}: machine", m, "notifier_mode", str)
    if mode is not None and mode not in MODES:
        raise _err(f"{name}: machine.notifier_mode", f"{mode!r} is not one of {', '.join(MODES)}")
    ksm = doc.get("ksm", {})
    if not isinstance(ksm, dict):
        raise _err(f"{name}: ksm", "must be a table of knobs")
    for k, v in ksm.items():
        try:
            check_knob(k, v)
        except OSError as e:
            raise _err(f"{name}: ksm.{k}", e.strerror) from None
    vms_doc = doc.get("vm")
    if not vms_doc or not isinstance(vms_doc, list):
        raise _err(f"{name}: vm", "at least one [[vm]] is required")
    vms, names = [], set()
    for i, v in enumerate(vms_doc):
        where = f"{name}: vm[{i}]"
        if not isinstance(v, dict):
            raise _err(where, "must be a table")
        unknown = set(v) - {"name", "region", "device", "node", "merge_any", "fork_of", "domain"}
        if unknown:
            raise _err(f"{where}.{sorted(unknown)[0]}",
                       "unknown field (expected name, region, device, node, merge_any, fork_of, domain)")
        vname = _typed(where, v, "name", str, f"vm{i}")
        if not 0 < len(vname) <= VM_NAME_MAX or not vname.isprintable():
            raise _err(f"{where}.name", f"must be 1 to {VM_NAME_MAX} printable characters, not {vname!r}")
        if vname in names:
            raise _err(f"{where}.name", f"duplicate VM name {vname!r}")
        names.add(vname)
        fork_of = _typed(where, v, "fork_of", str)
        parent = next((x for x in vms if x.name == fork_of), None)
        if fork_of is not None and parent is None:
            raise _err(f"{where}.fork_of", f"{fork_of!r} is not the name of an earlier VM")
        regs = v.get("region", [] if parent else None)
        if not isinstance(regs, list) or not (regs or parent):
            raise _err(f"{where}.region", "at least one [[vm.region]] is required (unless the VM is a fork_of)")
        node = _typed(where, v, "node", int, parent.node if parent else 0)
        if not 0 <= node < 64:
            raise _err(f"{where}.node", f"must be in 0..63, not {node}")
        if parent and node != parent.node:
            raise _err(f"{where}.node", f"a fork lives on its parent's node ({parent.node})")
        domain = _typed(where, v, "domain", int, parent.domain if parent else 0)
        if not 0 <= domain < 2**31:
            raise _err(f"{where}.domain", f"must be in 0..2147483647, not {domain}")
        if parent and domain != parent.domain:
            raise _err(f"{where}.domain", f"a fork is in its parent's domain ({parent.domain})")
        vms.append(VMSpec(vname, [_region(f"{where}.region[{j}]", r) for j, r in enumerate(regs)],
                          _typed(where, v, "device", bool, False), node, _typed(where, v, "merge_any", bool, False),
                          fork_of, domain))
    return Scenario(name, vms, dict(ksm), frames, mode)


def _readable_file(where: str, path: str, what: str) -> int:
    """The size of path, a readable regular file; ScenarioError naming `where` otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _err(where, f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise _err(where, f"{what} {path!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise _err(where, f"{what} {path!r} is {kind}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _err(where, f"{what} {path!r} cannot be read: {e.strerror}") from None
    return st.st_size


def load(path: str) -> Scenario:
    name = os.path.basename(path) or path
    size = _readable_file(path, path, "scenario file")
    if size > MAX_SCENARIO_BYTES:
        raise ScenarioError(f"{path}: a scenario file of {size} bytes is too big (at most {MAX_SCENARIO_BYTES})")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_SCENARIO_BYTES + 1).decode("utf-8")
        doc = tomllib.loads(text)
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read the scenario file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{name}: not valid TOML: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{name}: not valid TOML: {e}") from None
    return parse(doc, name)


def check_fits(sc: Scenario, frames: int) -> None:
    """ScenarioError if this machine cannot hold the scenario's memory (before anything is allocated)."""
    from workers.actors.supervisor import check_capacity, machine_bytes
    try:
        check_capacity(f"{sc.name}: {sc.pages} pages in {len(sc.vms)} VM(s), a machine of {frames} frames",
                       machine_bytes(frames) + 8 * sum(v.pages + 64 for v in sc.vms))
    except OSError as e:
        raise ScenarioError(e.strerror) from None
    if sc.frames is not None and sc.frames < sc.pages:
        raise ScenarioError(f"{sc.name}: machine.frames = {sc.frames} cannot hold the scenario's {sc.pages} pages")


def demo_files(limit_pages: int = 2500) -> list[str]:
    """Real shared libraries and Python extension modules of this machine, as VMs share libraries."""
    cands = []
    import mmh3
    import numpy
    import posix_ipc
    for mod in (numpy, mmh3, posix_ipc):
        base = os.path.dirname(mod.__file__)
        cands += sorted(glob.glob(os.path.join(base, "**", "*.so"), recursive=True))
        cands += sorted(glob.glob(os.path.join(os.path.dirname(base), posix_ipc.__name__ + "*.so")))
    if getattr(posix_ipc, "__file__", "").endswith(".so"):
        cands.insert(0, posix_ipc.__file__)
    for pat in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6", "/usr/lib/libc.so.6",
                "/lib/x86_64-linux-gnu/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6"):
        cands.append(pat)
    cands.append(sys.executable)
    out, total, seen = [], 0, set()
    for p in cands:
        rp = os.path.realpath(p)
        if rp in seen or not os.path.isfile(rp) or os.path.getsize(rp) == 0:
            continue
        pages = (os.path.getsize(rp) + PAGE_SIZE - 1) // PAGE_SIZE
        if total + pages > limit_pages:
            continue
        seen.add(rp)
        out.append(rp)
        total += pages
    return out


def demo(nvms: int = 4) -> Scenario:
    """The built-in demo: VMs holding the same real libraries, private random pages, zero pages, a writer."""
    files = demo_files()
    vms = []
    for i in range(nvms):
        regions = [Region(f"file:{p}", (os.path.getsize(p) + PAGE_SIZE - 1) // PAGE_SIZE) for p in files]
        regions.append(Region(f"random:{1000 + i}", 128))
        regions.append(Region("zero", 128))
        regions.append(Region("zero", 32, True, Writer(pages=16, period_ms=2.0, values=3, seed=i + 1)))
        vms.append(VMSpec(f"vm{i}", regions))
    ksm = {"pages_to_scan": 1000, "sleep_millisecs": 20}     # slow enough to watch the counters climb
    return Scenario("demo", vms, ksm)
