"""A teacher kind defined outside protege/ (here), named in the config as teacher.kind=module:Class, trains end to
end: one class and one config entry, nothing else in protege to update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protege.config import load_config
from protege.teacher.base import Capabilities, Teacher
from protege.teacher.local import score_rows
from protege.trainer import Distiller

SCORED = []  # (rows, completion tokens) of every score call, for the test to read


class ToyTeacher(Teacher):
    """A teacher that builds its own tiny model (teacher.options: layers, seed) and scores with it."""

    def __init__(self, model, pad_id: int, seed: int):
        self.model, self.pad_id, self.seed = model.eval(), pad_id, seed
        self.output_weight = model.get_output_embeddings().weight.detach()  # (V, H)
        self.vocab_size = self.output_weight.shape[0]

    @classmethod
    def from_config(cls, cfg, *, teacher_model, pad_id, device, student, chunk_positions):
        from tiny import make_model

        opts = cfg.teacher.options
        return cls(make_model(int(opts["layers"]), int(opts["seed"])).to(device), pad_id, int(opts["seed"]))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(identity={"kind": "toy", "seed": self.seed})

    def score(self, rollouts, request):
        SCORED.append((len(rollouts), int(rollouts.completion_mask.sum())))
        return score_rows(self.model, rollouts.prompt_ids, rollouts.completion_ids, rollouts.completion_mask,
                          request, pad_id=self.pad_id)


def _cfg(paths, out, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"data.path={paths['data']}",
                              "teacher.kind=test_teacher_kind_plugin:ToyTeacher",
                              f"teacher.options={json.dumps({'layers': 1, 'seed': 7})}",
                              "rollout.max_new_tokens=6", "train.prompts_per_step=2", "train.micro_batch_size=2",
                              f"output.dir={out}", "output.progress=false", "train.num_threads=1",
                              "data.eval_prompts=0", "train.max_steps=2", *extra])


def test_a_teacher_kind_of_ones_own_trains_two_steps(tiny_paths, tmp_path):
    from tiny import make_model

    SCORED.clear()
    d = Distiller(_cfg(tiny_paths, tmp_path))
    assert isinstance(d.teacher, ToyTeacher) and d.objective.teacher_local  # in-process, by its capabilities
    history = d.train()
    steps = [m for m in history if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    assert [n for n, _ in SCORED] == [2, 2]  # one scoring pass per step over the buffer
    # the teacher's weights are the model the options name (seed 7, one layer), rebuilt independently here
    torch.testing.assert_close(d.teacher.output_weight, make_model(1, 7).get_output_embeddings().weight,
                               rtol=0, atol=0)
    state = torch.load(Path(tmp_path) / "checkpoints" / "step-0000002" / "trainer_state.pt", weights_only=True)
    assert state["teacher_identity"] == {"kind": "toy", "seed": 7}  # its identity, in the checkpoint


def test_a_teacher_kind_that_is_not_a_teacher_is_refused_naming_the_field(tiny_paths, tmp_path):
    cfg = _cfg(tiny_paths, tmp_path, "teacher.kind=json:JSONDecoder")
    with pytest.raises(ValueError, match="teacher.kind=json:JSONDecoder.*protege.teacher.base.Teacher"):
        Distiller(cfg)
    with pytest.raises(ValueError, match="teacher.kind=no_such_module_here:X: cannot import"):
        Distiller(_cfg(tiny_paths, tmp_path, "teacher.kind=no_such_module_here:X"))
