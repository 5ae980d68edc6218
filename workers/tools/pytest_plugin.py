"""pytest plugin (entry point `pytest11`): fixtures that give a test a running Machine.

    def test_merge(ksm_machine):            # a Machine with default settings
        vm = ksm_machine.spawn_vm("a")

    def test_modes(ksm_machine_factory):    # Machines with arguments, all torn down
        m = ksm_machine_factory(notifier_mode="wrapped", frames=4096)

ctrl_c_delivered: a preexec_fn for children a test sends SIGINT.

Teardown closes every Machine and asserts that nothing of its run is left in
/dev/shm and that none of the processes it started is still alive.
"""
from __future__ import annotations

import signal

import pytest


def ctrl_c_delivered() -> None:
    """preexec_fn for a child a test will Ctrl-C: SIGINT back to its default, as under a terminal.
    (Where pytest itself runs in the background of a shell SIGINT is ignored, the children inherit
    that, and Python then never turns SIGINT into KeyboardInterrupt.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _leftovers(m) -> list[str]:
    from workers.actors.supervisor import run_entries
    return run_entries(m.run) if m.run else []


def _alive_children(m) -> list[int]:
    procs = (getattr(m, "scanner_procs", []) + getattr(m, "faultds", []) + [vm.actor for vm in m.vms.values()])
    return [a.pid for a in procs if a is not None and a.proc.poll() is None]


@pytest.fixture
def ksm_machine_factory():
    from workers.actors.supervisor import Machine
    made = []

    def make(**kw):
        kw.setdefault("frames", 8192)
        m = Machine(**kw).start()
        made.append(m)
        return m

    yield make
    problems = []
    for m in made:
        m.close()
        if _leftovers(m):
            problems.append(f"run {m.run} left {_leftovers(m)} in /dev/shm")
        if _alive_children(m):
            problems.append(f"run {m.run} left processes {_alive_children(m)}")
    assert not problems, "; ".join(problems)


@pytest.fixture
def ksm_machine(ksm_machine_factory):
    return ksm_machine_factory()
