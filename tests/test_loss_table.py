"""One loss table: no loss or support name is compared as a string outside protege/loss_names.py, the Objective
and the losses themselves (issue 28 point 3); the table's properties agree with the names they stand for."""

from __future__ import annotations

import re
from pathlib import Path

from protege.loss_names import LossName, Support

ROOT = Path(__file__).resolve().parents[1] / "protege"
OWNERS = {"loss_names.py", "objective.py"}  # the table and the Objective
NAMES = "|".join(sorted({*LossName, *Support}, key=len, reverse=True))
QUOTED = rf"""["'](?:{NAMES})["']"""
# a loss/support value compared with a quoted name: x == "sft", x != "full", x in ("teacher", "union"), ...
COMPARED = re.compile(rf"""(?:loss_name|\bname|support)\s*(?:==|!=|\bis\b|\bin\b|\bnot in\b)\s*\(?\s*{QUOTED}"""
                      rf"""|{QUOTED}\s*(?:==|!=)\s*\S*(?:loss_name|name|support)\b""")


def offending_lines(root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "losses" or rel.name in OWNERS:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if COMPARED.search(code):
                out.append(f"protege/{rel}:{i}: {line.strip()}")
    return out


def test_no_loss_or_support_name_is_compared_as_a_string_outside_the_table():
    assert offending_lines() == []


def test_the_grep_finds_a_planted_comparison(tmp_path):
    (tmp_path / "planted.py").write_text('if cfg.loss.name not in ("sampled_pg", "sft"):\n    pass\n'
                                         'ok = cfg.loss.support == "full"\nsame = s == "student"\n')
    assert [x.split(":")[1] for x in offending_lines(tmp_path)] == ["1", "3"]


def test_the_table_properties():
    assert {n for n in LossName if n.token_level} == {LossName.SAMPLED_PG, LossName.SFT}
    assert [n for n in LossName if not n.reads_logprobs] == [LossName.SFT]
    assert {s.value for s in Support if s.topk} == {"teacher", "student", "union"}
    assert {s.value for s in Support if s.reads_student_ids} == {"student", "union"}
    assert {s.value for s in Support if s.reads_teacher_topk} == {"teacher", "union"}
