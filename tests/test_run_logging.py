"""What a training run writes for people: health warnings in metrics.jsonl, tensorboard event files.

The warning is provoked on purpose: with rollout.max_new_tokens=1 every rollout of the tiny student
(which almost never starts with EOS) hits the cap, so HealthMonitor's truncation check
(truncation_rate > 0.5) fires at step 1, and only there (each kind warns once).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from protege.config import load_config
from protege.trainer import Distiller


def _cfg(paths, out, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
                              f"data.path={paths['data']}", "rollout.max_new_tokens=1", "train.prompts_per_step=4",
                              "train.micro_batch_size=2", f"output.dir={out}", "output.progress=false",
                              "train.num_threads=1", "data.eval_prompts=0", "train.max_steps=2", *extra])


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


def test_health_warning_reaches_metrics_jsonl(tiny_paths, tmp_path, caplog):
    d = Distiller(_cfg(tiny_paths, tmp_path))
    with caplog.at_level(logging.WARNING, logger="protege"):
        d.train()
    steps = [m for m in _lines(tmp_path) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert steps[0]["truncation_rate"] == 1.0
    warnings = steps[0].get("warnings", [])
    assert any("truncation_rate 1.00 is above 0.50" in w for w in warnings), steps[0]
    assert warnings == d.monitor.warnings, "metrics.jsonl must hold the monitor's warnings of that step"
    assert "warnings" not in steps[1], "a kind of warning is reported once"
    assert any("health: step 1: truncation_rate" in r.getMessage() for r in caplog.records)


def test_tensorboard_run_writes_event_files(tiny_paths, tmp_path):
    """Needs tensorboard (in the test extra): a missing install fails here rather than skipping."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Distiller(_cfg(tiny_paths, tmp_path, "output.report_to=tensorboard")).train()
    run = tmp_path / "protege"
    assert list(run.glob("events.out.tfevents.*")), f"no event file in {run}"
    events = EventAccumulator(str(run))
    events.Reload()
    logged = {m["step"]: m["loss"] for m in _lines(tmp_path) if "loss" in m}
    scalars = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(scalars) == [1, 2]
    assert scalars == pytest.approx(logged, rel=1e-6)
    assert {"lr", "tokens", "truncation_rate"} <= set(events.Tags()["scalars"])
