"""The greedy probe (protege.probe): its figures against a greedy loop and n-gram counts written here, its bar,
and a run whose student loops while the teacher ends: the monitor must say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from protege.config import load_config
from protege.diagnostics import HealthMonitor
from protege.probe import GreedyProbe, ProbeBar, check
from protege.trainer import Distiller, train

EOS = 1


def _greedy_reference(model, prompt: torch.Tensor, cap: int) -> list[int]:
    """Argmax decoding with a full forward per token (no cache), stopping after EOS."""
    ids, out = prompt.tolist(), []
    for _ in range(cap):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
        if nxt == EOS:
            break
    return out


def _figures(answers: list[list[int]], cap: int) -> dict:
    """distinct-2 pooled, repetition of 4-grams per answer, EOS share, mean length: counted by hand."""
    bigrams = [tuple(a[i:i + 2]) for a in answers for i in range(len(a) - 1)]
    reps = []
    for a in answers:
        grams = [tuple(a[i:i + 4]) for i in range(len(a) - 3)]
        if grams:
            reps.append(1 - len(set(grams)) / len(grams))
    return {"distinct_2": len(set(bigrams)) / len(bigrams), "repetition_rate": sum(reps) / len(reps) if reps else 0.0,
            "eos_rate": sum(a[-1] == EOS and len(a) <= cap for a in answers) / len(answers),
            "length": sum(map(len, answers)) / len(answers)}


def test_probe_figures_equal_a_greedy_loop_counted_by_hand():
    from tiny import make_model

    model = make_model(2, seed=3)
    prompts = [torch.tensor([4, 7, 9]), torch.tensor([5, 5, 6, 8, 2]), torch.tensor([11])]
    cap = 24
    got = GreedyProbe(prompts, cap, [EOS], pad_id=0).measure(model)
    want = _figures([_greedy_reference(model, p, cap) for p in prompts], cap)
    assert got == pytest.approx(want, abs=1e-9)


def test_the_bar_is_the_issue_bar():
    teacher = {"distinct_2": 0.70, "repetition_rate": 0.10, "eos_rate": 0.80, "length": 40.0}
    assert check(teacher, teacher) == {}
    good = {"distinct_2": 0.57, "repetition_rate": 0.149, "eos_rate": 0.41, "length": 60.0}
    assert check(good, teacher) == {}
    bad = {"distinct_2": 0.55, "repetition_rate": 0.16, "eos_rate": 0.39, "length": 96.0}
    assert set(check(bad, teacher)) == {"probe_diversity", "probe_repetition", "probe_ending"}
    # a repetition rate doubling from near zero is noise, not a loop
    assert check({**teacher, "repetition_rate": 0.04}, {**teacher, "repetition_rate": 0.01}) == {}
    assert set(check({**teacher, "repetition_rate": 0.04}, {**teacher, "repetition_rate": 0.01},
                     ProbeBar(repetition_floor=0.0))) == {"probe_repetition"}


def _constant_model(token: int, vocab: int = 128) -> LlamaForCausalLM:
    """A Llama whose every position predicts `token`: zero weights, one attention output bias that makes the
    final hidden state constant, and an untied output row for `token` along it."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, attention_bias=True, tie_word_embeddings=False,
                      max_position_embeddings=512, pad_token_id=0, eos_token_id=EOS, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.layers[0].self_attn.o_proj.bias.fill_(1.0)
        model.lm_head.weight[token] = 5.0
    return model


def test_a_looping_student_is_caught_against_a_teacher_that_ends(tiny_paths, tmp_path):
    student, teacher = _constant_model(token=9), _constant_model(token=EOS)
    cfg = load_config(None, [f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}",
                             f"data.path={tiny_paths['data']}", "rollout.max_new_tokens=6", "train.prompts_per_step=2",
                             "train.micro_batch_size=2", "optim.lr=1e-6", f"output.dir={tmp_path}",
                             "output.progress=false", "train.num_threads=1", "data.eval_fraction=0.2",
                             "data.eval_prompts=0", "train.max_steps=2", "output.probe_every=1",
                             "output.probe_prompts=3"])
    history = Distiller(cfg, student=student, teacher_model=teacher).train()
    probes = [h for h in history if "probe/distinct_2" in h]
    assert [p["step"] for p in probes] == [0, 1, 2]  # at the start, every step, at the end
    first = probes[0]
    assert first["probe/length"] == 12 and first["probe/eos_rate"] == 0.0  # 9 9 9 ... to twice the cap
    assert first["probe/repetition_rate"] == pytest.approx(1 - 1 / 9)  # 9 four-grams, one distinct
    assert first["probe/reference_eos_rate"] == 1.0 and first["probe/reference_length"] == 1.0
    warnings = first["warnings"]
    assert len(warnings) == 2 and "loops" in warnings[0] and "end with EOS" in warnings[1]
    assert not any("warnings" in p for p in probes[1:])  # each kind once per run
    logged = [json.loads(x) for x in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [x["warnings"] for x in logged if "warnings" in x and "probe/length" in x] == [warnings]


def test_the_probe_does_not_change_the_trajectory(tiny_paths, tmp_path):
    base = [f"student.path={tiny_paths['student']}", f"teacher.path={tiny_paths['teacher']}",
            f"data.path={tiny_paths['data']}", "rollout.max_new_tokens=6", "train.prompts_per_step=2",
            "train.micro_batch_size=2", "optim.lr=3e-3", "output.progress=false", "train.num_threads=1",
            "data.eval_fraction=0.2", "data.eval_prompts=0", "train.max_steps=3"]
    runs = {}
    for name, extra in (("off", []), ("on", ["output.probe_every=1"])):
        hist = train(load_config(None, [*base, f"output.dir={tmp_path / name}", *extra]))
        runs[name] = [h["loss"] for h in hist if "loss" in h]
    assert runs["on"] == runs["off"]


def test_monitor_keeps_the_probe_reference_across_a_resume():
    m = HealthMonitor()
    m.probe_reference = {"distinct_2": 0.7, "eos_rate": 1.0}
    assert m.fire(3, {"probe_ending": "x"}) == ["step 3: x"]
    again = HealthMonitor()
    again.load_state_dict(m.state_dict())
    assert again.probe_reference == m.probe_reference
    assert again.fire(4, {"probe_ending": "x"}) == []
