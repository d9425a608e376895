"""Held-out evaluation: does the student's own behaviour move toward the teacher's?

`evaluate` (used by the trainer every output.eval_every steps) samples one answer per held-out
prompt from the student (rollout settings, a fixed seed, the training RNG untouched) and reports
  rkl          per-token reverse KL(q||p) on those samples: exact over the vocabulary with an
               in-process teacher, the sample estimate log q(y) - log p(y) with a remote one
  teacher_nll  -log p(y_t) of the student's tokens under the teacher
  length, truncation_rate, distinct_2
`evaluate_models` (protege eval / demo) adds forward KL on teacher samples and greedy-answer
metrics, for a student and an in-process teacher given as models.
"""

from __future__ import annotations

import torch

from protege.diagnostics import distinct_n, repetition_rate
from protege.forward import HiddenStates, forward_completion_hidden, output_weight
from protege.losses import chunked_dense_divergence
from protege.rollout import hf as hf_rollout
from protege.teacher.base import ScoreRequest
from protege.teacher.local import score_rows
from protege.types import Rollouts


@torch.no_grad()
def evaluate(d, eval_set, *, seed: int = 1234) -> dict:
    """d: a trainer.Distiller. Returns a flat dict of floats ({} without held-out prompts)."""
    cfg = d.cfg
    examples = eval_set.examples[: cfg.data.eval_prompts] if eval_set else []
    if not examples:
        return {}
    r = cfg.rollout
    prompts = [d.prompts.prompt_ids(e) for e in examples]
    rollouts = _sample(d.student, prompts, d, temperature=r.temperature, seed=seed)
    local = not cfg.teacher.urls
    signal = d.teacher.score(rollouts, ScoreRequest(hidden=local, temperature=1.0))
    mask = rollouts.completion_mask
    out = {"teacher_nll": float(-signal.token_logprobs[mask].mean())}
    if local:
        out["rkl"] = exact_divergence(d.student, rollouts, signal.hidden_states, signal.lm_head, "reverse_kl",
                                      pad_id=d.tok.pad_token_id, batch=cfg.train.micro_batch_size)
    else:
        out["rkl"] = float((rollouts.sampling_logprobs - signal.token_logprobs)[mask].mean())
    return {**out, **text_metrics(rollouts)}


@torch.no_grad()
def evaluate_models(student, teacher, tok, prompts: list[torch.Tensor], *, max_new_tokens: int, eos_ids: list[int],
                    temperature: float = 1.0, batch_tokens: int = 16384, bf16: bool = False, seed: int = 1234,
                    teacher_cache: dict | None = None) -> dict:
    """Student vs an in-process teacher on held-out prompts (token ids):
    rkl on student samples, fkl on teacher samples, and for greedy answers of the student:
    teacher_nll, distinct_2, length, eos_rate; plus the teacher's own greedy distinct_2/length.
    Pass the same `teacher_cache` dict to several calls to generate and score the teacher's side once."""
    cache = teacher_cache if teacher_cache is not None else {}
    kw = dict(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=tok.pad_token_id, batch_tokens=batch_tokens,
              autocast_bf16=bf16)
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        s_samples = hf_rollout.generate(student, prompts, temperature=temperature, **kw)
    if "samples" not in cache:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            cache["samples"] = hf_rollout.generate(teacher, prompts, temperature=temperature, **kw)
        cache["greedy"] = hf_rollout.generate(teacher, prompts, temperature=0, **kw)
        cache["signal"] = _score(teacher, cache["samples"], tok)
    s_greedy = hf_rollout.generate(student, prompts, temperature=0, **kw)
    for name, rollouts, sig, key in (("reverse_kl", s_samples, _score(teacher, s_samples, tok), "rkl"),
                                     ("forward_kl", cache["samples"], cache["signal"], "fkl")):
        out[key] = exact_divergence(student, rollouts, sig.hidden_states, sig.lm_head, name, pad_id=tok.pad_token_id)
    t_greedy = cache["greedy"]
    sig = score_rows(teacher, s_greedy.prompt_ids, s_greedy.completion_ids, s_greedy.completion_mask, ScoreRequest(),
                     pad_id=tok.pad_token_id)
    out["greedy_teacher_nll"] = float(-sig.token_logprobs[s_greedy.completion_mask].mean())
    out.update({f"greedy_{k}": v for k, v in text_metrics(s_greedy).items()})
    out.update({f"teacher_greedy_{k}": v for k, v in text_metrics(t_greedy).items()})
    return out


def _score(teacher, rollouts: Rollouts, tok):
    return score_rows(teacher, rollouts.prompt_ids, rollouts.completion_ids, rollouts.completion_mask,
                      ScoreRequest(hidden=True), pad_id=tok.pad_token_id)


@torch.no_grad()
def exact_divergence(student, rollouts: Rollouts, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                     name: str, *, pad_id: int, batch: int = 8) -> float:
    """Mean per-token divergence over every completion position, exact over the vocabulary."""
    weight = output_weight(student)
    model = HiddenStates(student)
    was = student.training
    student.eval()
    total, count = 0.0, 0
    for s in range(0, len(rollouts), batch):
        rows = list(range(s, min(s + batch, len(rollouts))))
        mb = rollouts.select(rows)
        t = mb.completion_ids.shape[1]
        h = forward_completion_hidden(model, mb.prompt_ids, mb.completion_ids.to(weight.device), mb.completion_mask,
                                      pad_id)  # (b, t, H)
        m = mb.completion_mask.to(h.device)
        th = teacher_hidden[rows, :t].to(h.device)[m]  # (n, Ht)
        values = chunked_dense_divergence(h[m].float(), weight.float(), teacher_hidden=th.float(),
                                          teacher_weight=teacher_weight.to(h.device).float(), name=name)
        total, count = total + float(values.sum()), count + int(m.sum())
    student.train(was)
    return total / max(1, count)


def text_metrics(rollouts: Rollouts) -> dict:
    mask = rollouts.completion_mask
    lengths = mask.sum(1)
    seqs = [rollouts.completion_ids[i, : int(lengths[i])].tolist() for i in range(len(rollouts))]
    return {"length": float(lengths.float().mean()),
            "truncation_rate": sum(f == "length" for f in rollouts.finish_reasons) / len(rollouts),
            "eos_rate": sum(f == "stop" for f in rollouts.finish_reasons) / len(rollouts),
            "distinct_2": distinct_n(seqs, 2), "repetition_rate": repetition_rate(seqs, n=4)}


def _sample(model, prompts, d, *, temperature: float, seed: int) -> Rollouts:
    r = d.cfg.rollout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return hf_rollout.generate(model, prompts, max_new_tokens=r.max_new_tokens, temperature=temperature,
                                   top_p=r.top_p, top_k=r.top_k, eos_ids=d.eos_ids, pad_id=d.tok.pad_token_id,
                                   batch_tokens=r.batch_tokens, autocast_bf16=d.bf16)
