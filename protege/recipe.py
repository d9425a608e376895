"""Multi-stage recipes: one base config and a list of stages that override it, run in order.

The student trained by a stage is the student of the next (kept in memory, also saved by each
stage under output.dir/<stage name>/student); the teacher is loaded once. Seed 003's off-policy
cold start is such a recipe:

    # recipe.yaml
    student: {path: student/}
    teacher: {path: teacher/}
    output: {dir: outputs/coldstart}
    stages:
      - name: cold_start          # supervised KD on teacher samples
        mix: {lmbda: 0.0, seq_kd: true}
        loss: {name: forward_kl}
        train: {max_steps: 10}
      - name: on_policy
        mix: {lmbda: 1.0}
        loss: {name: reverse_kl}
        train: {max_steps: 40}

    protege train recipe.yaml --stages.on_policy.train.max_steps 80

Resume (`--resume true`) applies to every stage, each from its own output.dir/<stage name>/checkpoints:
a finished stage loads its final checkpoint and is not trained or evaluated again (its student goes on
to the next stage), the interrupted stage continues from its newest checkpoint (or from step 0 with
the previous stage's student when it had none yet), and the stages after it run as usual.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from protege.config import (Config, ConfigError, load_config, merge_dicts, parse_overrides, read_yaml,
                            set_dotted)

log = logging.getLogger("protege")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> list[tuple[str, Config]]:
    """[(stage name, Config)] from a YAML with a `stages` list (or one unnamed stage without it).

    Overrides `stages.<name>.<section>.<key>=v` reach one stage; others reach every stage."""
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        merge_dicts(data, read_yaml(path))
    stages = data.pop("stages", None)
    pairs = parse_overrides(overrides or [])
    common = [(k, v) for k, v in pairs if not k.startswith("stages.")]
    if not stages:
        for k, v in common:
            set_dotted(data, k, v)
        return [("main", load_config(None, base=data))]
    if not isinstance(stages, list) or not all(isinstance(s, dict) and s.get("name") for s in stages):
        raise ConfigError("stages: expected a list of mappings, each with a name")
    names = [s["name"] for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages: names must be unique, got {names}")
    per_stage: dict[str, dict] = {n: {} for n in names}
    for k, v in pairs:
        if k.startswith("stages."):
            _, name, rest = k.split(".", 2)
            if name not in per_stage:
                raise ConfigError(f"override {k}: no stage named {name!r} (stages: {', '.join(names)})")
            set_dotted(per_stage[name], rest, v)
    out = []
    out_dir = Path(dict(common).get("output.dir") or data.get("output", {}).get("dir", "outputs/run"))
    for stage in stages:
        merged = copy.deepcopy(data)
        body = {k: v for k, v in stage.items() if k != "name"}
        merge_dicts(merged, body)
        for k, v in common:
            set_dotted(merged, k, v)
        merge_dicts(merged, per_stage[stage["name"]])
        merged.setdefault("output", {})["dir"] = str(out_dir / stage["name"])
        try:
            out.append((stage["name"], load_config(None, base=merged)))
        except ConfigError as e:
            raise ConfigError(f"stage {stage['name']!r}: {e}") from None
    return out


def run_recipe(stages: list[tuple[str, Config]], *, student=None, teacher_model=None, tokenizer=None,
               on_stage_end=None) -> dict[str, list[dict]]:
    """Run the stages in order, handing the trained student from one to the next."""
    from protege.trainer import Distiller

    histories: dict[str, list[dict]] = {}
    for name, cfg in stages:
        d = Distiller(cfg, student=student, teacher_model=teacher_model, tokenizer=tokenizer)
        log.info("stage %s: %s, %d steps", name, d.objective.name, d.max_steps)  # train.epochs: its step count
        histories[name] = d.train()
        student = d.student
        teacher_model = d.teacher_model if d.teacher_model is not None else teacher_model
        tokenizer = d.tok
        if on_stage_end is not None:
            on_stage_end(name, d)
    return histories
