"""What `make test` needs to run the suite on several cores (pytest-xdist, `-n 2 --dist loadgroup`).

The tests that use the real kernel's KSM (/sys/kernel/mm/ksm: its knobs and its system-wide counters)
or hold real MADV_MERGEABLE memory, which the kernel's ksmd would merge under another test's counters,
go to one xdist group, "kernel", so that no two of them ever run at once: those marked `kernel`, the
kernel side of tests/test_ksm_selftests.py (`side` = "kernel") and the tests whose `children` (in
tests/test_estimate.py) hold mergeable memory. Everything else is safe side by side: each Machine's
shared memory, locks and sockets are its own run's, and the tests that look at /dev/shm look only at
their own runs' entries.
"""
from __future__ import annotations

import pytest


def uses_the_kernel(item) -> bool:
    if item.get_closest_marker("kernel") or "children" in getattr(item, "fixturenames", ()):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("side") == "kernel"


@pytest.hookimpl(tryfirst=True)          # before xdist's own, which reads the groups off the items
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if uses_the_kernel(item):
            item.add_marker(pytest.mark.xdist_group("kernel"))
