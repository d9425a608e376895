"""Plant realistic bugs one at a time and check that the test suite catches each of them.

    .venv/bin/python tests/tools/mutate.py                 # every mutation (see bench/results/mutation.md)
    .venv/bin/python tests/tools/mutate.py --only resume   # the mutations whose name contains "resume"
    .venv/bin/python tests/tools/mutate.py --list
    .venv/bin/python tests/tools/mutate.py --files protege/data.py,protege/prune.py   # a partial run

Each mutation is a bug a careless refactor would make: one exact text replacement in one source
file (the original text must occur exactly once, or the mutation is reported STALE: update it after
a refactor), and the tests that should catch it. For each mutation the working tree is copied to a
scratch folder, the bug is planted there, and pytest runs the named tests against the copy
(PYTHONPATH points at it). The outcome is read from pytest's exit status, nothing else:
  CAUGHT   exit 1: a test ran and failed with the bug in place
  MISSED   exit 0: every test passed with the bug in place
  NO-TESTS exit 5: no test was collected (a stale -k filter or path): measures nothing
  ERROR    exit 2/3/4 or any other: collection or usage error (e.g. the bug breaks an import)
  TIMEOUT  the run outlived --timeout (a hang is not a failing assertion)
  STALE    the original text is not in the file (update the mutation after a refactor)
  UNMEASURED  its tests fail without any bug (e.g. tests/test_vllm.py without vllm): not run
Only CAUGHT counts. First each distinct pytest argument list (files and -k filters exactly as the
mutations give them) runs once without any bug: it must pass, or its mutations are UNMEASURED. The score and
the table go to bench/results/mutation.md (--out). Exit status 1 unless every mutation is CAUGHT.
The list is in tests/tools/mutations.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS  # noqa: E402

IGNORE = shutil.ignore_patterns(".git", ".venv", ".venv-vllm", "outputs", "__pycache__", "*.egg-info",
                                ".pytest_cache", "runs")


def plant(root: Path, mutation: dict) -> str | None:
    """Apply the mutation under root; None on success, else why it is stale."""
    path = root / mutation["file"]
    text = path.read_text()
    count = text.count(mutation["old"])
    if count != 1:
        return f"the original text occurs {count} times in {mutation['file']}"
    path.write_text(text.replace(mutation["old"], mutation["new"], 1))
    return None


OUTCOMES = {0: "MISSED", 1: "CAUGHT", 5: "NO-TESTS"}


def outcome(rc: int | None) -> str:
    """pytest's exit status -> the mutation's outcome; only 1 (a test failed) is CAUGHT."""
    if rc is None:
        return "TIMEOUT"
    return OUTCOMES.get(rc, "ERROR")


WORKERS = "0"  # pytest-xdist workers per run (--workers); 0 = in the pytest process


def run_tests(root: Path, tests: list[str], timeout: float) -> tuple[int | None, float, str]:
    """pytest on `tests` inside the tree `root` (its protege package first on the path); rc None = timeout."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PROTEGE_NO_SKIP": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-n", WORKERS, "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.time() - t0, "timed out (the bug hangs the tests)"
    lines = proc.stdout.strip().splitlines() or [""]
    first = next((ln for ln in lines if ln.startswith(("FAILED", "ERROR"))), lines[-1])
    return proc.returncode, time.time() - t0, first[:160]


def copy_tree(tmp: str) -> Path:
    root = Path(tmp) / "tree"
    shutil.copytree(REPO, root, ignore=IGNORE)
    return root


def run_one(mutation: dict, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix="protege-mut-") as tmp:
        root = copy_tree(tmp)
        stale = plant(root, mutation)
        if stale:
            return "STALE", 0.0, stale
        rc, seconds, detail = run_tests(root, mutation["tests"], timeout)
        return outcome(rc), seconds, detail


def baseline(selections: list[tuple[str, ...]], timeout: float) -> set[tuple[str, ...]]:
    """Each selection the mutations run must pass on the unmutated tree, else a 'caught' bug means nothing:
    the selections that do not pass (e.g. tests/test_vllm.py where vllm is not installed), whose mutations
    are then reported UNMEASURED instead of run."""
    failing = set()
    with tempfile.TemporaryDirectory(prefix="protege-mut-") as tmp:
        root = copy_tree(tmp)
        for tests in selections:
            rc, seconds, detail = run_tests(root, list(tests), timeout)
            print(f"baseline {' '.join(tests)}: {'pass' if rc == 0 else outcome(rc)} in {seconds:.0f} s  {detail}",
                  flush=True)
            if rc != 0:
                print(f"  `pytest {' '.join(tests)}` does not pass without any planted bug: its mutations are "
                      "UNMEASURED (fix the tests first)", flush=True)
                failing.add(tests)
    return failing


def commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "protege", "tests"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return proc.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def report(rows: list, args, minutes: float, total: int) -> list[str]:
    """The markdown of bench/results/mutation.md."""
    counts = {k: sum(s == k for _, s, _, _ in rows) for k in ("CAUGHT", "MISSED", "NO-TESTS", "ERROR", "TIMEOUT",
                                                                "STALE", "UNMEASURED")}
    scope = ("full run: every mutation" if len(rows) == total else
             f"PARTIAL run: {len(rows)} of the {total} mutations (the rest were not run)")
    lines = ["# Mutation score: planted bugs the tests catch", "",
             f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", f"- commit: {commit()}",
             f"- command: `python tests/tools/mutate.py {' '.join(sys.argv[1:])}` (total {minutes:.1f} min)",
             f"- scope: {scope}",
             f"- score: {counts['CAUGHT']} of {len(rows)} planted bugs caught (a test failed, pytest exit 1); "
             + ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "CAUGHT"), "",
             "| mutation | file | the bug | tests run | result | s |", "|---|---|---|---|---|---:|"]
    lines += [f"| {m['name']} | {m['file']} | {m['why']} | {' '.join(m['tests'])} | {s} | {sec:.0f} |"
              for m, s, sec, _ in rows]
    return lines


def choose(args) -> list[dict]:
    files = [f for f in args.files.split(",") if f]
    names = args.only.split(",")
    return [m for m in MUTATIONS if any(n in m["name"] for n in names) and (not files or m["file"] in files)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the mutations whose name contains this text (or one of several, comma-separated)")
    ap.add_argument("--files", default="", help="comma-separated source files: run only their mutations")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs of the chosen selections")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's test run")
    ap.add_argument("--workers", default="0", help="pytest -n for each run (0: no xdist workers)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mutation.md"))
    args = ap.parse_args()
    global WORKERS
    WORKERS = args.workers
    chosen = choose(args)
    if args.list:
        for m in chosen:
            print(f"{m['name']:40s} {m['file']}: {m['why']}")
        return 0
    rows, t0 = [], time.time()
    failing = set() if args.no_baseline else baseline(sorted({tuple(m["tests"]) for m in chosen}), args.timeout * 2)
    for m in chosen:
        unmeasured = tuple(m["tests"]) in failing
        status, seconds, detail = ("UNMEASURED", 0.0, "its tests fail unmutated") if unmeasured else \
            run_one(m, args.timeout)
        rows.append((m, status, seconds, detail))
        print(f"{status:8s} {m['name']:40s} {seconds:6.1f} s  {detail}", flush=True)
    caught = sum(s == "CAUGHT" for _, s, _, _ in rows)
    print(f"{caught} of {len(rows)} planted bugs caught")
    Path(args.out).write_text("\n".join(report(rows, args, (time.time() - t0) / 60, len(MUTATIONS))) + "\n")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
