"""Resuming with another teacher is refused, naming each difference (field: old -> new), unless
resume_new_teacher=true, which continues and logs the differences (issue 32 point 4)."""

from __future__ import annotations

import json
import logging

import pytest

from protege.errors import ResumeMismatch
from protege.config import load_config
from protege.trainer import Distiller


def _args(paths, out, *extra) -> list[str]:
    return [f"student.path={paths['student']}", f"data.path={paths['data']}", "rollout.max_new_tokens=6",
            "train.prompts_per_step=2", "train.micro_batch_size=2", f"output.dir={out}", "output.progress=false",
            "train.num_threads=1", "data.eval_prompts=0", *extra]


def _trained_then_resumed(paths, out, first: list[str], second: list[str]) -> Distiller:
    """A 2-step run with teacher settings `first`, then a Distiller resuming it to step 3 with `second`."""
    Distiller(load_config(None, _args(paths, out, "train.max_steps=2", *first))).train()
    return Distiller(load_config(None, _args(paths, out, "train.max_steps=3", "resume=true", *second)))


@pytest.mark.parametrize("first, second, named", [
    (["teacher.path={teacher}"], ["teacher.path={student}"], "source: '{teacher}' -> '{student}'"),
    (["teacher.path={teacher}"], ["teacher.path={teacher}", "teacher.system_prompt=Be brief."],
     "system_prompt: '(none)' -> 'Be brief.'"),
    (["teacher.self=ema", "teacher.ema_rate=0.05"], ["teacher.self=ema", "teacher.ema_rate=0.1"],
     "ema_rate: 0.05 -> 0.1"),
    (["teachers_mode=mixture", 'teachers=[{{"name": "a", "path": "{teacher}"}}, {{"name": "b", "path": "{student}"}}]'],
     ["teachers_mode=mixture", 'teachers=[{{"name": "b", "path": "{student}"}}, {{"name": "a", "path": "{teacher}"}}]'],
     "teachers[0].name: 'a' -> 'b'"),
], ids=["other-path", "system-prompt", "ema-rate", "reordered-teachers"])
def test_resume_with_another_teacher_is_refused_naming_the_change(tiny_paths, tmp_path, first, second, named):
    fill = {k: str(v) for k, v in tiny_paths.items()}
    d = _trained_then_resumed(tiny_paths, tmp_path, [a.format(**fill) for a in first],
                              [a.format(**fill) for a in second])
    with pytest.raises(ResumeMismatch, match="resume_new_teacher=true") as err:
        d.train()
    assert named.format(**fill) in str(err.value)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert d.state.step == 0 and steps == [1, 2]  # nothing restored, trained or logged


def test_resume_new_teacher_continues_on_purpose_and_logs_it(tiny_paths, tmp_path, caplog):
    d = _trained_then_resumed(tiny_paths, tmp_path, [f"teacher.path={tiny_paths['teacher']}"],
                              [f"teacher.path={tiny_paths['teacher']}", "teacher.system_prompt=Be brief.",
                               "resume_new_teacher=true"])
    with caplog.at_level(logging.WARNING, logger="protege"):
        d.train()
    assert d.state.step == 3
    assert any("resume_new_teacher=true" in r.message and "system_prompt: '(none)' -> 'Be brief.'" in r.message
               for r in caplog.records)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert steps == [1, 2, 3]


def test_same_teacher_resumes_without_a_word(tiny_paths, tmp_path, caplog):
    d = _trained_then_resumed(tiny_paths, tmp_path, [f"teacher.path={tiny_paths['teacher']}"],
                              [f"teacher.path={tiny_paths['teacher']}"])
    with caplog.at_level(logging.WARNING, logger="protege"):
        d.train()
    assert d.state.step == 3 and not any("teacher" in r.message for r in caplog.records if "resume" in r.message)
