"""A new user's first hour, trainer side: the phase of a long step is shown, interval settings that would do
nothing warn once, and a fresh run never overwrites an earlier run's output.dir silently."""

from __future__ import annotations

import logging

import pytest

from protege.config import load_config
from protege.trainer import Distiller


def _cfg(paths, out, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
                              f"data.path={paths['data']}", "rollout.max_new_tokens=4", "train.prompts_per_step=2",
                              "train.micro_batch_size=2", f"output.dir={out}", "output.progress=false",
                              "train.num_threads=1", "data.eval_prompts=0", "train.max_steps=1", *extra])


def test_a_fresh_run_into_an_earlier_runs_dir_stops_unless_told(tiny_paths, tmp_path):
    Distiller(_cfg(tiny_paths, tmp_path)).train()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"output.dir=.* already holds an earlier run \(checkpoints, metrics.jsonl, "
                                         r"student\).*--resume true.*output.overwrite=true"):
        Distiller(_cfg(tiny_paths, tmp_path, "train.max_steps=2")).train()
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing overwritten
    history = Distiller(_cfg(tiny_paths, tmp_path, "train.max_steps=2", "output.overwrite=true")).train()
    assert [m["step"] for m in history if "loss" in m] == [1, 2]
    resumed = Distiller(_cfg(tiny_paths, tmp_path, "train.max_steps=3", "resume=true")).train()
    assert [m["step"] for m in resumed if "loss" in m] == [3]  # resume=true continues in it


def test_eval_every_without_heldout_prompts_warns_once(tiny_paths, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="protege"):
        Distiller(_cfg(tiny_paths, tmp_path, "output.eval_every=1", "output.probe_every=1",
                       "train.max_steps=2")).train()
    said = [r.message for r in caplog.records if "does nothing" in r.message]
    assert len(said) == 2 and "output.eval_every=1" in said[0] and "output.probe_every=1" in said[1]
    assert all("data.eval_fraction" in m for m in said)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="protege"):
        Distiller(_cfg(tiny_paths, tmp_path / "b", "output.eval_every=1", "data.eval_fraction=0.3",
                       "data.eval_prompts=2")).train()
    assert not [r for r in caplog.records if "does nothing" in r.message]  # with held-out prompts: no warning


def test_the_bar_names_the_phase_of_the_step(tiny_paths, tmp_path, capsys):
    Distiller(_cfg(tiny_paths, tmp_path, "output.progress=true")).train()
    err = capsys.readouterr().err
    shown = [p for p in ("generating", "teacher", "training") if f"distill [{p}]" in err]
    assert shown == ["generating", "teacher", "training"]
    assert err.index("distill [generating]") < err.index("distill [teacher]") < err.index("distill [training]")
