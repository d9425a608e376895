"""tests/tools/mutate.py reads pytest's exit status honestly: only a failing test is CAUGHT; no test
collected, a collection error and a hang are reported apart (real pytest runs in a scratch tree)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
import mutate  # noqa: E402

TESTS = """
import time

def test_fails():
    assert 1 + 1 == 3

def test_passes():
    assert True

def test_hangs():
    time.sleep(60)
"""


@pytest.mark.parametrize("args, want", [
    (["test_t.py", "-k", "fails"], "CAUGHT"),
    (["test_t.py", "-k", "passes"], "MISSED"),
    (["test_t.py", "-k", "no_such_test"], "NO-TESTS"),  # a stale -k filter: exit 5, measures nothing
    (["test_broken.py"], "ERROR"),  # a collection error: exit 2, not a failing assertion
    (["test_t.py", "-k", "hangs"], "TIMEOUT"),
])
def test_outcome_of_each_exit(tmp_path, args, want):
    (tmp_path / "test_t.py").write_text(TESTS)
    (tmp_path / "test_broken.py").write_text("import no_such_module_here\n")
    rc, _, _ = mutate.run_tests(tmp_path, args, timeout=8)
    assert mutate.outcome(rc) == want, rc


def test_baseline_runs_each_mutations_exact_selection(monkeypatch):
    """The baseline runs every distinct argument list, -k filters included, not just the files."""
    ran = []
    monkeypatch.setattr(mutate, "run_tests", lambda root, tests, timeout: ran.append(tests) or (0, 0.0, ""))
    monkeypatch.setattr(mutate, "copy_tree", lambda tmp: Path(tmp))
    chosen = [m for m in mutate.MUTATIONS if m["name"] in ("resume-rng-rank0-file", "resume-scheduler-forgotten")]
    mutate.baseline(sorted({tuple(m["tests"]) for m in chosen}), 1.0)
    assert sorted(ran) == [["tests/test_resume.py"], ["tests/test_resume.py", "-k", "two_processes"]]
    monkeypatch.setattr(mutate, "run_tests", lambda root, tests, timeout: (5 if "gone" in tests else 0, 0.0, ""))
    selections = [("tests/test_resume.py", "-k", "gone"), ("tests/test_resume.py",)]
    assert mutate.baseline(selections, 1.0) == {selections[0]}  # its mutations: UNMEASURED, never CAUGHT


def test_every_mutation_still_finds_its_text():
    """A refactor that moves a line a mutation names makes it STALE: it would measure nothing. Each mutation's
    original text occurs exactly once in its file, and the tests it names exist."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests" / "tools"))
    from mutations import MUTATIONS

    stale = [f"{mu['name']}: {mu['file']} holds its text {(root / mu['file']).read_text().count(mu['old'])} times"
             for mu in MUTATIONS if (root / mu["file"]).read_text().count(mu["old"]) != 1]
    missing = [f"{mu['name']}: {t}" for mu in MUTATIONS for t in mu["tests"]
               if t.startswith("tests/") and not (root / t.split("::")[0]).exists()]
    assert not stale and not missing, "\n".join(stale + missing)
