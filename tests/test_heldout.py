"""Held-out evaluation on tiny models: exact KLs against a brute-force forward, zero for identical models."""

from __future__ import annotations

import torch

from protege.heldout import evaluate_models, exact_divergence
from protege.rollout.hf import generate
from protege.teacher.base import ScoreRequest
from protege.teacher.local import score_rows
from tiny import make_model, make_tokenizer


def _prompts(tok, n=4):
    return [torch.tensor(tok.apply_chat_template([{"role": "user", "content": f"hi {i}"}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)) for i in range(n)]


def test_exact_divergence_matches_full_logits():
    tok = make_tokenizer()
    student, teacher = make_model(2, 0), make_model(3, 1)
    torch.manual_seed(0)
    r = generate(student, _prompts(tok), max_new_tokens=6, eos_ids=[1], pad_id=0)
    sig = score_rows(teacher, r.prompt_ids, r.completion_ids, r.completion_mask, ScoreRequest(hidden=True), pad_id=0)
    got = exact_divergence(student, r, sig.hidden_states, sig.lm_head, "reverse_kl", pad_id=0, batch=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(r)):  # brute force: one full forward per row, float64 KL over the vocabulary
            n = int(r.completion_mask[i].sum())
            seq = torch.cat([r.prompt_ids[i], r.completion_ids[i, :n]])[None]
            p0 = len(r.prompt_ids[i])
            q = torch.log_softmax(student(seq).logits[0, p0 - 1: p0 - 1 + n].double(), -1)
            p = torch.log_softmax(teacher(seq).logits[0, p0 - 1: p0 - 1 + n].double(), -1)
            total += float((q.exp() * (q - p)).sum())
            count += n
    assert abs(got - total / count) < 1e-5


def test_identical_models_score_zero():
    tok = make_tokenizer()
    model = make_model(2, 0)
    m = evaluate_models(model, model, tok, _prompts(tok), max_new_tokens=6, eos_ids=[1])
    assert abs(m["rkl"]) < 1e-5 and abs(m["fkl"]) < 1e-5
    assert m["greedy_distinct_2"] == m["teacher_greedy_distinct_2"]
    for key in ("greedy_teacher_nll", "greedy_length", "greedy_eos_rate", "greedy_repetition_rate"):
        assert key in m
