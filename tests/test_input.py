"""Careless input: sizes refused before anything is allocated, files that are no scenarios, odd
names, Ctrl-C, the wait hints, private traces.  One clear line each, never a traceback."""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from proto import PAGE_SIZE
from proto.layout import SHM_DIR
from proto.trace import Tracer
from workers.actors.supervisor import MAX_FRAMES, MAX_VM_PAGES, Machine, run_entries, shm_capacity
from workers.tools.pytest_plugin import ctrl_c_delivered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ksm_proto(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "workers.tools.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def mine() -> set[str]:
    """/dev/shm entries of runs this test process owns."""
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"ksmp.{os.getpid()}.")}


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# ---------------------------------------------------------------- sizes
def test_machine_larger_than_shared_memory_is_refused_before_allocation():
    before = mine()
    shm, avail = shm_capacity()
    frames = min(MAX_FRAMES, min(shm, avail) // PAGE_SIZE + 1024)
    with pytest.raises(OSError) as ei:
        Machine(frames=frames)
    assert ei.value.errno == errno.ENOMEM and SHM_DIR in str(ei.value) and f"{frames} frames" in str(ei.value)
    with pytest.raises(ValueError, match="16 to"):
        Machine(frames=10**10)
    assert mine() == before


def test_vm_larger_than_shared_memory_is_refused_before_allocation(ksm_machine):
    shm, avail = shm_capacity()
    pages = min(shm, avail) // 8 + 1024
    if pages > MAX_VM_PAGES:
        pytest.skip("this machine's shared memory holds the largest VM")
    before = run_entries(ksm_machine.run)
    with pytest.raises(OSError) as ei:
        ksm_machine.spawn_vm("huge", pages=pages)
    assert ei.value.errno == errno.ENOMEM and SHM_DIR in str(ei.value)
    with pytest.raises(ValueError):
        ksm_machine.spawn_vm("huger", pages=MAX_VM_PAGES + 1)
    assert run_entries(ksm_machine.run) == before and ksm_machine.vms == {}



def test_vm_whose_rmap_items_do_not_fit_is_refused_before_allocation(ksm_machine):
    """A VM's shared memory is its page table (8 bytes a page) and the scanners' rmap items (15 more):
    one whose page table alone would fit is refused all the same (counting the page table alone once
    let a test's VM through when memory freed up meanwhile; formatting its rmap items then took every
    byte of the machine)."""
    shm, avail = shm_capacity()
    pages = min(shm, avail) // 12           # page table 2/3 of the room, page table + rmap items ~1.9x
    if pages > MAX_VM_PAGES:
        pytest.skip("this machine's shared memory holds the largest VM")
    before = run_entries(ksm_machine.run)
    with pytest.raises(OSError) as ei:
        ksm_machine.spawn_vm("big", pages=pages)
    assert ei.value.errno == errno.ENOMEM and SHM_DIR in str(ei.value)
    assert run_entries(ksm_machine.run) == before and ksm_machine.vms == {}


def test_scenario_larger_than_shared_memory_is_refused_before_allocation(tmp_path):
    shm, avail = shm_capacity()
    pages = min(shm, avail) // PAGE_SIZE + 4096
    sc = tmp_path / "big.toml"
    sc.write_text(f"[[vm]]\n[[vm.region]]\nsource = 'zero'\npages = {pages}\n")
    r = ksm_proto("run", str(sc), "--json")
    # refused by the check before any allocation (exit 2, "bad scenario"), not by a failed allocation (exit 1)
    assert r.returncode == 2 and r.stdout == ""
    assert one_line(r).startswith("ksm-proto: bad scenario: ")
    assert SHM_DIR in one_line(r) and "big.toml" in one_line(r) and "of shared memory" in one_line(r)


# ---------------------------------------------------------------- files that are no scenarios
@pytest.mark.parametrize("what", ["directory", "binary", "device", "fifo", "missing"])
def test_scenario_file_that_is_no_scenario(tmp_path, what):
    path = tmp_path / what
    if what == "directory":
        path.mkdir()
    elif what == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    elif what == "device":
        path = "/dev/zero"
    elif what == "fifo":
        os.mkfifo(path)
    r = ksm_proto("run", str(path), "--json", timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    line = one_line(r)
    assert line.startswith("ksm-proto: bad scenario: ")
    assert {"directory": "is a directory", "binary": "not UTF-8", "device": "not a regular file",
            "fifo": "not a regular file", "missing": "does not exist"}[what] in line


# ---------------------------------------------------------------- odd names, Ctrl-C
def test_vm_names_that_look_like_options(ksm_machine):
    m = ksm_machine
    for name in ("--device", "-h", "--name=x", "vm with spaces"):
        vm = m.spawn_vm(name)
        a = vm.mmap(PAGE_SIZE)
        vm.write(a, name.encode())
        assert vm.read(a, len(name)) == name.encode()
        assert vm.stats()["subs"].keys() == {"kvm"}          # "--device" did not attach a device TLB
    for bad in ("", "a\nb", "x" * 65, 7):
        with pytest.raises(ValueError):
            m.spawn_vm(bad)


def test_ctrl_c_is_a_clean_exit(tmp_path):
    sc = tmp_path / "slow.toml"
    sc.write_text("[ksm]\nsleep_millisecs = 50\n[[vm]]\nname = \"a\"\n[[vm.region]]\nsource = \"zero\"\npages = 64\n"
                  "writer = { pages = 8, period_ms = 1, values = 2 }\n")
    p = subprocess.Popen([sys.executable, "-m", "workers.tools.cli", "run", str(sc), "--timeout", "600", "--scans", "100000"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=ctrl_c_delivered)
    try:
        line = p.stdout.readline()
        while line and not line.startswith("full_scans="):      # running: merging, writing
            line = p.stdout.readline()
        assert line, p.stderr.read()
        runs = {n.split(".")[2] for n in os.listdir(SHM_DIR) if n.startswith(f"ksmp.{p.pid}.")}
        assert len(runs) == 1
        os.killpg(p.pid, signal.SIGINT)            # what a terminal's Ctrl-C does: the whole group
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()                               # by pid: the one this test started
            p.wait(10)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "ksm-proto: interrupted"
    deadline = time.monotonic() + 10
    while [n for n in os.listdir(SHM_DIR) if n.startswith(f"ksmp.{p.pid}.")] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [n for n in os.listdir(SHM_DIR) if n.startswith(f"ksmp.{p.pid}.")] == []


def test_actors_are_out_of_the_terminals_reach(ksm_machine):
    """Every actor, spares included, runs in a session of its own: a terminal's Ctrl-C reaches the
    supervisor alone, which stops them in order.  (A spare still importing when Ctrl-C came died of
    it with a KeyboardInterrupt traceback: test_ctrl_c_is_a_clean_exit, under load.)"""
    m = ksm_machine
    m.spawn_vm("a")
    procs = list(m.actors.values()) + [a for g in m.spares.values() for a in g.values()] + \
        [vm.actor for vm in m.vms.values()]
    assert len(procs) >= 4
    assert {a.name: os.getsid(a.pid) for a in procs} == {a.name: a.pid for a in procs}
    assert all(os.getsid(a.pid) != os.getsid(0) for a in procs)


# ---------------------------------------------------------------- hints, traces
def test_wait_hint_names_what_stops_the_scan(ksm_machine):
    m = ksm_machine
    with pytest.raises(TimeoutError) as ei:
        m.ksm.wait_full_scans(1, 0.3)
    assert str(ei.value).endswith("wanted +1 (run is 0, not 1)")
    m.ksm.set(pages_to_scan=0, run=1)
    with pytest.raises(TimeoutError) as ei:
        m.ksm.wait_full_scans(1, 0.3)
    assert str(ei.value).endswith("wanted +1 (pages_to_scan is 0)") and "is run=1" not in str(ei.value)
    m.ksm.set(run=0)


def test_traces_are_private(tmp_path):
    tr = Tracer.open(str(tmp_path / "raw"), "vm:a")
    tr.close()
    assert stat.S_IMODE(os.stat(tr.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "raw").st_mode) == 0o700
    out = tmp_path / "t.json"
    out.write_text("{}")
    os.chmod(out, 0o644)                          # an older, world-readable file of that name
    with Machine(frames=256, trace=str(out)) as m:
        vm = m.spawn_vm("a")
        x = vm.mmap(PAGE_SIZE)
        vm.write(x, b"secret")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert json.loads(out.read_text())["traceEvents"]
