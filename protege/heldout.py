"""Held-out evaluation during training: does the student's own behaviour move toward the teacher's?

On `data.eval_prompts` held-out prompts the student samples one answer each (rollout settings,
a fixed seed, the training RNG untouched); the teacher scores them. Reported:
  rkl          per-token reverse KL(q||p) on the student's samples, exact over the vocabulary with an
               in-process teacher; with a remote teacher the sample estimate log q(y) - log p(y)
  teacher_nll  -log p(y_t) of the student's tokens under the teacher
  length, truncation_rate, distinct_2 of the samples
"""

from __future__ import annotations

import torch

from protege.data import PromptSet
from protege.forward import forward_completion_hidden, output_weight
from protege.losses import chunked_dense_divergence
from protege.rollout import hf as hf_rollout
from protege.teacher.base import ScoreRequest


@torch.no_grad()
def evaluate(d, eval_set: PromptSet, *, seed: int = 1234) -> dict:
    """d: a trainer.Distiller. Returns a flat dict of floats."""
    cfg = d.cfg
    examples = eval_set.examples[: cfg.data.eval_prompts]
    if not examples:
        return {}
    prompts = [d.prompts.prompt_ids(e) for e in examples]
    r = cfg.rollout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollouts = hf_rollout.generate(d.student, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                       top_p=r.top_p, top_k=r.top_k, eos_ids=d.eos_ids, pad_id=d.tok.pad_token_id,
                                       batch_tokens=r.batch_tokens, autocast_bf16=cfg.train.precision == "bf16")
    local = not cfg.teacher.urls
    signal = d.teacher.score(rollouts, ScoreRequest(hidden=local, temperature=1.0))
    mask = rollouts.completion_mask
    out = {"teacher_nll": float(-signal.token_logprobs[mask].mean())}
    if local:
        weight = output_weight(d.student)
        was = d.model.training
        d.model.eval()
        total, count = 0.0, 0
        for s in range(0, len(rollouts), cfg.train.micro_batch_size):
            rows = list(range(s, min(s + cfg.train.micro_batch_size, len(rollouts))))
            mb = rollouts.select(rows)
            sig = signal.select(rows, mb.completion_ids.shape[1])
            h = forward_completion_hidden(d.model, mb.prompt_ids, mb.completion_ids.to(weight.device),
                                          mb.completion_mask, d.tok.pad_token_id)
            m = mb.completion_mask.to(h.device)
            rkl = chunked_dense_divergence(h[m].float(), weight.float(),
                                           teacher_hidden=sig.hidden_states.to(h.device)[m].to(sig.lm_head.dtype),
                                           teacher_weight=sig.lm_head.to(h.device), name="reverse_kl")
            total, count = total + float(rkl.sum()), count + int(m.sum())
        d.model.train(was)
        out["rkl"] = total / max(1, count)
    else:
        out["rkl"] = float((rollouts.sampling_logprobs - signal.token_logprobs)[mask].mean())
    lengths = mask.sum(1).float()
    out["length"] = float(lengths.mean())
    out["truncation_rate"] = sum(f == "length" for f in rollouts.finish_reasons) / len(rollouts)
    out["distinct_2"] = _distinct_2([rollouts.completion_ids[i, : int(lengths[i])].tolist() for i in range(len(rollouts))])
    return out


def _distinct_2(seqs: list[list[int]]) -> float:
    grams = [tuple(s[i: i + 2]) for s in seqs for i in range(len(s) - 1)]
    return len(set(grams)) / max(1, len(grams))
