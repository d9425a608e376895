"""Pinned behaviour of the whole step: three optimizer steps per loss support and data mix, with the
per-step losses equal to values recorded from the code before a refactor (tests/pinned_losses.json).

A refactor of the loop, the objective, the engines or the teachers must leave these numbers alone;
a change that is meant to alter them (a bug fix) re-records them on purpose, and says so in its commit:

    PROTEGE_RECORD_PINNED=1 .venv/bin/python -m pytest tests/test_pinned.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from protege.config import load_config
from protege.trainer import train

PINNED = Path(__file__).with_name("pinned_losses.json")
CASES = {
    "full": ["loss.support=full"],
    "teacher": ["loss.support=teacher", "loss.top_k=4"],
    "student": ["loss.support=student", "loss.top_k=4"],
    "union": ["loss.support=union", "loss.top_k=4"],
    "sampled": ["loss.support=sampled"],
    "jsd_full": ["loss.name=jsd", "loss.beta=0.5"],
    "lmbda0": ["mix.lmbda=0"],
    "lmbda0.5": ["mix.lmbda=0.5"],
    "seq_kd": ["mix.lmbda=0", "mix.seq_kd=true", "loss.name=forward_kl"],
    "sampled_pg": ["loss.name=sampled_pg"],
    "auto_engine": ["rollout.engine=auto"],  # the default engine (lean in one process), recorded when it became so
}


def _losses(paths, out, extra) -> list[float]:
    cfg = load_config(None, [f"student.path={paths['student']}", f"teacher.path={paths['teacher']}",
                             f"data.path={paths['data']}", "rollout.max_new_tokens=6", "train.prompts_per_step=4",
                             "train.micro_batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=1",
                             "optim.schedule=cosine", f"output.dir={out}", "output.progress=false",
                             "train.num_threads=1", "data.eval_prompts=0", "train.max_steps=3",
                             "rollout.engine=hf", *extra])  # recorded with HF generate, the default until auto
    return [h["loss"] for h in train(cfg) if "loss" in h]


@pytest.mark.parametrize("case", sorted(CASES))
def test_pinned_losses(tiny_paths, tmp_path, case):
    got = _losses(tiny_paths, tmp_path, CASES[case])
    assert len(got) == 3
    if os.environ.get("PROTEGE_RECORD_PINNED") == "1":
        table = json.loads(PINNED.read_text()) if PINNED.exists() else {}
        table[case] = got
        PINNED.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(PINNED.read_text())[case]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7), case
