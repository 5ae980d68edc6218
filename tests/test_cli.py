"""The ksm-proto command: scenarios, --json, the demo, and clear errors for bad scenario files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from proto import PAGE_SIZE
from workers.actors.supervisor import SHM_DIR
from workers.tools.scenario import ScenarioError, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ksm_proto(*args, timeout=120):
    p = subprocess.Popen([sys.executable, "-m", "workers.tools.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()                # by pid: the one started here
            p.wait(10)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    r.pid = p.pid
    return r


def left_behind(r) -> list[str]:
    """What the run of that ksm-proto process left in /dev/shm (other users' runs come and go)."""
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"ksmp.{r.pid}.")]


@pytest.mark.parametrize("own", ["", "scanners = 2\nfault_handlers = 2"], ids=["1-scanner", "2-scanners"])
def test_run_scenario_json_exact(tmp_path, own):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 * PAGE_SIZE) + b"tail")           # 4 pages once zero-padded
    sc = tmp_path / "s.toml"
    sc.write_text(f"""
[ksm]
{own}
max_page_sharing = 256
use_zero_pages = 0
smart_scan = 0

[[vm]]
name = "one"
  [[vm.region]]
  source = "file:{blob}"
  [[vm.region]]
  source = "zero"
  pages = 10
  [[vm.region]]
  source = "random:7"
  pages = 3
  mergeable = false

[[vm]]
name = "two"
  [[vm.region]]
  source = "file:{blob}"
  [[vm.region]]
  source = "random:8"
  pages = 5
""")
    r = ksm_proto("run", str(sc), "--json", "--until-stable")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)                 # exactly one JSON object
    k = out["ksm"]
    # the file's 4 pages are shared by both VMs; 10 zero pages share one KSM page
    assert (k["pages_shared"], k["pages_sharing"]) == (5, 4 + 9)
    assert k["pages_unshared"] == 5 and k["pages_volatile"] == 0
    assert k["stable_node_chains"] == 0 and k["ksm_zero_pages"] == 0
    assert set(out["vms"]) == {"one", "two"}
    assert out["vms"]["one"]["ksm_stat"]["ksm_rmap_items"] == 14       # the unmergeable region has none
    assert out["vms"]["two"]["ksm_stat"]["ksm_merging_pages"] == 4
    assert out["readback_mismatches"] == 0
    assert left_behind(r) == []


@pytest.mark.parametrize("body, field", [
    ("[[vm]]\nname = 'a'\n", "vm[0].region"),
    ("[[vm]]\n[[vm.region]]\nsource = 'disk:/x'\npages = 1\n", "vm[0].region[0].source"),
    ("[[vm]]\n[[vm.region]]\nsource = 'zero'\n", "vm[0].region[0].pages"),
    ("[[vm]]\n[[vm.region]]\nsource = 'random:x'\npages = 2\n", "vm[0].region[0].source"),
    ("[[vm]]\n[[vm.region]]\nsource = 'file:/no/such/file'\n", "vm[0].region[0].source"),
    ("[[vm]]\n[[vm.region]]\nsource = 'zero'\npages = -3\n", "vm[0].region[0].pages"),
    ("[[vm]]\n[[vm.region]]\nsource = 'zero'\npages = 2\nmergeable = 'yes'\n", "vm[0].region[0].mergeable"),
    ("[ksm]\nrun = 7\n[[vm]]\n[[vm.region]]\nsource = 'zero'\npages = 2\n", "ksm.run"),
    ("[ksm]\nmax_page_sharing = 1\n[[vm]]\n[[vm.region]]\npages = 2\n", "ksm.max_page_sharing"),
    ("[machine]\nnotifier_mode = 'magic'\n[[vm]]\n[[vm.region]]\npages = 2\n", "machine.notifier_mode"),
    ("[[vm]]\nname = 'a'\n[[vm.region]]\npages = 1\n[[vm]]\nname = 'a'\n[[vm.region]]\npages = 1\n", "vm[1].name"),
    ("[[vm]]\n[[vm.region]]\npages = 4\nwriter = { pages = 9 }\n", "vm[0].region[0].writer.pages"),
    ("[[vm]]\ncolour = 'red'\n[[vm.region]]\npages = 1\n", "vm[0].colour"),
    ("[[vm]]\n[[vm.region]]\npages = 1\nprot = 'wx'\n", "vm[0].region[0].prot"),
    ("[[vm]]\n[[vm.region]]\npages = 4\nprot = 'r'\nwriter = { pages = 2 }\n", "vm[0].region[0].writer"),
    ("[[vm]]\nname = 'b'\nfork_of = 'a'\n", "vm[0].fork_of"),
    ("[[vm]]\nname = 'a'\n[[vm.region]]\npages = 1\n[[vm]]\nfork_of = 'a'\nnode = 1\n", "vm[1].node"),
    ("[[vm]]\nmerge_any = 1\n[[vm.region]]\npages = 1\n", "vm[0].merge_any"),
    ("this is = not toml [", "not valid TOML"),
    ("[machine]\ncolour = 'red'\n[[vm]]\n[[vm.region]]\npages = 1\n", "machine.colour"),
    ("[[vm]]\n[[vm.region]]\npages = 4\nwriter = { period_ms = nan }\n", "writer.period_ms"),
    ("[[vm]]\n[[vm.region]]\npages = 4\nwriter = { period_ms = inf }\n", "writer.period_ms"),
    ("[[vm]]\n[[vm.region]]\npages = 4\nwriter = { period_ms = -inf }\n", "writer.period_ms"),
    ("[[vm]]\n[[vm.region]]\nsource = 'random:-5'\npages = 1\n", "vm[0].region[0].source"),
    ("[[vm]]\n[[vm.region]]\nsource = 'file:/'\n", "vm[0].region[0].source"),
    ("[[vm]]\n[[vm.region]]\nsource = 'file:/dev/null'\n", "vm[0].region[0].source"),
    ("[[vm]]\n[[vm.region]]\nsource = 'zero'\npages = 10000000000\n", "vm[0].region[0].pages"),
    ("[[vm]]\nname = ''\n[[vm.region]]\npages = 1\n", "vm[0].name"),
    ('[[vm]]\nname = "a\\u0007b"\n[[vm.region]]\npages = 1\n', "vm[0].name"),
])
def test_bad_scenarios_name_the_field(tmp_path, body, field):
    sc = tmp_path / "bad.toml"
    sc.write_text(body)
    r = ksm_proto("run", str(sc), "--json")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], r.stderr


def test_run_scenario_with_fork_prot_and_merge_any(tmp_path):
    """fork_of maps the parent's regions COW-shared in the child (no KSM page for a forked page),
    merge_any makes the child's new regions mergeable unless mergeable = false, prot applies."""
    sc = tmp_path / "f.toml"
    sc.write_text("""
[ksm]
use_zero_pages = 1
smart_scan = 0
[[vm]]
name = "a"
  [[vm.region]]
  source = "random:1"
  pages = 16
  [[vm.region]]
  source = "zero"
  pages = 8
  prot = "none"
[[vm]]
name = "b"
fork_of = "a"
merge_any = true
  [[vm.region]]
  source = "random:1"
  pages = 16
  mergeable = false
  [[vm.region]]
  source = "random:2"
  pages = 4
  prot = "r"
""")
    r = ksm_proto("run", str(sc), "--json", "--until-stable")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    k = out["ksm"]
    # a's 16 pages are b's too (the same frames: not merged); b's own copy of them is unmergeable
    assert (k["pages_shared"], k["pages_sharing"], k["pages_unshared"], k["pages_volatile"]) == (0, 0, 20, 16)
    assert k["ksm_zero_pages"] == 16                       # a's PROT_NONE zero pages, and b's inherited ones
    a, b = out["vms"]["a"]["ksm_stat"], out["vms"]["b"]["ksm_stat"]
    assert (a["ksm_rmap_items"], a["ksm_zero_pages"], a["ksm_merge_any"]) == (16, 8, False)
    assert (b["ksm_rmap_items"], b["ksm_zero_pages"], b["ksm_merge_any"]) == (20, 8, True)
    assert out["readback_mismatches"] == 0


def test_parse_errors_are_scenario_errors():
    with pytest.raises(ScenarioError, match=r"vm\[0\]\.region\[0\]\.source: unknown kind"):
        parse({"vm": [{"region": [{"source": "tape:1", "pages": 1}]}]}, "x.toml")


def test_demo_runs_and_cleans_up():
    r = ksm_proto("run", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    k = out["ksm"]
    assert len(out["vms"]) >= 4
    assert out["readback_mismatches"] == 0
    # the same libraries in every VM (each VM: F file pages + 128 random + 128 zero + 32 written):
    # every file page of VMs 2..4 shares the first VM's copy
    nvm = len(out["vms"])
    file_pages = out["pages_loaded"] // nvm - 288
    assert k["pages_sharing"] >= (nvm - 1) * file_pages
    assert k["pages_shared"] + k["pages_sharing"] + k["pages_unshared"] + k["pages_volatile"] == \
        sum(v["ksm_stat"]["ksm_rmap_items"] for v in out["vms"].values())
    assert sum(v["writers"][0]["done"] for v in out["vms"].values()) > 0
    assert left_behind(r) == []


def test_trace_commands_reject_missing_file(tmp_path):
    r = ksm_proto("trace", "check", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "no such trace file" in r.stderr
