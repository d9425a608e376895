"""Multi-stage recipes: stage overrides, the student handed from stage to stage, the CLI path."""

from __future__ import annotations

import logging

import pytest
import yaml

from protege.cli import main
from protege.recipe import load_recipe, run_recipe


def _recipe(tmp_path, tiny_paths):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "student": {"path": tiny_paths["student"]}, "teacher": {"path": tiny_paths["teacher"]},
        "data": {"path": tiny_paths["data"], "eval_prompts": 0},
        "rollout": {"max_new_tokens": 6}, "train": {"prompts_per_step": 4, "micro_batch_size": 4, "num_threads": 1},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
        "stages": [{"name": "cold_start", "mix": {"lmbda": 0.0, "seq_kd": True}, "loss": {"name": "forward_kl"},
                    "train": {"max_steps": 2}},
                   {"name": "on_policy", "loss": {"name": "reverse_kl"}, "train": {"max_steps": 3}}]}))
    return path


def test_stage_overrides_and_dirs(tmp_path, tiny_paths):
    stages = load_recipe(_recipe(tmp_path, tiny_paths), ["--stages.on_policy.train.max_steps", "5",
                                                         "optim.lr=0.01"])
    (n0, c0), (n1, c1) = stages
    assert (n0, n1) == ("cold_start", "on_policy")
    assert c0.mix.seq_kd and c0.loss.name == "forward_kl" and c0.train.max_steps == 2
    assert c1.train.max_steps == 5 and c1.mix.lmbda == 1.0
    assert c0.optim.lr == c1.optim.lr == 0.01
    assert c0.output.dir.endswith("run/cold_start") and c1.output.dir.endswith("run/on_policy")
    with pytest.raises(ValueError, match="no stage named 'nope'"):
        load_recipe(_recipe(tmp_path, tiny_paths), ["stages.nope.train.max_steps=1"])
    with pytest.raises(ValueError, match="(?s)stage 'on_policy'.*loss.beta"):
        load_recipe(_recipe(tmp_path, tiny_paths), ["stages.on_policy.loss.beta=3"])


def test_student_flows_between_stages(tmp_path, tiny_paths):
    seen = []
    histories = run_recipe(load_recipe(_recipe(tmp_path, tiny_paths)),
                           on_stage_end=lambda name, d: seen.append((name, d.student)))
    assert [len([h for h in v if "loss" in h]) for v in histories.values()] == [2, 3]
    assert seen[0][1] is seen[1][1]  # the same model object went on training
    assert (tmp_path / "run" / "on_policy" / "student" / "config.json").exists()


def test_cli_runs_a_recipe(tmp_path, tiny_paths, capsys):
    assert main(["train", str(_recipe(tmp_path, tiny_paths)), "--stages.on_policy.train.max_steps", "1"]) == 0
    assert "student saved to" in capsys.readouterr().out


def test_stage_log_counts_the_steps_of_train_epochs(tmp_path, tiny_paths, caplog):
    """With train.epochs set, the stage line gives the steps the stage trains, not train.max_steps."""
    stages = load_recipe(_recipe(tmp_path, tiny_paths), ["stages.on_policy.train.epochs=0.5"])
    with caplog.at_level(logging.INFO, logger="protege"):
        histories = run_recipe(stages)
    trained = len([h for h in histories["on_policy"] if "loss" in h])
    assert trained != 3  # the stage's train.max_steps is not what epochs gives here
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage on_policy:")]
    assert said == [f"stage on_policy: reverse_kl, {trained} steps"]
