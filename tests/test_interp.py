"""The one interpreter (runtime/interp.py): a backend answers an effect at once or BLOCKs, an op's
exception is thrown into the core at that effect, and nothing else in workers/ drives a core."""
import pathlib
import re

import pytest

from workers.mm.effects import Lock, Unlock, ptl
from workers.runtime.interp import BLOCK, Backend, resume, run_sync, run_until_blocked

ROOT = pathlib.Path(__file__).resolve().parent.parent


def core(log):
    yield Lock(ptl(0))
    try:
        log.append(("locked", (yield Unlock(ptl(1)))))
    finally:
        log.append("cleanup")
        yield Unlock(ptl(0))
    return "done"


def test_a_blocked_effect_is_handed_back_and_resumed():
    log, busy = [], [True]
    b = Backend(None, {Lock: lambda e: BLOCK if busy[0] else None, Unlock: lambda e: e.key[1]})
    gen = core(log)
    e, value = run_until_blocked(gen, b)
    assert (e.__class__, e.key, value, log) == (Lock, ("ptl", 0), None, [])
    e, value = run_until_blocked(gen, b, None)      # the caller waited: the lock is its answer
    assert (e, value, log) == (None, "done", [("locked", 1), "cleanup"])


def test_an_ops_exception_is_thrown_into_the_core_which_cleans_up():
    log = []

    def unlock(e):
        if e.key[1] == 1:
            raise TimeoutError("ptl 1 busy")

    b = Backend(None, {Lock: lambda e: None, Unlock: unlock})
    with pytest.raises(TimeoutError, match="ptl 1 busy"):
        run_sync(core(log), b)
    assert log == ["cleanup"]


def test_an_effect_no_op_knows_is_a_clear_error_and_a_sync_backend_cannot_block():
    b = Backend(None, {})
    b.name = "nowhere"
    with pytest.raises(TypeError, match="has no driver in nowhere"):
        run_sync(core([]), b)
    b = Backend(None, {Lock: lambda e: BLOCK})
    with pytest.raises(TypeError, match="must wait"):
        run_sync(core([]), b)
    assert resume((x for x in ()), None) == (None, None)


def test_nothing_else_drives_a_core():
    """Every gen.send / gen.throw of a core is in runtime/interp.py: the actors, the supervisor and the
    checker are backends of it, not interpreters of their own."""
    found = []
    for path in (ROOT / "workers").rglob("*.py"):
        if path.name == "interp.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bgen\w*\.(send|throw)\(", line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
