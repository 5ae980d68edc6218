"""The README's picture of the web view: docs/web.png, taken in headless Chromium from a live run.

    .venv/bin/python docs/web_shot.py [docs/web.png]

A machine of 65,536 frames, four VMs holding the same libc and libcrypto, pages of a few repeated
patterns (KSM pages of mapcounts from 4 to 200), zeroed buffers and data of their own; merged by
ksmd, then a few pages written again (COW faults), the pointer over a merged page of vm1.
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from proto import MADV_MERGEABLE, PAGE_SIZE  # noqa: E402
from workers import Machine  # noqa: E402
from workers.tools.web import LiveSource, WebServer  # noqa: E402
from workers.tools.web.browser import ensure_chromium, new_driver  # noqa: E402

LIBS = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"]


def content(k: int) -> bytes:
    parts = []
    for lib in LIBS:
        if os.path.exists(lib):
            with open(lib, "rb") as f:
                b = f.read()
            parts.append(b + bytes(-len(b) % PAGE_SIZE))
    rng = np.random.default_rng(k)
    pat = bytearray()
    for v, n in ((1, 50), (2, 30), (3, 12), (4, 4)):
        pat += bytes([v]) * PAGE_SIZE * n
    parts.append(bytes(pat))
    parts.append(bytes(PAGE_SIZE * 256))                                # zeroed buffers
    parts.append(rng.integers(0, 256, PAGE_SIZE * (600 + 300 * k), dtype=np.uint8).tobytes())  # its own data
    return b"".join(parts)


def main(out: str) -> int:
    why = ensure_chromium()
    if why:
        print(f"web_shot: no headless Chromium: {why}", file=sys.stderr)
        return 1
    with Machine(frames=65536) as m:
        web = WebServer(LiveSource(m), port=0)
        url = web.start()
        drv = new_driver(1560, 1010)
        try:
            drv.get(url)
            vms = []
            for k in range(4):
                data = content(k)
                vm = m.spawn_vm(f"vm{k}", pages=len(data) // PAGE_SIZE + 64)
                x = vm.mmap(len(data))
                vm.write(x, data)
                vm.madvise(x, len(data), MADV_MERGEABLE)
                vms.append((vm, x, len(data) // PAGE_SIZE))
            m.ksm.set(pages_to_scan=2000, sleep_millisecs=20, run=1)
            m.ksm.wait_stable(timeout=300)
            for vm, x, n in vms[:2]:            # some COW faults
                for p in range(0, 400, 37):
                    vm.write(x + p * PAGE_SIZE, b"\xee" * PAGE_SIZE)
            m.ksm.wait_full_scans(1, timeout=120)
            m.ksm.set(run=0)
            time.sleep(2.0)
            from selenium.webdriver.common.action_chains import ActionChains
            strip = drv.find_element("css selector", 'canvas.strip[data-vm="vm1"]')
            page = 10
            g = drv.execute_script("return window.ksm.vms['vm1'].geom")
            ActionChains(drv).move_to_element_with_offset(
                strip, (page % g["c"]) * g["sc"] + 1 - strip.size["width"] // 2,
                (page // g["c"]) * g["sc"] + 1 - strip.size["height"] // 2).perform()
            time.sleep(0.5)
            drv.save_screenshot(out)
            print(f"web_shot: {out}; counters {m.ksm.stats()}")
        finally:
            drv.quit()
            web.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "web.png")))
