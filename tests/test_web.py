"""The web view (workers/tools/web): what a real browser shows equals the run's own numbers; the token and
--read-only hold; bad requests get a JSON error, never a traceback.

The browser is the distribution's headless Chromium driven by Selenium (the `test` extra); the
`browser` fixture installs `chromium` and `chromium-driver` with apt-get when they are missing and
we are root, and skips, saying why, only where they cannot be had.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from proto import MADV_MERGEABLE, PAGE_SIZE
from proto.layout import USER_BASE
from workers.tools.pytest_plugin import ctrl_c_delivered
from workers.tools.web import LiveSource, WebServer
from workers.tools.web.browser import ensure_chromium, new_driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 60.0


@pytest.fixture(scope="session")
def browser():
    pytest.importorskip("selenium", reason="selenium is in the `test` extra: pip install -e '.[test]'")
    why = ensure_chromium()
    if why:
        pytest.skip(f"no headless Chromium: {why}")
    d = new_driver()
    yield d
    d.quit()


def wait_for(what: str, cond, timeout: float = WAIT, every: float = 0.05):
    """cond() until it returns something true (returned); TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Exception as e:  # the page may be between two updates
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout}s (last: {last!r})")


def get(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, text, ctype = r.status, r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, text, ctype = e.code, e.read().decode(), e.headers.get("Content-Type", "")
    return status, (json.loads(text) if ctype.startswith("application/json") else text)


def base(url: str) -> tuple[str, str]:
    b, tok = url.split("/?token=")
    return b, tok


# ---------------------------------------------------------------------------- the state to compare
def merged_pair(m, npages: int = 16, unique: int = 4):
    """VMs a and b: npages pages of 0x07 each (all merge into one KSM page) and `unique` pages of
    their own; returns (a, b, addr)."""
    vms = []
    for k, name in enumerate(("a", "b")):
        vm = m.spawn_vm(name, pages=256)
        x = vm.mmap((npages + unique) * PAGE_SIZE)
        vm.write(x, b"\x07" * npages * PAGE_SIZE)
        for u in range(unique):
            vm.write(x + (npages + u) * PAGE_SIZE, bytes([16 * k + u + 1]) * PAGE_SIZE)
        vm.madvise(x, (npages + unique) * PAGE_SIZE, MADV_MERGEABLE)
        vms.append(vm)
    return vms[0], vms[1], x


def expected(m, vms, npages: int) -> dict:
    """What the page must show, from the run's own interfaces: m.ksm.stats(), vm.pagemap(), vm.msg_log()."""
    s = m.ksm.stats()
    maps = {vm.name: vm.pagemap(USER_BASE, npages) for vm in vms}
    frames = [p for pm in maps.values() for p in pm if p is not None]
    shared = {p for p in frames if frames.count(p) > 1}
    return {"counters": {k: s[k] for k in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                                          "full_scans")},
            "pfn": {n: [-1 if p is None else p for p in pm] for n, pm in maps.items()},
            "cells": {"ksm": s["pages_shared"], "zero": 1, "anon": len(set(frames) - shared),
                      "free": m.nframes - 1 - s["pages_shared"] - len(set(frames) - shared)},
            "log": {vm.name: vm.msg_log()["kvm"] for vm in vms},
            "counts": {k: sum(vm.stats()["msgs"][k] for vm in vms) for k in vms[0].stats()["msgs"]},
            "cow_faults": sum(vm.stats()["cow_faults"] for vm in vms),
            "ksm_stat": {vm.name: vm.ksm_stat() for vm in vms}}


def shown(d) -> dict:
    """What the page shows: its DOM text, and the arrays it drew from."""
    js = """
      const S = window.ksm, out = {updates: S.updates, pfn: {}, stat: {}, rows: {}};
      for (const n in S.vms) out.pfn[n] = Array.from(S.vms[n].pfn);
      for (const k of ["free", "anon", "ksm", "zero"]) out[k] = document.getElementById("count-" + k).textContent;
      out.ctr = {};
      for (const k of ["pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans"])
        out.ctr[k] = document.getElementById("ctr-" + k).textContent;
      for (const el of document.querySelectorAll(".vm .stat")) out.stat[el.closest(".vm").dataset.vm] = {...el.dataset};
      for (const el of document.querySelectorAll("#msgs .msg")) {
        const k = el.dataset.vm + "/" + el.dataset.sub;
        if (!(k in out.rows)) out.rows[k] = {seq: +el.dataset.seq, type: el.dataset.type};
      }
      out.controls_hidden = document.getElementById("controls").hidden;
      out.counts = {};
      for (const el of document.querySelectorAll("#msgcounts tr")) out.counts[el.dataset.type] = el.cells[1].textContent;
      return out;"""
    return d.execute_script(js)


def num(text: str) -> int:
    return int(text.replace(",", ""))


def agrees(page: dict, want: dict) -> bool:
    return (all(num(page[k]) == v for k, v in want["cells"].items())
            and all(num(page["ctr"][k]) == v for k, v in want["counters"].items())
            and all(page["pfn"].get(n) == p[:len(page["pfn"].get(n, []))] and len(page["pfn"][n]) > 0
                    for n, p in want["pfn"].items())
            and all(page["rows"].get(f"{n}/kvm") == {"seq": len(log), "type": log[-1]} for n, log in want["log"].items())
            and {k: num(v) for k, v in page["counts"].items() if k != "FAULT (COW)"} == want["counts"]
            and num(page["counts"].get("FAULT (COW)", "0")) == want["cow_faults"])


# ---------------------------------------------------------------------------- the browser test
def test_page_shows_what_the_run_has(ksm_machine_factory, browser):
    """Merges, then a COW through the page's own control: cells of each kind, counters, each VM's page
    table and ksm_stat, the newest notifier message of each VM are what the run says."""
    m = ksm_machine_factory(frames=4096)
    web = WebServer(LiveSource(m), port=0)
    url = web.start()
    try:
        a, b, x = merged_pair(m)
        npages = 20
        m.ksm.set(pages_to_scan=1000, sleep_millisecs=0, run=1)
        m.ksm.wait_stable(timeout=WAIT)
        m.ksm.set(run=0)        # held still: the page and the run are compared at rest
        browser.get(url)
        want = expected(m, (a, b), npages)
        assert want["counters"]["pages_shared"] == 1 and want["counters"]["pages_sharing"] == 31
        page = wait_for("the page shows the merged state", lambda: (p := shown(browser)) and agrees(p, want) and p)
        assert {k: num(page[k]) for k in ("free", "anon", "ksm", "zero")} == \
            {"free": 4096 - 1 - 1 - 8, "anon": 8, "ksm": 1, "zero": 1}
        for n in ("a", "b"):
            st = want["ksm_stat"][n]
            assert {k: int(page["stat"][n][k]) for k in ("ksm_rmap_items", "ksm_merging_pages")} == \
                {"ksm_rmap_items": st["ksm_rmap_items"], "ksm_merging_pages": st["ksm_merging_pages"]} == \
                {"ksm_rmap_items": 20, "ksm_merging_pages": 16}
        assert not page["controls_hidden"]

        # hover a's page 3: its frame (the KSM page) and the 31 other pages mapping it
        from selenium.webdriver.common.action_chains import ActionChains
        strip = browser.find_element("css selector", 'canvas.strip[data-vm="a"]')
        sc = 2
        ActionChains(browser).move_to_element_with_offset(
            strip, 3 * sc + 1 - strip.size["width"] // 2, 1 - strip.size["height"] // 2).perform()
        tip = wait_for("the hover box", lambda: browser.find_element("id", "hover").text)
        ksm_pfn = a.pagemap(x + 3 * PAGE_SIZE, 1)[0]
        assert f"a page 3 ({hex(x + 3 * PAGE_SIZE)}) -> frame {ksm_pfn}" in tip
        assert f"frame {ksm_pfn}: KSM, mapcount 32" in tip and "also mapped by 31 page(s):" in tip
        assert "  a: 15 page(s): 0-2, 4-15\n  b: 16 page(s): 0-15" in tip

        # a COW from the page: write a's page 2 with the control
        browser.find_element("id", "ctl-vm").send_keys("a")
        for el, v in (("ctl-page", "2"), ("ctl-value", "99")):
            e = browser.find_element("id", el)
            e.clear()
            e.send_keys(v)
        browser.find_element("id", "btn-write").click()
        wait_for("the write's reply", lambda: "write: ok" in browser.find_element("id", "ctl-result").text)
        assert a.read(x + 2 * PAGE_SIZE, PAGE_SIZE) == bytes([99]) * PAGE_SIZE
        assert a.stats()["cow_faults"] == 1
        want = expected(m, (a, b), npages)
        assert want["counters"]["pages_sharing"] == 31       # (ksmd notices at its next scan: run is 0)
        assert want["pfn"]["a"][2] not in (ksm_pfn, -1)
        page = wait_for("the page shows the COW", lambda: (p := shown(browser)) and agrees(p, want) and p)
        assert num(page["anon"]) == 9 and num(page["ksm"]) == 1
        assert page["rows"]["a/kvm"]["type"] == want["log"]["a"][-1]
        assert page["rows"]["a/faultd"] == {"seq": 1, "type": "FAULT/REPLY"}
        assert num(page["counts"]["FAULT (COW)"]) == 1 and num(page["counts"]["CHANGE_PTE"]) == want["counts"]["CHANGE_PTE"]

        # and the counters move on the page when ksmd runs again
        m.ksm.set(run=1)
        m.ksm.wait_full_scans(2, timeout=WAIT)
        m.ksm.set(run=0)
        want = expected(m, (a, b), npages)
        assert want["counters"]["pages_sharing"] == 30
        wait_for("the page shows the rescan", lambda: agrees(shown(browser), want))
    finally:
        web.stop()


def test_read_only_page_has_no_controls(ksm_machine_factory, browser):
    m = ksm_machine_factory(frames=1024)
    web = WebServer(LiveSource(m), port=0, read_only=True)
    url = web.start()
    try:
        m.spawn_vm("a", pages=64).mmap(4 * PAGE_SIZE)
        browser.get(url)
        page = wait_for("the first update", lambda: (p := shown(browser)) and p["updates"] > 0 and p)
        assert page["controls_hidden"] is True
        assert not browser.find_element("id", "controls").is_displayed()
        reply = browser.execute_async_script("""
          const done = arguments[0];
          fetch("api/control", {method: "POST", headers: {"Content-Type": "application/json", "X-KSM-Token": KSM_TOKEN},
                body: JSON.stringify({action: "knobs", knobs: {run: 1}})})
            .then(r => r.json().then(j => done([r.status, j])));""")
        assert reply[0] == 403 and "read-only" in reply[1]["error"]
        assert m.ksm.get("run") == 0
    finally:
        web.stop()


# ---------------------------------------------------------------------------- no browser needed
def test_token_is_required_and_errors_are_json(ksm_machine_factory):
    m = ksm_machine_factory(frames=1024)
    web = WebServer(LiveSource(m), port=0)
    url = web.start()
    b, tok = base(url)
    try:
        assert len(tok) >= 32 and web.port != 0
        assert web.httpd.server_address[0] == "127.0.0.1"
        for path in ("/", "/app.js", "/api/state", "/api/events", "/nothing"):
            for q in ("", "?token=", "?token=" + tok[:-1] + ("A" if tok[-1] != "A" else "B")):
                status, body = get(b + path + q)
                assert status == 403, (path, q)
                assert body["status"] == 403 and "token" in body["error"]
        status, body = get(b + "/api/control", b'{"action": "knobs", "knobs": {"run": 1}}')
        assert status == 403 and m.ksm.get("run") == 0
        status, body = get(b + "/api/state", headers={"X-KSM-Token": "x" * len(tok)})
        assert status == 403
        # the right token: in the query or in the header
        status, page = get(url)
        assert status == 200 and f'KSM_TOKEN = "{tok}"' in page
        status, st = get(b + "/api/state", headers={"X-KSM-Token": tok})
        assert status == 200 and st["info"] == {"source": "live", "mode": "change_pte", "nframes": 1024}
        assert st["cells"] == {"free": 1023, "anon": 0, "zero": 1, "ksm": 0}
        # bad requests: a clear JSON error, never a traceback
        ctl = b + "/api/control?token=" + tok
        for body, status_want, words in (
                (b"{not json", 400, "not JSON"),
                (b"[1, 2]", 400, "JSON object"),
                (b'{"action": "reboot"}', 400, "unknown action"),
                (b'{"action": "knobs", "knobs": {"run": 7}}', 400, "run"),
                (b'{"action": "knobs", "knobs": {"secret": 1}}', 400, "unknown knob"),
                (b'{"action": "write", "vm": "nope", "page": 0, "value": 1}', 404, "no running VM"),
                (b'{"action": "write", "vm": "a", "page": -1, "value": 1}', 400, "page"),
                (b'{"action": "write", "vm": "a", "page": 0, "value": 1}', 400, "refused"),
                (b'{"action": "madvise", "vm": "a", "page": 0, "advice": "MADV_FREE"}', 400, "advice")):
            if b'"a"' in body and "a" not in m.vms:
                m.spawn_vm("a", pages=16)
            status, err = get(ctl, body, {"Content-Type": "application/json"})
            assert status == status_want, (body, err)
            assert words in err["error"] and "Traceback" not in err["error"], (body, err)
        status, err = get(b + "/nothing?token=" + tok)
        assert status == 404 and "no such page" in err["error"]
        status, ok = get(ctl, b'{"action": "knobs", "knobs": {"pages_to_scan": 77}}')
        assert status == 200 and ok["knobs"]["pages_to_scan"] == 77 and m.ksm.get("pages_to_scan") == 77
        with pytest.raises(OSError, match=f"port {web.port} on 127.0.0.1 is in use: pass --port N"):
            WebServer(LiveSource(m), port=web.port).start()
    finally:
        web.stop()


def test_event_stream_sends_changes_only(ksm_machine_factory):
    """The first event has the whole frame table, the next ones only the cells that changed."""
    m = ksm_machine_factory(frames=4096)
    web = WebServer(LiveSource(m), port=0, interval=0.05)
    url = web.start()
    b, tok = base(url)
    try:
        with urllib.request.urlopen(b + "/api/events?token=" + tok, timeout=30) as r:
            def event():
                line = r.readline()
                assert r.readline() == b"\n"
                return json.loads(line[len(b"data: "):])
            first = event()
            assert "full" in first["frames"] and first["info"]["nframes"] == 4096
            vm = m.spawn_vm("a", pages=64)
            x = vm.mmap(8 * PAGE_SIZE)
            vm.write(x, b"\x01" * 3 * PAGE_SIZE)            # three anonymous frames
            pfns = vm.pagemap(x, 3)
            changed = {}
            d = wait_for("the three new frames", lambda: (e := event()) and (changed.update(
                zip(e["frames"].get("idx", []), e["frames"].get("val", []))) or len(changed) >= 3) and e)
            assert "full" not in d["frames"]
            assert changed == {p: 1 for p in pfns}
    finally:
        web.stop()


def small_scenario(tmp_path) -> str:
    p = tmp_path / "small.toml"
    p.write_text('[ksm]\npages_to_scan = 1000\nsleep_millisecs = 0\n'
                 '[[vm]]\nname = "a"\n  [[vm.region]]\n  source = "zero"\n  pages = 32\n  mergeable = true\n'
                 '[[vm]]\nname = "b"\n  [[vm.region]]\n  source = "zero"\n  pages = 32\n  mergeable = true\n')
    return str(p)


def start_cli(args: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "workers.tools.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_delivered)
    lines = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        lines.append(line)
        if line.startswith("web view") and "token=" in line:
            return p, re.search(r"http://127\.0\.0\.1:\d+/\?token=[\w-]+", line).group(0)
        if not line and p.poll() is not None:
            break
    p.kill()
    raise AssertionError(f"no web view URL from {args}: {''.join(lines)}")


def test_cli_run_web_read_only(tmp_path):
    """ksm-proto run --web --read-only: serves until Ctrl-C, refuses controls, then prints its result."""
    p, url = start_cli(["run", small_scenario(tmp_path), "--web", "--port", "0", "--read-only", "--json"])
    try:
        b, tok = base(url)
        st = wait_for("both VMs loaded and merged", lambda: (s := get(b + "/api/state?token=" + tok)[1])
                      and s["counters"]["pages_sharing"] == 63 and s)
        assert st["read_only"] is True and set(st["vms"]) == {"a", "b"} and st["cells"]["ksm"] == 1
        status, err = get(b + "/api/control?token=" + tok, b'{"action": "knobs", "knobs": {"run": 0}}')
        assert status == 403 and "--read-only" in err["error"]
        assert get(url.replace(tok, "wrong"))[0] == 403
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=WAIT)
    assert p.returncode == 0, err
    res = json.loads(out)
    assert res["ksm"]["pages_shared"] == 1 and res["ksm"]["pages_sharing"] == 63
    assert res["readback_mismatches"] == 0 and "readback_checked" not in res


def test_cli_usage_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "workers.tools.cli", "run", "--read-only"], cwd=ROOT, capture_output=True,
                       text=True, timeout=WAIT)
    assert r.returncode == 2 and "--port and --read-only go with --web" in r.stderr
    r = subprocess.run([sys.executable, "-m", "workers.tools.cli", "run", "--web", "--port", "70000"], cwd=ROOT,
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 2 and "65535" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = subprocess.run([sys.executable, "-m", "workers.tools.cli", "trace", "view", str(bad), "--port", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 2 and "not a ksm-proto trace" in r.stderr and "Traceback" not in r.stderr


def test_trace_view_replays_a_recorded_run(tmp_path):
    """ksm-proto trace view: the same page replays a trace, read-only, its messages and counters."""
    t = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "workers.tools.cli", "run", small_scenario(tmp_path), "--trace", str(t),
                        "--json", "--scans", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p, url = start_cli(["trace", "view", str(t), "--port", "0", "--speed", "1000"])
    try:
        b, tok = base(url)
        st = wait_for("the replay's end", lambda: (s := get(b + "/api/state?token=" + tok)[1])
                      and s["info"]["t_us"] == s["info"]["end_us"] and s)
        assert st["info"]["source"] == "replay" and st["info"]["mode"] == "change_pte (inferred)"
        assert st["read_only"] is True
        from workers.tools import tracetool
        doc = tracetool.load(str(t))
        last = {e["name"]: e["args"]["value"] for e in doc["traceEvents"] if e.get("ph") == "C"}
        assert st["counters"]["pages_shared"] == last["pages_shared"] == 0      # (the VMs exited at its end)
        assert st["counters"]["pages_sharing"] == last["pages_sharing"] == 0
        assert set(st["msgs"]) == {"a", "b"}
        sent = [x for x in tracetool.messages(doc) if x["actor"] == "ksmd" and x["dir"] == "send" and x["peer"] == "vm:a"]
        assert st["msgs"]["a"]["ksmd"]["n"] == len(sent) > 0
        assert st["msg_counts"]["CHANGE_PTE"] == sum(x["n"] for x in tracetool.messages(doc)
                                                     if x["type"] == "CHANGE_PTE" and x["dir"] == "send")
        status, err = get(b + "/api/control?token=" + tok, b'{"action": "knobs", "knobs": {"run": 1}}')
        assert status == 403 and "replayed trace" in err["error"]
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=WAIT)
    assert p.returncode == 0
