"""Plant realistic bugs one at a time and check that the test suite catches each of them.

    .venv/bin/python tests/tools/mutate.py                 # every mutation (~15 min on 2 cores)
    .venv/bin/python tests/tools/mutate.py --only resume   # the mutations whose name contains "resume"
    .venv/bin/python tests/tools/mutate.py --list

Each mutation is a bug a careless refactor would make: one exact text replacement in one source
file (the original text must occur exactly once, or the mutation is reported STALE: update it after
a refactor), and the tests that should catch it. For each mutation the working tree is copied to a
scratch folder, the bug is planted there, and pytest runs the named tests against the copy
(PYTHONPATH points at it). CAUGHT = pytest failed; MISSED = every test passed with the bug in place.
First the chosen test files run once without any bug: they must pass, or nothing is measured.
The score and the table go to bench/results/mutation.md. Exit status 1 if any mutation is missed
or stale. The list is in tests/tools/mutations.py.
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


def run_tests(root: Path, tests: list[str], timeout: float) -> tuple[int | None, float, str]:
    """pytest on `tests` inside the tree `root` (its protege package first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PROTEGE_NO_SKIP": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.time() - t0, "timed out (the bug hangs the tests)"
    lines = proc.stdout.strip().splitlines() or [""]
    first = next((ln for ln in lines if ln.startswith(("FAILED", "ERROR"))), lines[-1])
    return proc.returncode, time.time() - t0, first[:160]


def run_one(mutation: dict, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix="protege-mut-") as tmp:
        root = Path(tmp) / "tree"
        shutil.copytree(REPO, root, ignore=IGNORE)
        stale = plant(root, mutation)
        if stale:
            return "STALE", 0.0, stale
        rc, seconds, detail = run_tests(root, mutation["tests"], timeout)
        return ("MISSED" if rc == 0 else "CAUGHT"), seconds, detail


def baseline(tests: list[str], timeout: float) -> None:
    """The chosen tests must pass on the unmutated tree, else a 'caught' bug means nothing."""
    with tempfile.TemporaryDirectory(prefix="protege-mut-") as tmp:
        root = Path(tmp) / "tree"
        shutil.copytree(REPO, root, ignore=IGNORE)
        rc, seconds, detail = run_tests(root, tests, timeout)
    print(f"baseline (no bug planted): {'pass' if rc == 0 else 'FAIL'} in {seconds:.0f} s  {detail}", flush=True)
    if rc != 0:
        raise SystemExit("the tests fail without any planted bug: fix them first")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the chosen test files")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation's test run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mutation.md"))
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m["name"]]
    if args.list:
        for m in chosen:
            print(f"{m['name']:40s} {m['file']}: {m['why']}")
        return 0
    rows, t0 = [], time.time()
    files = sorted({t for m in chosen for t in m["tests"] if t.startswith("tests/")})
    if not args.no_baseline:
        baseline(files, args.timeout * 2)
    for m in chosen:
        status, seconds, detail = run_one(m, args.timeout)
        rows.append((m, status, seconds, detail))
        print(f"{status:6s} {m['name']:40s} {seconds:6.1f} s  {detail}", flush=True)
    caught = sum(s == "CAUGHT" for _, s, _, _ in rows)
    score = f"{caught} of {len(rows)} planted bugs caught"
    print(score)
    if not args.only:
        lines = ["# Mutation score: planted bugs the tests catch", "",
                 f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S')}",
                 f"- command: `python tests/tools/mutate.py` (total {(time.time() - t0) / 60:.1f} min)",
                 f"- score: {score}", "",
                 "| mutation | file | the bug | tests run | result | s |", "|---|---|---|---|---|---:|"]
        lines += [f"| {m['name']} | {m['file']} | {m['why']} | {' '.join(m['tests'])} | {s} | {sec:.0f} |"
                  for m, s, sec, _ in rows]
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
