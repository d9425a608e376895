"""Every measured number in README.md and docs/*.md is bound to one value of one results file, and agrees
with it at the precision the page writes (bench/claims.py: the binding syntax and the check).

The results files are written by committed scripts (each names its command), so a page's figure is
always traceable to a script's output, and an edited or re-run result that drifts from the page fails
here. The drift test moves each bound number by one unit of its last digit, one at a time, and asserts
the check names that number.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import claims  # noqa: E402  (bench/claims.py)

PAGES = [p.relative_to(REPO).as_posix() for p in claims.pages()]


def _nudged(written: str) -> str:
    """`written` moved up by one unit of its last digit: 1.61 -> 1.62, 9 -> 10, -69 -> -68."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    value = round(float(written) + 10 ** -decimals, decimals)
    text = f"{abs(value):.{decimals}f}"
    return ("-" if value < 0 else "+" if written.startswith("+") else "") + text


def test_every_page_agrees_with_its_results():
    problems = [p for page in PAGES for p in claims.check_text(page, (REPO / page).read_text())]
    assert not problems, "\n".join(problems)


def test_every_readme_and_demo_figure_is_bound():
    """The pages a newcomer reads first carry bindings (a regression that strips them fails here)."""
    for page, at_least in (("README.md", 10), ("docs/demo.md", 20), ("docs/benchmarks.md", 60)):
        found, _ = claims.claims(page, (REPO / page).read_text())
        assert len(found) >= at_least, f"{page}: {len(found)} bound numbers, expected at least {at_least}"


def test_a_drift_of_one_unit_in_the_last_digit_fails_for_every_bound_number():
    caught, total, missed = 0, 0, []
    for page in PAGES:
        text = (REPO / page).read_text()
        for c in claims.claims(page, text)[0]:
            total += 1
            drifted = text[:c.start] + _nudged(c.written) + text[c.end:]
            if any(f"{page}:{c.line}:" in p for p in claims.check_text(page, drifted)):
                caught += 1
            else:
                missed.append(f"{page}:{c.line}: {c.written} -> {_nudged(c.written)}")
    print(f"drift caught: {caught} of {total}")
    assert total > 0 and not missed, f"{len(missed)} of {total} drifts pass the check:\n" + "\n".join(missed)


def test_the_check_reads_the_addressed_value_not_any_matching_number(tmp_path, monkeypatch):
    """A binding names one cell or key: the same number elsewhere in the file does not satisfy it, and
    a missing or ambiguous key is an error naming the file."""
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "t.md").write_text("| variant | tok/s | ratio |\n|---|---:|---:|\n| a | 17.5 | 1.61x |\n"
                                  "| b | 16.2 | 1.49x |\n| c one | 1.0 | 2.00x |\n| c two | 1.0 | 3.00x |\n\n- total 10.6 min, score 45 of 46\n")
    (results / "t.json").write_text(json.dumps({"run": {"wall_s": 111.2, "steps": [8, 9]}}))
    monkeypatch.setattr(claims, "REPO", tmp_path)
    ok = ("a at 1.61x<!-- {t.md | a | ratio} -->, 111.2 s<!-- {t.json | run.wall_s} -->, step 9<!-- {t.json | "
          "run.steps.1} -->, 46<!-- {t.md | after \"score\" | number 2} -->, -7%<!-- 100 * ({t.md | b | ratio} / "
          "{t.md | a | ratio} - 1) -->, 4 MB<!-- given: a setting -->")
    assert claims.check_text("p.md", ok) == []
    assert claims.check_text("p.md", ok.replace("1.61x", "1.49x"))       # 1.49 is in the file, not in that cell
    assert claims.check_text("p.md", ok.replace("-7%", "-8%"))
    for broken, says in (("{t.md | d | ratio}", "0 cells"), ("{t.json | run.wall}", "no key 'wall'"),
                         ("{u.md | a | ratio}", "no results file"), ("{t.md | after \"s\"}", "times, not once"),
                         ("{t.md | c | ratio}", "2 cells")):
        problems = claims.check_text("p.md", ok.replace("{t.md | a | ratio}", broken, 1))
        assert any(says in p for p in problems), (broken, problems)
    assert any("looks measured" in p for p in claims.check_text("p.md", ok + " and 3.2 GB more"))
    assert any("no number" in p for p in claims.check_text("p.md", "fast<!-- {t.md | a | ratio} -->"))
    row = "| a | 1.61x<!-- {t.md | a | ratio} --> |"   # a bare | inside a table row splits the table
    assert any("must write its | as" in p for p in claims.check_text("p.md", row))
    assert claims.check_text("p.md", row.replace(" | a | ratio", r" \| a \| ratio")) == []
    assert re.search(r"the page says 1.60", "\n".join(claims.check_text("p.md", ok.replace("1.61x", "1.60x"))))


def test_write_renders_each_bound_number_from_its_results(tmp_path, monkeypatch):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "t.json").write_text(json.dumps({"mb": 4453.0, "kl": [2.853, 0.8931]}))
    monkeypatch.setattr(claims, "REPO", tmp_path)
    page = ("4.4 GB<!-- {t.json | mb} / 1000 --> and 0.90<!-- {t.json | kl.1} --> (-60%<!-- 100 * ({t.json | kl.1}"
            " / {t.json | kl.0} - 1) -->)")
    # 4453 / 1000 = 4.453 -> 4.5; 0.8931 -> 0.89; 100 * (0.8931 / 2.853 - 1) = -68.7 -> -69
    want = page.replace("4.4 GB", "4.5 GB").replace("0.90<", "0.89<").replace("-60%", "-69%")
    assert claims.write_text("p.md", page) == want
    assert claims.check_text("p.md", want) == []


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
