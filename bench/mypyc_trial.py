"""The mypyc trial of issue 22 (docs/performance-notes.md): compile the fault path's cores with mypyc in a
copy of the tree and time the COW's protocol core, compiled against pure, in interleaved rounds.

Not part of `ksm-proto bench` and not a dependency of the project: it needs mypy (which brings mypyc),
gcc and the Python headers.  It copies proto/, workers/ and bench/ to a temporary directory, applies
there the source changes mypyc needs (TRIAL_EDITS: each one fails loudly if the source moved on),
compiles MODULES in place (extension modules next to the copies' sources), and runs each round in a
fresh process of each tree (PYTHONPATH), the order alternating (ABBA):

    .venv/bin/pip install mypy
    .venv/bin/python bench/mypyc_trial.py --rounds 6 --pages 2048            # the core alone
    .venv/bin/python bench/mypyc_trial.py --rounds 6 --pages 4096 --e2e      # + the VM's COW fault
    .venv/bin/python bench/mypyc_trial.py --rounds 0 --keep /tmp/mc --tests tests/test_cores.py

--tests runs those test files against the compiled copy (with its tests/ copied in).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["workers/mm/effects.py", "workers/mm/fault.py", "workers/mm/pte.py", "workers/runtime/interp.py"]

_SETUP = """from setuptools import setup
from mypyc.build import mypycify
setup(name="mypyc-trial", ext_modules=mypycify(["--follow-imports=silent", "--ignore-missing-imports",
      "--disable-error-code=annotation-unchecked", *%r]))
"""

# (path, old, new): the changes mypyc forces on MODULES (see docs/performance-notes.md for why each)
_BACKEND_START, _BACKEND_END = "class _Block:", "def resume("
TRIAL_EDITS = [
    # type errors mypy reports (mypyc compiles only what type-checks)
    ("workers/mm/fault.py", "    replied = []\n", "    replied: list = []\n"),
    # (two more made `reuse = None` on the unshare path a list: do_wp_page's plain loop has lists only since)
    ("workers/mm/fault.py", "def wp_page_copy(mm: int, idx: list, old: list,", "def wp_page_copy(mm: int, idx: list, old: list | None,"),
    ("workers/mm/fault.py", "def wp_page_copy_reply(mm: int, idx: list, old: list,",
     "def wp_page_copy_reply(mm: int, idx: list, old: list | None,"),
    ("workers/mm/fault.py", "def copy_and_install(mm: int, idx: list, old: list,", "def copy_and_install(mm: int, idx: list, old,"),
    ("workers/mm/pte.py", "    return [tuple(v) for v in merged]", "    return [(v[0], v[1], v[2]) for v in merged]"),
    # Effect is subclassed by interpreted modules (kvm, recovery, the checker's worlds)
    ("workers/mm/effects.py", "from __future__ import annotations\n",
     "from __future__ import annotations\n\nfrom mypy_extensions import mypyc_attr\n"),
    ("workers/mm/effects.py", "\nclass Effect:", "\n@mypyc_attr(allow_interpreted_subclasses=True)\nclass Effect:"),
    # mypyc loses the exception being handled across a yield in an except block: a bare `raise` after
    # the cleanup's `yield from` raises None (a TypeError, then a segfault); name it
    ("workers/mm/fault.py", "            raise\n        return None\n", "            raise x\n        return None\n"),
    ("workers/mm/fault.py", "    except BaseException:\n            yield from put_uninstalled(mm, idx, pfns)\n            raise\n",
     "    except BaseException as _x:\n            yield from put_uninstalled(mm, idx, pfns)\n            raise _x\n"),
    ("workers/mm/fault.py", "    except BaseException:\n        yield from put_uninstalled(mm, idx, new)\n        raise\n",
     "    except BaseException as _x:\n        yield from put_uninstalled(mm, idx, new)\n        raise _x\n"),
    ("workers/mm/effects.py", "    except BaseException:\n        yield Unlock(ptl(mm))\n        raise\n",
     "    except BaseException as _x:\n        yield Unlock(ptl(mm))\n        raise _x\n"),
    # Backend: instances replace `fallback` (read-only on a native class), Driver subclasses it (a
    # non-native class in a compiled module rejects its subclass's super().__init__): it stays interpreted
    ("workers/runtime/interp.py", "def run_until_blocked(gen, backend: Backend,", "def run_until_blocked(gen, backend,"),
    ("workers/runtime/interp.py", "def run_sync(gen, backend: Backend):", "def run_sync(gen, backend):"),
]


def _edit(tree: str) -> None:
    for rel, old, new in TRIAL_EDITS:
        p = os.path.join(tree, rel)
        with open(p) as f:
            s = f.read()
        if s.count(old) != 1:
            sys.exit(f"mypyc trial: {rel} changed since the trial was written: {old.strip()!r} found {s.count(old)} "
                     "times (update TRIAL_EDITS)")
        with open(p, "w") as f:
            f.write(s.replace(old, new))
    p = os.path.join(tree, "workers/runtime/interp.py")
    with open(p) as f:
        s = f.read()
    a, b = s.index(_BACKEND_START), s.index(_BACKEND_END)
    with open(os.path.join(tree, "workers/runtime/interp_backend.py"), "w") as f:
        f.write('"""Backend and BLOCK, kept interpreted (the mypyc trial)."""\nfrom __future__ import annotations\n\n'
                "import functools\n\nfrom workers.mm.effects import APPLY_MEM\n\n\n" + s[a:b])
    with open(p, "w") as f:
        f.write(s[:a] + "from workers.runtime.interp_backend import BLOCK, Backend  # noqa: F401\n\n\n" + s[b:])


def copy_and_edit(tree: str) -> None:
    """The sources copied to `tree` and edited as mypyc needs them (still plain Python)."""
    for d in ("proto", "workers", "bench"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(tree, d),
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "results"))
    _edit(tree)


def build(tree: str) -> None:
    copy_and_edit(tree)
    with open(os.path.join(tree, "setup_mypyc.py"), "w") as f:
        f.write(_SETUP % (MODULES,))
    r = subprocess.run([sys.executable, "setup_mypyc.py", "build_ext", "--inplace"], cwd=tree, capture_output=True,
                       text=True, timeout=900)
    if r.returncode:
        sys.exit(f"mypyc trial: the build failed:\n{(r.stdout + r.stderr)[-3000:]}")


_ROUND = """import json, statistics, sys
import workers.mm.fault as f
from bench.run import cow_core_samples, cow_samples
n, e2e = int(sys.argv[1]), sys.argv[2] == "1"
ts = cow_core_samples(n)
out = {"compiled": f.__file__.endswith(".so"), "core_p50_us": statistics.median(ts), "core_mean_us": statistics.fmean(ts)}
if e2e:
    h = []
    c = cow_samples("change_pte", n, h)
    out.update(cow_p50_us=statistics.median(c), handler_mean_us=h[0])
print(json.dumps(out))
"""


def measure(trees: dict, rounds: int, pages: int, e2e: bool) -> dict:
    res: dict = {k: [] for k in trees}
    names = list(trees)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            env = dict(os.environ, PYTHONPATH=trees[k])
            p = subprocess.run([sys.executable, "-c", _ROUND, str(pages), "1" if e2e else "0"], cwd=trees[k], env=env,
                               capture_output=True, text=True, timeout=600)
            if p.returncode:
                sys.exit(f"mypyc trial: a {k} round failed:\n{p.stderr[-3000:]}")
            d = json.loads(p.stdout.strip().splitlines()[-1])
            if d.pop("compiled") != (k == "compiled"):
                sys.exit(f"mypyc trial: the {k} round did not run the {k} modules")
            res[k].append(d)
            print(f"round {r + 1}: {k:8s} " + "  ".join(f"{m} {v:.1f}" for m, v in d.items()), flush=True)
    out: dict = {"rounds": rounds, "pages": pages}
    for k, v in res.items():
        out[k] = {m: {"median": round(statistics.median(x[m] for x in v), 2),
                      "min": round(min(x[m] for x in v), 2), "max": round(max(x[m] for x in v), 2)} for m in v[0]}
    if rounds:
        out["compiled_over_pure"] = {m: round(out["compiled"][m]["median"] / out["pure"][m]["median"], 3)
                                     for m in out["pure"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds of each variant (default 6)")
    ap.add_argument("--pages", type=int, default=2048, help="COW faults per round (default 2048)")
    ap.add_argument("--e2e", action="store_true", help="also the VM's COW fault and the fault handler's mean")
    ap.add_argument("--keep", metavar="DIR", help="build the compiled copy in DIR (new or empty) and keep it")
    ap.add_argument("--tests", nargs="*", default=[], help="test files to run against the compiled copy")
    ap.add_argument("--out", help="write the figures here as JSON")
    a = ap.parse_args(argv)
    try:
        import mypyc  # noqa: F401
    except ImportError:
        print("mypyc trial: mypyc is not installed (.venv/bin/pip install mypy)", file=sys.stderr)
        return 2
    if a.keep and os.path.exists(a.keep) and os.listdir(a.keep):
        print(f"mypyc trial: --keep {a.keep} is not empty", file=sys.stderr)
        return 2
    tree = a.keep or tempfile.mkdtemp(prefix="ksmp-mypyc-")
    os.makedirs(tree, exist_ok=True)
    try:
        build(tree)
        rc = 0
        if a.tests:
            shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(tree, "tests"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(os.path.join(ROOT, "pyproject.toml"), tree)
            rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *a.tests], cwd=tree,
                                env=dict(os.environ, PYTHONPATH=tree), timeout=3600).returncode
        if a.rounds:
            out = measure({"pure": ROOT, "compiled": tree}, a.rounds, a.pages, a.e2e)
            print(json.dumps(out, indent=1))
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(out, f, indent=1)
        return rc
    finally:
        if not a.keep:
            shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
