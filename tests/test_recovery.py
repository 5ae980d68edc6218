"""One protocol for the recovery: the declared breaks, the supervisor's recovery program (mm/recovery.py)
that Machine._recover and the checker both run, the kill sweep, and the checker's kills in every scenario."""
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from workers.check import explore
from workers.check.world import BREAKS as WORLD_BREAKS, world_factory
from workers.mm import recovery
from workers.mm.breaks import BREAKS, NONE, Breaks, check_break
from workers.mm.effects import Fsck, Load, Lock, Unlock
from workers.mm.recovery import Freeze, NotifierLost, Respawn, recover

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_breaks_are_one_declared_set():
    assert set(WORLD_BREAKS) == set(BREAKS) and all(b.what for b in BREAKS.values())
    with pytest.raises(ValueError, match="unknown break 'no-such-step'"):
        Breaks(["no-such-step"])
    with pytest.raises(ValueError, match="undeclared break 'no-wirte-protect'"):
        "no-wirte-protect" in NONE          # a typo in a core is an error, not a break silently off
    assert "no-write-protect" in Breaks(["no-write-protect"]) and "no-write-protect" not in NONE
    assert check_break("no-repair").kill == "faultd"


def test_every_break_a_core_consults_is_declared():
    """Every `"name" in brk` written in workers/ names a declared break (a branch no run reaches included)."""
    used = set()
    for path in (ROOT / "workers").rglob("*.py"):
        used |= set(re.findall(r'"([a-z-]+)" (?:not )?in (?:brk|scan\.brk|self\.brk)\b', path.read_text()))
    assert used and used <= set(BREAKS), used - set(BREAKS)


def _effects(groups, brk=(), serves=lambda actor, mm: True):
    """The recovery program's effects in order, each answered as the supervisor would (Freeze: held)."""
    gen = recover(groups, ["ksmd", "ksmd1"], lambda: [0, 1], lambda: [0, 1, 2], serves, 4, Breaks(brk))
    out, send = [], None
    while True:
        try:
            e = gen.send(send)
        except StopIteration as st:
            return out, st.value
        out.append(e)
        c = e.__class__
        send = (True if c is Freeze else np.zeros(4, dtype=np.uint64) if c is Load
                else {"freed": 1} if c is Fsck else None)


def _names(effects):
    out = []
    for e in effects:
        c = e.__class__
        out.append(f"notifier_lost {e.mm} {e.peer}" if c is NotifierLost else f"respawn {e.group}" if c is Respawn
                   else f"lock {e.key[1]}" if c is Lock else f"unlock {e.key[1]}" if c is Unlock
                   else c.__name__.lower())
    return out


def test_recovery_of_a_fault_handler_in_order():
    """freeze, each VM it served handles the loss, repair under every ptl (the mm a fork is filling
    included), respawn, thaw."""
    effects, fixed = _effects(["faultd1"], serves=lambda actor, mm: mm % 2 == 1)
    assert _names(effects) == ["freeze", "notifier_lost 1 faultd1", "freeze", "lock 0", "lock 1", "lock 2", "load",
                               "load", "load", "fsck", "unlock 2", "unlock 1", "unlock 0", "thaw", "respawn faultd1"]
    assert fixed == {"freed": 1}


def test_recovery_of_the_scanners_restarts_them_all_unfrozen():
    effects, _ = _effects(["ksmd"])
    names = _names(effects)
    assert "freeze" not in names and "thaw" not in names
    assert names[:4] == ["notifier_lost 0 ksmd", "notifier_lost 0 ksmd1", "notifier_lost 1 ksmd",
                         "notifier_lost 1 ksmd1"]
    assert names[-1] == "respawn ksmd" and names.count("respawn ksmd") == 1
    assert recovery.victims(["ksmd", "faultd"], ["ksmd", "ksmd1"]) == ["ksmd", "ksmd1", "faultd"]


def test_recovery_breaks_remove_their_step():
    assert "notifier_lost 1 faultd" not in _names(_effects(["faultd"], ["no-notifier-lost"])[0])
    names = _names(_effects(["faultd"], ["respawn-before-repair"])[0])
    assert names.index("respawn faultd") < names.index("thaw") < names.index("fsck")
    assert names.count("freeze") == 1
    assert "fsck" not in _names(_effects(["faultd"], ["no-repair"])[0])


def test_no_repair_beside_a_live_ksmd_that_did_not_stop():
    """Freeze answered False (ksmd alive, not held): the repair is skipped, the successor still starts."""
    gen = recover(["faultd"], ["ksmd"], lambda: [0], lambda: [0], lambda a, m: True, 4)
    seen, send = [], None
    while True:
        try:
            e = gen.send(send)
        except StopIteration as st:
            fixed = st.value
            break
        seen.append(e.__class__.__name__)
        send = False if e.__class__ is Freeze else None
    assert seen == ["Freeze", "NotifierLost", "Respawn"] and fixed == {"repair_skipped": "ksmd could not be frozen"}


def test_a_repair_that_cannot_lock_still_restarts_and_thaws():
    """A ptl held by a hung actor: the repair gives up (TimeoutError), the successor starts, ksmd thaws."""
    gen = recover(["faultd"], ["ksmd"], lambda: [0], lambda: [0], lambda a, m: True, 4)
    seen, send, exc = [], None, None
    while True:
        try:
            e = gen.throw(exc) if exc else gen.send(send)
        except StopIteration as st:
            fixed = st.value
            break
        seen.append(e.__class__.__name__)
        send, exc = (True if e.__class__ is Freeze else None), (TimeoutError("ptl(mm0) held") if e.__class__ is Lock
                                                                 else None)
    assert seen == ["Freeze", "NotifierLost", "Freeze", "Lock", "Thaw", "Respawn"]
    assert fixed == {"repair_failed": "ptl(mm0) held"}


def test_supervisor_and_checker_run_the_one_recovery_program():
    """No second copy: the supervisor's recovery and the checker's supervisor both run mm.recovery.recover,
    and neither orders freeze / notifier_lost / repair / respawn itself."""
    sup = (ROOT / "workers/actors/supervisor_recovery.py").read_text()
    world = (ROOT / "workers/check/programs.py").read_text()
    for src in (sup, world):
        assert "from workers.mm.recovery import" in src and "recover(" in src
        assert "notifier_lost\", self.ack_timeout" not in src.split("def _recovery_effect")[0]
    assert "repair_frames(" not in world


@pytest.mark.parametrize("kill", ["faultd", "ksmd"])
def test_kill_sweep_is_clean_and_covers_merges_and_cows_in_flight(kill):
    """A kill at every step of one fixed schedule: no violation, and the kills hit the victim mid-work."""
    sw = explore.kill_sweep(world_factory("wrapped", kill=kill), victims=(kill,))
    assert sw.found is None, sw.found and sw.found[1]
    assert sw.points > 100
    want = {"alloc", "copy", "reply", "wait"} if kill == "faultd" else {"trylock", "memcmp", "put", "pin"}
    assert want <= set(sw.covered), sw.covered


def test_kill_sweep_finds_the_missing_repair():
    sw = explore.kill_sweep(world_factory("wrapped", "no-repair"), victims=("faultd",))
    assert sw.found is not None and any("PTEs map it" in v for v in sw.found[1]), sw.found


def check(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "workers.tools.cli", "check", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("kill, seed", [("faultd", 1), ("ksmd", 1), ("vm", 4)])
def test_check_kill_is_clean_in_every_scenario_and_mode(kill, seed):
    """(A fault handler dying right after a fork once met a checker's supervisor that did not know the
    child: KeyError at every seed.)"""
    p = check("--kill", kill, "--runs", "40", "--seed", str(seed), "--jobs", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [f"{m} {sc}" for m in ("change_pte", "wrapped", "invalidate")
                                                  for sc in ("base", "fork")]
    assert all("41 schedules" in ln and ln.endswith("no violation") for ln in lines), p.stdout


def test_check_kill_with_two_scanners_in_the_fork_scenario():
    p = check("--kill", "ksmd", "--scanners", "2", "--scenario", "fork", "--mode", "wrapped", "--runs", "40",
              "--seed", "2", "--jobs", "2")
    assert p.returncode == 0 and p.stdout.rstrip().endswith("no violation"), p.stdout + p.stderr


def test_check_sweep_cli_names_what_it_covered():
    p = check("--sweep", "--break", "no-repair", "--mode", "invalidate")
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(r"invalidate base: kill sweep of faultd: \d+ kill points", p.stdout)
    assert "search kill sweep, kill at step" in p.stdout


def test_a_depth_past_the_recursion_is_refused_clearly():
    p = check("--exhaustive", "--depth", "100000000000000000000")
    assert p.returncode == 2 and "--depth: at most 200" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(ValueError, match="out of range 1..200"):
        explore.exhaustive(world_factory("wrapped"), depth=201)


@pytest.mark.parametrize("kill", ["faultd", "faultd1"])
def test_two_fault_handlers_one_killed_the_other_serving(kill):
    """Two fault handlers (each serves every other VM): the one killed is recovered for the VMs it
    served alone (its notifier_lost goes to them only), the other goes on; in every scenario and mode."""
    p = check("--kill", kill, "--fault-handlers", "2", "--runs", "30", "--seed", "3", "--jobs", "2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(p.stdout.splitlines()) == 6 and all(ln.endswith("no violation") for ln in p.stdout.splitlines())
    f = world_factory("wrapped", kill=kill, fault_handlers=2)
    w = f()
    assert [w.faultd_of(v.id) for v in w.vms] == ["faultd", "faultd1"]
    effects, _ = _effects([kill], serves=w._serves)
    lost = [e.mm for e in effects if e.__class__ is NotifierLost]
    assert lost == [0 if kill == "faultd" else 1]


def test_a_kill_of_an_actor_the_world_lacks_is_a_usage_error():
    p = check("--kill", "faultd1", "--runs", "3")
    assert p.returncode == 2 and "this world's actors are ksmd, faultd" in p.stderr


def _random_run(factory, seed: int):
    """One random schedule of a new world, every step's invariants checked; the finished world."""
    import random
    w, rng = factory(), random.Random(seed)
    for _ in range(20_000):
        en = w.enabled()
        if not en:
            break
        w.take(rng.randrange(len(en)))
        assert not w.violations()
    assert w.finished() and w.final_violations() == []
    return w


@pytest.mark.parametrize("kills", ["faultd,ksmd", "ksmd,faultd", "faultd,faultd"])
def test_a_second_kill_during_the_first_recovery(kills):
    """A second death at any time after the first, its recovery included: recovered in turn (as the
    supervisor's watcher does), no violation, and some runs do kill during a recovery."""
    f = world_factory("wrapped", kill=kills)
    during = 0
    for seed in range(40):
        w = _random_run(f, seed)
        during += w.coverage["a kill during a recovery"]
    assert during > 0


# ---------------------------------------------------------------- a VM's death: mm/recovery.py's vm_died
def _vm_died_effects(brk=(), repair=True, answer=None):
    """vm_died's effects in order, answered as the supervisor would (Freeze: held; exit_mmap's PTEs: one
    present page of frame 3)."""
    from workers.mm.recovery import vm_died
    gen = vm_died(1, ["ksmd", "faultd1"], (lambda: [0, 1]) if repair else None, 4, Breaks(brk))
    out, send, exc = [], None, None
    while True:
        try:
            e = gen.throw(exc) if exc else gen.send(send)
        except StopIteration as st:
            return out, st.value
        out.append(e)
        c = e.__class__
        send, exc = (True if c is Freeze else np.array([(3 << 12) | 1], dtype=np.uint64) if c is Load
                     else {"freed": 2} if c is Fsck else None), None
        if answer is not None:
            exc = answer(e)


def _vm_names(effects):
    return [f"forget {e.actor} {e.mm}" if e.__class__ is recovery.ForgetMM else f"lock {e.key[1]}"
            if e.__class__ is Lock else f"unlock {e.key[1]}" if e.__class__ is Unlock
            else e.__class__.__name__.lower() for e in effects]


def test_a_dead_vm_is_forgotten_then_unmapped_under_its_ptl_then_repaired():
    """ksmd and its fault handler forget the mm, exit_mmap under its ptl (the PTEs cleared before their
    frames are put), then the frame table repaired with ksmd frozen (the VM may have died inside its own
    MADV_DONTNEED); a clean exit needs no repair."""
    effects, done = _vm_died_effects()
    assert _vm_names(effects) == ["forget ksmd 1", "forget faultd1 1", "lock 1", "load", "store", "put", "unlock 1",
                                  "freeze", "lock 0", "lock 1", "load", "load", "fsck", "unlock 1", "unlock 0",
                                  "thaw"]
    assert done == {"unmapped": 1, "freed": 2}
    effects, done = _vm_died_effects(repair=False)
    assert _vm_names(effects)[-1] == "unlock 1" and done == {"unmapped": 1}


def test_a_dead_vm_whose_ptl_stays_busy_is_freed_without_it():
    effects, done = _vm_died_effects(repair=False, answer=lambda e: TimeoutError("ptl busy")
                                     if e.__class__ is Lock else None)
    assert _vm_names(effects) == ["forget ksmd 1", "forget faultd1 1", "lock 1", "load", "store", "put"]
    assert done == {"unmapped": 1, "unlocked": True}


def test_vm_teardown_breaks_remove_their_step():
    assert "forget ksmd 1" not in _vm_names(_vm_died_effects(["no-vm-forget"])[0])
    assert "fsck" not in _vm_names(_vm_died_effects(["no-vm-repair"])[0])


def test_supervisor_and_checker_run_the_one_vm_teardown_program():
    """No second copy: the supervisor's teardown of a VM and the checker's run mm.recovery.vm_died; neither
    calls exit_mmap or orders mm_exit and the frames' release itself."""
    sup = (ROOT / "workers/actors/supervisor_mm.py").read_text()
    world = (ROOT / "workers/check/programs.py").read_text()
    for src in (sup, world):
        assert "vm_died(" in src and "exit_mmap(" not in src
    assert sup.count('"mm_exit"') == 1 and "def _drop_mm" not in sup
    rec = (ROOT / "workers/actors/supervisor_recovery.py").read_text()
    assert "self._teardown_vm(vm, died=True)" in rec


@pytest.mark.parametrize("mode", ["change_pte", "wrapped", "invalidate"])
def test_kill_sweep_of_a_vm_is_clean_and_hits_it_mid_work(mode):
    """kill -9 of vm0 at every step of one schedule of the fork scenario: the other VMs lose nothing, the
    dead one's frames are freed; the kills hit it mid-fork, mid-write, mid-fault."""
    sw = explore.kill_sweep(world_factory(mode, scenario="fork", kill="vm"), victims=("vm0",))
    assert sw.found is None, sw.found and sw.found[1]
    assert sw.points > 400
    assert {"lock", "store", "get", "put", "local", "fault", "write"} <= set(sw.covered), sw.covered


def test_a_dead_vm_is_torn_down_and_its_frames_freed():
    """A run that kills vm0 ends with its mm gone and every frame it alone mapped free (frame accounting
    exact); the other VM read back everything it wrote."""
    f = world_factory("wrapped", kill="vm")
    torn = 0
    for seed in range(20):
        w = _random_run(f, seed)
        if w.vms[0].dead:
            torn += 1
            assert 0 not in w.mem.mms and all(0 not in sc.slots for sc in w.scans)
            mapped = {int(p) >> 12 for p in w.mem.mms[1].pte.tolist() if p & 1}
            assert w.alloc.nr_free == w.nframes - 1 - len(mapped - {0})
    assert torn == 20


def test_check_kill_the_second_vm_and_a_vm_that_is_not_there():
    """--kill vm1: the second VM dies and is torn down (the first wrote on; every run clean); --kill vm7 in a
    two-VM world: exit 2 naming the actors there are."""
    f = world_factory("wrapped", kill="vm1")
    torn = 0
    for seed in range(10):
        w = _random_run(f, seed)
        torn += w.vms[1].dead and not w.vms[0].dead
        assert 1 not in w.mem.mms or not w.vms[1].dead
    assert torn == 10
    p = check("--kill", "vm1", "--mode", "wrapped", "--runs", "20", "--seed", "2", "--jobs", "2")
    assert p.returncode == 0 and all(ln.endswith("no violation") for ln in p.stdout.splitlines()), \
        p.stdout + p.stderr
    p = check("--kill", "vm7", "--mode", "wrapped", "--runs", "2")
    assert p.returncode == 2 and p.stderr.strip() == \
        "ksm-proto check: --kill 'vm7': this world's actors are ksmd, faultd, vm0, vm1", p.stderr


@pytest.mark.parametrize("kills", ["vm,faultd", "faultd,vm", "vm,ksmd", "ksmd,vm"])
def test_a_vm_and_an_actor_killed_one_after_the_other(kills):
    p = check("--kill", kills, "--mode", "wrapped", "--runs", "40", "--seed", "5", "--jobs", "2")
    assert p.returncode == 0 and all(ln.endswith("no violation") for ln in p.stdout.splitlines()), \
        p.stdout + p.stderr


@pytest.mark.parametrize("mode", ["change_pte", "wrapped", "invalidate"])
def test_the_vm_teardown_breaks_are_caught_in_every_mode(mode):
    """no-vm-forget: ksmd scans the page table of a mm that is gone; no-vm-repair (the kill sweep): a VM
    killed inside its own MADV_DONTNEED leaves a frame counted that no PTE maps."""
    p = check("--break", "no-vm-forget", "--mode", mode, "--runs", "20", "--seed", "1")
    assert p.returncode == 1 and "VIOLATION: ksmd failed: KeyError: 0" in p.stdout, p.stdout + p.stderr
    sw = explore.kill_sweep(world_factory(mode, "no-vm-repair"), victims=("vm0",))
    assert sw.found is not None and any("0 PTEs map it" in v for v in sw.found[1]), sw.found


def test_the_checkers_restart_loads_the_knobs_as_ksmds_restart_does():
    """A restarted scanner reloads every knob from the stats segment (mm/ksm/knobs.loaded_knobs, which ksmd's
    load_stats runs too), not from the dead one's memory: a knob written there meanwhile is the one it runs."""
    from proto.layout import KNOBS
    w = world_factory("wrapped", kill="ksmd", scanners=2)()
    before = dict(w.scan.knobs)
    assert all(w.stats.knob(k) == v for k, v in before.items())
    w.stats.knobs[KNOBS.index("sleep_millisecs")] = 77
    w._kill("ksmd")
    w._restart("ksmd")
    assert [sc.knobs for sc in w.scans] == [dict(before, sleep_millisecs=77)] * 2
    for name in ("workers/check/delivery.py", "workers/actors/ksmd.py"):
        assert "loaded_knobs(self.stats.knob" in (ROOT / name).read_text()
    assert "knobs.update(old" not in (ROOT / "workers/check/delivery.py").read_text()


def test_a_dead_scanners_change_pte_read_after_the_vm_changed_the_pte_is_dropped():
    """A CHANGE_PTE still in the socket of a scanner that died (its ptl dropped by the kernel) may be read
    after the VM changed that PTE itself (MADV_DONTNEED, then a fault to the zero page): applied, it
    left kvm mapping a freed frame (`bench --only check`: kill -9 ksmd, 2 scanners, change_pte, seed 2,
    run 244).  A CHANGE_PTE whose new PTE is not the primary PTE is stale: the translation is dropped."""
    from proto.layout import PAGE_SHIFT, PAGE_SIZE, PTE_PRESENT, USER_BASE
    from proto.messages import Msg
    from workers.mm.mmu_notifier import NotifierLink, SecondaryMMU, receive_notification
    kvm = SecondaryMMU(0, "kvm", 4, True)
    primary = np.zeros(4, dtype=np.uint64)
    zero, ksm_page = PTE_PRESENT, (2 << PAGE_SHIFT) | PTE_PRESENT
    primary[1] = zero
    kvm.spte[1] = zero                          # the VM faulted page 1 in again, to the zero page
    link = NotifierLink("ksmd1")
    receive_notification({0: kvm}, link, Msg.CHANGE_PTE, 0, [(USER_BASE + PAGE_SIZE, ksm_page)], primary)
    assert int(kvm.spte[1]) == 0                # stale: dropped, not pointed at frame 2
    primary[1] = ksm_page                       # a live sender: its PTE is the primary PTE
    kvm.spte[1] = zero
    receive_notification({0: kvm}, link, Msg.CHANGE_PTE, 0, [(USER_BASE + PAGE_SIZE, ksm_page)], primary)
    assert int(kvm.spte[1]) == ksm_page
    many = np.array([[USER_BASE, ksm_page], [USER_BASE + PAGE_SIZE, ksm_page]], dtype=np.uint64)
    kvm.spte[0] = kvm.spte[1] = zero            # (the numpy path: page 0 stale, page 1 fresh)
    receive_notification({0: kvm}, link, Msg.CHANGE_PTE, 0, many, primary)
    assert kvm.spte[:2].tolist() == [0, ksm_page]
    res = explore.random_runs(world_factory("change_pte", scanners=2, kill="ksmd"), seed=2, runs=250, max_steps=4000,
                              shrink=False)
    assert res.found is None, res.found and res.found.violations
