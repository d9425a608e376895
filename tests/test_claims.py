"""Every measured number the README (and the docs pages that took its measured sections) states is in the
results file it cites.

A paragraph or list item that cites a results file (`results/NAME.md`, i.e.
bench/results/NAME.md, or docs/demo/report.md) or the test file that shows a fact
(tests/test_NAME.py) may only state numbers that the cited files contain,
at the README's precision: 1.24x matches 1.24x or 1.2449; 69% matches 69% or 0.69 (a fraction);
4.45 GB matches 4453 (MB). A paragraph with measured numbers (x, %, s, GB) and no citation fails too.
Those files are written by committed scripts (each names its command), so a README figure is always
traceable to a script's output, and an edited or re-run result that drifts from the README fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITE = re.compile(r"(?:bench/)?results/([\w.-]+\.md)|docs/demo/report\.md|(tests/test_\w+\.py)")
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)")
MEASURED = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:x\b|%| s\b| GB\b| MB\b)")
# the pages checked, every section of each: the README and the pages its measured sections moved to
PAGES = ("README.md", "docs/demo.md", "docs/benchmarks.md", "docs/reliability.md", "docs/generation.md",
         "docs/training.md", "docs/teacher_kinds.md")


def _blocks(text: str) -> list[str]:
    """Paragraphs and list items of a page (code blocks and inline code removed)."""
    out, section, cur = [], None, []
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            section = line.strip()
        starts_item = line.startswith("- ")
        if (not line.strip() or starts_item or line.startswith("#")) and cur:
            out.append((section, " ".join(cur)))
            cur = []
        if line.strip() and not line.startswith("#"):
            cur.append(line.strip())
    return [re.sub(r"`[^`]*`", "", b) for s, b in out]


def _cited(block: str) -> list[Path]:
    out = []
    for m in CITE.finditer(block):
        if m.group(1):
            out.append(REPO / "bench" / "results" / m.group(1))
        elif m.group(2):
            out.append(REPO / m.group(2))
        else:
            out.append(REPO / "docs" / "demo" / "report.md")
    return out


def _found(value: str, numbers: list[float]) -> bool:
    d = len(value.split(".")[1]) if "." in value else 0
    v = float(value)
    for f in numbers:
        for scaled in (f, 100 * f, f / 1000):
            if abs(round(scaled, d) - v) < 1e-9:
                return True
    return False


def test_every_readme_measurement_is_in_a_cited_results_file():
    problems = []
    for block in [b for page in PAGES for b in _blocks((REPO / page).read_text())]:
        files = _cited(block)
        if not files:
            if MEASURED.search(block):
                problems.append(f"measured numbers but no results file cited: {block[:120]}...")
            continue
        missing_files = [f for f in files if not f.exists()]
        assert not missing_files, f"README cites missing files {missing_files}"
        numbers = [float(x) for f in files for x in NUMBER.findall(f.read_text())]
        for value in NUMBER.findall(block):
            if not _found(value, numbers):
                problems.append(f"{value} (in '{block[:80]}...') is not in {[f.name for f in files]}")
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_drifted_number(tmp_path):
    numbers = [float(x) for x in NUMBER.findall("| protege | 1.24x | 4453 | 0.764 |")]
    assert _found("1.24", numbers) and _found("4.45", numbers) and _found("76", numbers)
    assert not _found("1.25", numbers) and not _found("78", numbers)


def test_the_readme_is_a_three_minute_read():
    """The README opens with the two commands and fits on three screens (issue 28: about 150 lines); the
    rest lives in docs/, and every docs page it names exists."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 160, "README.md grew past 160 lines: move the detail into docs/"
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "bash setup.sh && .venv/bin/protege demo" in first_block
    assert "bash setup.sh && .venv/bin/python -m pytest" in first_block
    for page in set(re.findall(r"docs/[\w/]+\.md", text)):
        assert (REPO / page).exists(), f"README names {page}, which does not exist"
