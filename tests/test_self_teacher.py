"""The student as its own teacher (teacher.self = base | ema | live), checked against references written here.

- base + LoRA holds no second copy of any weight: every tensor reachable from the teacher shares its
  storage with the student (the same walk finds a full copy for base without LoRA, so it can fail),
  and it scores exactly as the untouched starting model, before and after training;
- ema follows theta_T <- (1 - r) theta_T + r theta_S, recomputed here step by step from the student's
  weights, and scores with those weights (a model loaded with them, one plain forward), leaving the
  student's own weights untouched; a run interrupted after a checkpoint and resumed ends bitwise equal
  to the uninterrupted one (the EMA is in the checkpoint);
- live scores with the current weights (plain forward of the trained student), in eval mode, and leaves
  the student's train mode and gradients alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from protege.config import load_config
from protege.teacher.base import ScoreRequest
from protege.teacher.local import LocalTeacher
from protege.teacher.self_teacher import SelfTeacher
from protege.trainer import Distiller


def _cfg(paths, out, *extra):
    return load_config(None, [f"student.path={paths['student']}", f"data.path={paths['data']}",
                              "rollout.max_new_tokens=6", "train.prompts_per_step=4", "train.micro_batch_size=2",
                              "optim.lr=3e-2", f"output.dir={out}", "output.progress=false", "train.num_threads=1",
                              "data.eval_prompts=0", "output.keep_last=10", *extra])


@torch.no_grad()
def _reference_logprobs(model: nn.Module, buffer) -> torch.Tensor:
    """(N, T) log p(y_t) from one unpadded forward per row of `model` in eval mode (0 past each row's end)."""
    was = model.training
    model.eval()
    out = torch.zeros(buffer.completion_ids.shape)
    for i, prompt in enumerate(buffer.prompt_ids):
        n = int(buffer.completion_mask[i].sum())
        tokens = buffer.completion_ids[i, :n]
        logits = model(input_ids=torch.cat([prompt, tokens])[None]).logits[0, len(prompt) - 1: len(prompt) - 1 + n]
        out[i, :n] = torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, None])[:, 0].float()
    model.train(was)
    return out


def _storages(obj, seen: set[int] | None = None) -> dict[int, int]:
    """{storage address: bytes} of every tensor reachable from `obj` (its attributes, containers, modules)."""
    seen = set() if seen is None else seen
    out: dict[int, int] = {}
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        s = obj.untyped_storage()
        return {s.data_ptr(): s.nbytes()}
    if isinstance(obj, nn.Module):
        for t in [*obj.parameters(), *obj.buffers()]:
            out.update(_storages(t, seen))
        return out
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple, set)) else \
        vars(obj).values() if type(obj).__module__.startswith("protege") else ()
    for x in items:
        out.update(_storages(x, seen))
    return out


def _extra_bytes(teacher, student) -> int:
    mine = _storages(student)
    return sum(n for ptr, n in _storages(teacher).items() if ptr not in mine)


def test_base_with_lora_shares_every_weight_and_scores_as_the_starting_model(tiny_paths, tmp_path):
    lora = ["teacher.self=base", "student.lora.enabled=true", "student.lora.r=4"]
    d = Distiller(_cfg(tiny_paths, tmp_path, *lora))
    assert isinstance(d.teacher, SelfTeacher)
    assert _extra_bytes(d.teacher, d.student) == 0, "base + LoRA holds its own copy of some weight"
    assert d.teacher.output_weight.untyped_storage().data_ptr() == \
        d.student.get_base_model().lm_head.weight.untyped_storage().data_ptr()
    start = AutoModelForCausalLM.from_pretrained(tiny_paths["student"])  # the untouched starting weights
    buffer = d.collect(0)
    for step in range(2):
        d.train_step(buffer)
    lora_moved = [n for n, p in d.student.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert lora_moved, "the adapters did not train: the test could not tell base from live"
    got = d.teacher.score(buffer, ScoreRequest()).token_logprobs
    torch.testing.assert_close(got, _reference_logprobs(start, buffer), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_reference_logprobs(d.student, buffer), got, atol=1e-4), "student == base: no check"

    plain = Distiller(_cfg(tiny_paths, tmp_path / "plain", "teacher.self=base"))  # no LoRA: a frozen copy
    assert isinstance(plain.teacher, LocalTeacher)
    weights = sum(p.numel() * p.element_size() for p in plain.student.parameters())
    assert _extra_bytes(plain.teacher, plain.student) >= weights  # the walk sees a copy when there is one


def test_ema_follows_its_formula_and_scores_with_the_averaged_weights(tiny_paths, tmp_path):
    rate = 0.3
    d = Distiller(_cfg(tiny_paths, tmp_path, "teacher.self=ema", f"teacher.ema_rate={rate}"))
    want = {n: p.detach().clone().double() for n, p in d.student.named_parameters() if p.requires_grad}
    for step in range(3):
        d.train_step()
        now = dict(d.student.named_parameters())
        want = {n: (1 - rate) * w + rate * now[n].detach().double() for n, w in want.items()}
    got = d.teacher.state_dict()["ema"]
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-7)
    student = {n: p.detach().clone() for n, p in d.student.named_parameters()}
    assert any(not torch.allclose(student[n], got[n], atol=1e-5) for n in got), "EMA == student: no check"

    buffer = d.collect(3)
    averaged = copy.deepcopy(d.student)
    with torch.no_grad():
        for n, p in averaged.named_parameters():
            p.copy_(got[n])
    signal = d.teacher.score(buffer, ScoreRequest(hidden=True))
    torch.testing.assert_close(signal.token_logprobs, _reference_logprobs(averaged, buffer), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.teacher.output_weight, averaged.lm_head.weight, rtol=0, atol=0)
    for n, p in d.student.named_parameters():  # scoring swapped the EMA in and back out
        assert torch.equal(p.detach(), student[n]), f"scoring changed the student's {n}"


def test_an_ema_teacher_inside_a_wrapper_still_follows_the_student(tiny_paths, tmp_path):
    """teacher.system_prompt wraps the EMA self-teacher in a privileged view: the wrapper forwards after_step, so
    the average moves with every step exactly as unwrapped (a wrapper that drops the hook freezes the EMA)."""
    rate = 0.5
    d = Distiller(_cfg(tiny_paths, tmp_path, "teacher.self=ema", f"teacher.ema_rate={rate}",
                       "teacher.system_prompt=Be exact."))
    assert d.teacher is not d.teacher.inner  # wrapped
    want = {n: p.detach().clone().double() for n, p in d.student.named_parameters() if p.requires_grad}
    d.train_step()
    now = dict(d.student.named_parameters())
    want = {n: (1 - rate) * w + rate * now[n].detach().double() for n, w in want.items()}
    got = d.teacher.state_dict()["ema"]
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-7)


def test_ema_with_lora_averages_only_the_adapters(tiny_paths, tmp_path):
    d = Distiller(_cfg(tiny_paths, tmp_path, "teacher.self=ema", "student.lora.enabled=true", "student.lora.r=4"))
    adapters = sum(p.numel() * p.element_size() for p in d.student.parameters() if p.requires_grad)
    assert set(d.teacher.state_dict()["ema"]) == {n for n, p in d.student.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in d.teacher.state_dict()["ema"])
    assert _extra_bytes(d.teacher, d.student) == adapters


def test_live_scores_with_the_current_weights_in_eval_mode(tiny_paths, tmp_path):
    d = Distiller(_cfg(tiny_paths, tmp_path, "teacher.self=live", "student.lora.enabled=true", "student.lora.r=4",
                       "student.lora.dropout=0.5"))
    buffer = d.collect(0)
    d.train_step(buffer)
    d.student.train()
    got = d.teacher.score(buffer, ScoreRequest()).token_logprobs
    assert d.student.training, "scoring left the student in eval mode"
    assert all(p.grad is None for p in d.student.parameters()), "the teacher pass made gradients"
    torch.testing.assert_close(got, _reference_logprobs(d.student, buffer), rtol=1e-5, atol=1e-5)  # dropout off
    assert _extra_bytes(d.teacher, d.student) == 0


def _metrics(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return [{k: v for k, v in m.items() if not k.startswith(("time_", "tokens_per_s", "train_tokens_per_s"))}
            for m in lines]


class Interrupted(Exception):
    pass


def test_ema_resumes_exactly(tiny_paths, tmp_path):
    """Crashed right after the step-2 checkpoint and resumed: steps 3-4, the final student and the final EMA
    equal the uninterrupted run's bit for bit (an EMA restarted from the student would change steps 3-4)."""
    common = ["teacher.self=ema", "teacher.ema_rate=0.5", "train.max_steps=4", "output.save_every=2",
              "loss.support=teacher", "loss.top_k=4"]
    ref = Distiller(_cfg(tiny_paths, tmp_path / "ref", *common))
    ref.train()
    cut = Distiller(_cfg(tiny_paths, tmp_path / "cut", *common))
    save = cut.save_checkpoint

    def save_then_crash():
        path = save()
        if cut.state.step == 2:
            raise Interrupted(path)
        return path
    cut.save_checkpoint = save_then_crash
    with pytest.raises(Interrupted):
        cut.train()
    resumed = Distiller(_cfg(tiny_paths, tmp_path / "cut", *common, "resume=true"))
    resumed.train()
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "ref")
    for n, p in ref.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[n], p), n
    for n, t in ref.teacher.state_dict()["ema"].items():
        assert torch.equal(resumed.teacher.state_dict()["ema"][n], t), n
    with pytest.raises(Exception, match="kind: 'self:ema' -> 'self:live'"):  # another kind cannot continue this EMA
        Distiller(_cfg(tiny_paths, tmp_path / "cut", *[c for c in common if "self" not in c], "teacher.self=live",
                       "train.max_steps=6", "resume=true")).train()


def test_ema_of_a_bfloat16_student_is_kept_in_float32():
    """0.05 x a 2^-12 step is far below bfloat16's resolution at 1.0: a bfloat16 EMA would never move."""
    from tiny import make_model

    student = make_model(1, 0).to(torch.bfloat16)
    teacher = SelfTeacher(student, "ema", pad_id=0, ema_rate=0.05)
    start = {n: p.detach().float().clone() for n, p in student.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(2.0 ** -12 * p.sign())
    teacher.after_step(student)
    for n, p in student.named_parameters():
        want = 0.95 * start[n] + 0.05 * p.detach().float()
        torch.testing.assert_close(teacher.ema[n], want, rtol=0, atol=1e-7)
    assert any(not torch.equal(teacher.ema[n].bfloat16().float(), teacher.ema[n]) for n in start)
