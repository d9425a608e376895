"""HF rollout engine: the whole generation buffer in as few batched `generate` calls as fit a token budget.

Rows are sorted by prompt length and grouped so that rows x (prompt + max_new_tokens) stays under
`batch_tokens`; each group is one `generate` call with a KV cache (left padding). Completions are
trimmed after the first EOS (kept, so the student learns to stop), and the buffer is padded only to
its longest completion.

Sampling logprobs: a logits processor sees the raw logits z_s of every step and keeps
log_softmax(z_s / temperature) for one step only; at step s+1 it reads the logprob of the token
sampled at step s from the last column of input_ids. Memory is O(rows x vocab), not
O(rows x steps x vocab) as with output_logits. The same processor keeps the top-k ids of each step
(the student's top-k support) when asked.

With top_k > 0 or top_p < 1 the token is drawn from the truncated, renormalised distribution, but
the recorded logprob (and top-k, entropy) is that of the FULL tempered distribution
log_softmax(z / temperature): the recorder runs before the top-k/top-p warpers. That is what the
losses recompute for the student, so sampled_pg's importance ratio is exactly 1 on-policy.
Greedy (temperature 0) records log_softmax(z) at temperature 1. Finish reason: "stop" when the
row emitted one of eos_ids (the completion ends with it), else "length" (max_new_tokens tokens).
(tests/test_sampling_reference.py checks all of this against a plain forward.)

On the CPU the decode steps run protege's fast paths for the model's linear layers and attention
(protege/rollout/fast_decode.py: the same products to float32 rounding, about 1.6x faster per decode
step on SmolLM2 at 8 rows); HF's generate loop, logits processors and sampling are untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from protege.diagnostics import entropy_from_logprobs
from protege.forward import length_batches
from protege.records import Rollouts
from protege.rollout.base import Sampling
from protege.rollout.fast_decode import fast_decode


class _Recorder(LogitsProcessor):
    """Records the logprob of each sampled token (and optional top-k ids); applies the temperature."""

    def __init__(self, temperature: float, topk: int):
        self.temperature = temperature if temperature > 0 else 1.0
        self.topk = topk
        self.prev: torch.Tensor | None = None  # (B, V) logprobs of the previous step
        self.token_logprobs: list[torch.Tensor] = []  # per step (B,)
        self.topk_ids: list[torch.Tensor] = []  # per step (B, k)
        self.topk_logprobs: list[torch.Tensor] = []  # per step (B, k)
        self.entropy: list[torch.Tensor] = []  # per step (B,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.flush(input_ids[:, -1])
        scaled = scores.float() / self.temperature
        self.prev = torch.log_softmax(scaled, dim=-1)  # (B, V)
        if self.topk:  # the student's top-k support and health statistics, at no extra forward
            top = self.prev.topk(self.topk, dim=-1)
            self.topk_ids.append(top.indices)
            self.topk_logprobs.append(top.values)
            self.entropy.append(entropy_from_logprobs(self.prev))
        return scaled

    def flush(self, sampled: torch.Tensor) -> None:
        if self.prev is not None:
            self.token_logprobs.append(self.prev.gather(-1, sampled[:, None]).squeeze(-1))
            self.prev = None


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[torch.Tensor], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_ids: list[int], pad_id: int, batch_tokens: int = 16384,
             record_topk: int = 0, autocast_bf16: bool = False, source: str = "student",
             fast: bool = True) -> Rollouts:
    """Sample one completion per prompt (repeat prompts for several generations per prompt); fast: the CPU decode
    step of protege.rollout.fast_decode."""
    n = len(prompt_ids)
    device = next(model.parameters()).device
    completions: list[torch.Tensor | None] = [None] * n
    logprobs: list[torch.Tensor | None] = [None] * n
    topk_ids: list[torch.Tensor | None] = [None] * n
    topk_lps: list[torch.Tensor | None] = [None] * n
    entropies: list[torch.Tensor | None] = [None] * n
    finish: list[str] = [""] * n
    gen_cfg = GenerationConfig(
        do_sample=temperature > 0, temperature=1.0, top_p=1.0, top_k=0 if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True)
    was_training = model.training
    model.eval()
    for rows in length_batches([len(p) + max_new_tokens for p in prompt_ids], batch_tokens):
        width = max(len(prompt_ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (b, P) left padded
        attention = torch.zeros((len(rows), width), dtype=torch.long)  # (b, P)
        for j, i in enumerate(rows):
            p = prompt_ids[i]
            input_ids[j, width - len(p):] = p
            attention[j, width - len(p):] = 1
        recorder = _Recorder(temperature, record_topk)
        processors = [recorder]
        if temperature > 0 and top_k:
            processors.append(TopKLogitsWarper(top_k))
        if temperature > 0 and top_p < 1:
            processors.append(TopPLogitsWarper(top_p))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16), \
                fast_decode(model, fast and device.type == "cpu"):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 generation_config=gen_cfg, logits_processor=LogitsProcessorList(processors))
        new = out[:, width:].cpu()  # (b, steps)
        recorder.flush(new[:, -1].to(device) if new.shape[1] else torch.zeros(0))
        steps = new.shape[1]
        lps = torch.stack(recorder.token_logprobs, 1).cpu() if steps else torch.zeros((len(rows), 0))  # (b, steps)
        tks = torch.stack(recorder.topk_ids, 1).cpu() if record_topk and steps else None  # (b, steps, k)
        tlp = torch.stack(recorder.topk_logprobs, 1).cpu() if record_topk and steps else None  # (b, steps, k)
        ent = torch.stack(recorder.entropy, 1).cpu() if record_topk and steps else None  # (b, steps)
        is_eos = torch.isin(new, torch.tensor(eos_ids))  # (b, steps)
        for j, i in enumerate(rows):
            hits = is_eos[j].nonzero()
            length = int(hits[0]) + 1 if len(hits) else steps
            finish[i] = "stop" if len(hits) else "length"
            completions[i] = new[j, :length]
            logprobs[i] = lps[j, :length].float()
            if tks is not None:
                topk_ids[i], topk_lps[i], entropies[i] = tks[j, :length], tlp[j, :length], ent[j, :length]
    model.train(was_training)
    if not record_topk:
        return Rollouts.from_samples(prompt_ids, completions, logprobs, finish, source)
    return Rollouts.from_samples(prompt_ids, completions, logprobs, finish, source, topk_ids=topk_ids,
                                 topk_logprobs=topk_lps, entropies=entropies)


class HFEngine:
    """The RolloutEngine over an HF model in this process: it samples the live weights, so sync is a no-op.

    pad_id, batch_tokens (rows x (prompt + max_new_tokens) per generate call) and bf16 autocast are
    the engine's own settings; everything about sampling comes in a Sampling per call."""

    def __init__(self, model: nn.Module, *, pad_id: int, batch_tokens: int = 16384, autocast_bf16: bool = False,
                 fast_decode: bool = True):
        self.model, self.pad_id, self.batch_tokens, self.autocast_bf16 = model, pad_id, batch_tokens, autocast_bf16
        self.fast = fast_decode

    def generate(self, prompt_ids: list[torch.Tensor], sampling: Sampling, *, source: str = "student",
                 examples: list | None = None) -> Rollouts:
        """Samples of `prompt_ids`; `examples` (the rows, read by engines that render text, e.g. an API teacher)
        is not needed here: the ids are the prompts."""
        return generate(self.model, prompt_ids, max_new_tokens=sampling.max_new_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                        eos_ids=list(sampling.eos_ids), record_topk=sampling.record_topk, pad_id=self.pad_id,
                        batch_tokens=self.batch_tokens, autocast_bf16=self.autocast_bf16, source=source,
                        fast=self.fast)

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to do: generation reads the model's current weights."""
