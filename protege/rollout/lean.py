"""Lean rollout engine: the HF model's own forward, a preallocated KV cache and a decode step that only samples.

Same contract as protege.rollout.hf (read its docstring): one completion per prompt, trimmed right after
the first EOS (kept, finish reason "stop"; else "length" at max_new_tokens), the recorded logprob, top-k
and entropy are those of the FULL tempered distribution log_softmax(z / T) (T = 1 for greedy) even when
top_k / top_p truncate what the token is drawn from. What it does differently, per decode step:

- KV cache: every attention layer writes its new keys/values into a buffer allocated once for
  prompt + max_new_tokens positions (PreallocLayer) and attends to a view of the filled part: no
  torch.cat of the whole cache per step (HF's DynamicLayer copies it every step: O(L^2) traffic).
- sampling: one pass over the vocabulary for the normaliser, e = exp(z/T - m), s = sum e, then
  inverse-CDF sampling: token = first v with cumsum(e)[v] > u * s, u ~ U[0, 1) (one uniform per row,
  not one exponential per vocabulary entry as torch.multinomial / the Gumbel trick draw: 12 ms vs
  1.5 ms per step at 8 x 49152 on this CPU). cumsum of float32 accumulates in double on CPU. With
  top_k / top_p the token is drawn the same way over the kept candidates, renormalised.
  logprob(token) = z_tok/T - m - log s; top-k: topk of z/T minus the same normaliser;
  entropy = log s - sum(e * (z/T - m)) / s. No (rows, V) log_softmax copy per step.
- rows that emit EOS leave the batch (their cache rows are dropped), so they stop costing compute.
- on the CPU, linear layers take a decode step's few rows through protege's AVX2 kernel (it streams
  the weights at close to memory speed, where BLAS reaches a third of it at 8 rows), and attention
  reads the KV cache once per KV head instead of copying it per query head (protege/rollout/fast_decode.py).

The random stream is the engine's own torch.Generator (seeded), or torch's global one when none is
given; tokens are not bit-identical to HF generate's (different sampling algorithm), but they follow
the same distribution (tests/test_lean_engine.py compares frequencies with HF generate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from protege.forward import length_batches
from protege.records import Rollouts
from protege.rollout.base import Sampling
from protege.rollout.fast_decode import fast_decode


class PreallocLayer(DynamicLayer):
    """One attention layer's KV cache: (B, H, max_len, D) buffers filled in place; attention reads a view."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.length = max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k_buf = key_states.new_empty((b, h, self.max_len, d))
        self.v_buf = value_states.new_empty((b, value_states.shape[1], self.max_len, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"PreallocLayer: {end} positions do not fit the cache of {self.max_len}")
        self.k_buf[:, :, self.length: end] = key_states
        self.v_buf[:, :, self.length: end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only these batch rows stay (finished rows leave the batch)."""
        if self.is_initialized:
            self.k_buf, self.v_buf = self.k_buf[rows], self.v_buf[rows]
            self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]


def make_cache(model: nn.Module, max_len: int) -> DynamicCache:
    """The model's DynamicCache with every full-attention layer preallocated (sliding-window layers keep HF's)."""
    cache = DynamicCache(config=model.config)
    if not cache.layers:  # a model whose config gives no layer types: one full-attention layer per decoder layer
        n = model.config.get_text_config(decoder=True).num_hidden_layers
        cache.layers = [DynamicLayer() for _ in range(n)]
    cache.layers = [PreallocLayer(max_len) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _keep_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        if isinstance(layer, PreallocLayer):
            layer.keep_rows(rows)
        else:
            layer.batch_select_indices(rows)


# ------------------------------------------------------------------------------------------- sampling
@dataclass
class Draw:
    """One decode step's sample: tokens (b,), their logprobs (b,), and optionally top-k ids/logprobs (b, k),
    entropy (b,), all under the full tempered distribution."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(b,) index drawn with probability weights / weights.sum(-1) from (b, n) non-negative weights."""
    cdf = weights.cumsum(-1)  # (b, n)
    u = torch.rand((weights.shape[0], 1), generator=generator, device=weights.device, dtype=cdf.dtype)  # [0, 1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first cdf > u * total: never a zero weight
    return idx.clamp_(max=weights.shape[-1] - 1)[:, 0]


def _truncated(scaled: torch.Tensor, top_k: int, top_p: float, generator) -> torch.Tensor:
    """(b,) tokens drawn from the top-k, then top-p (nucleus) truncation of softmax(scaled), renormalised,
    in HF's order (TopKLogitsWarper then TopPLogitsWarper): the nucleus keeps a candidate while the mass of
    the more likely candidates is < top_p (so the one crossing it stays)."""
    if top_k:
        vals, ids = scaled.topk(min(top_k, scaled.shape[-1]), -1)  # (b, k) sorted descending
    else:
        vals, ids = scaled.sort(-1, descending=True)  # (b, V)
    probs = torch.softmax(vals, -1)
    if top_p < 1:
        above = probs.cumsum(-1) - probs  # mass of the strictly more likely candidates
        probs = probs.masked_fill(above >= top_p, 0.0)
    return ids.gather(-1, _inverse_cdf(probs, generator)[:, None])[:, 0]


def draw(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Draw:
    """Sample one token per row from (b, V) raw logits as `sampling` says, and what the record needs."""
    greedy = sampling.temperature <= 0
    scaled = logits.float() if greedy else logits.float() / sampling.temperature  # (b, V) z / T
    m = scaled.amax(-1, keepdim=True)  # (b, 1)
    centred = scaled - m  # (b, V) <= 0
    e = centred.exp()  # (b, V)
    s = e.sum(-1, keepdim=True)  # (b, 1)
    log_s = s.log()
    if greedy:
        tokens = scaled.argmax(-1)
    elif sampling.top_k or sampling.top_p < 1:
        tokens = _truncated(scaled, sampling.top_k, sampling.top_p, generator)
    else:
        tokens = _inverse_cdf(e, generator)
    out = Draw(tokens, (centred.gather(-1, tokens[:, None]) - log_s)[:, 0])
    if sampling.record_topk:
        top = centred.topk(sampling.record_topk, -1)
        out.topk_ids, out.topk_logprobs = top.indices, top.values - log_s
        out.entropy = (log_s - (e * centred).sum(-1, keepdim=True) / s)[:, 0]
    return out


# ------------------------------------------------------------------------------------------ the loop
@torch.no_grad()
def _generate_group(model: nn.Module, prompts: list[torch.Tensor], sampling: Sampling, pad_id: int,
                    generator: torch.Generator | None) -> list[tuple]:
    """Per row (tokens, logprobs, topk_ids, topk_logprobs, entropy, finish) for prompts sharing a batch."""
    device = next(model.parameters()).device
    b, width, steps = len(prompts), max(len(p) for p in prompts), sampling.max_new_tokens
    ids = torch.full((b, width), pad_id, dtype=torch.long)  # (b, P) left padded
    attn = torch.zeros((b, width + steps), dtype=torch.long)  # (b, P + steps), filled as tokens come
    for j, p in enumerate(prompts):
        ids[j, width - len(p):] = p
        attn[j, width - len(p): width] = 1
    attn = attn.to(device)
    pos = (attn[:, :width].cumsum(-1) - 1).clamp_(min=0)  # (b, P)
    cache = make_cache(model, width + steps)
    logits = model(input_ids=ids.to(device), attention_mask=attn[:, :width], position_ids=pos,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (b, V)
    next_pos = pos[:, -1] + 1  # (b,)
    rec = _Record(b, steps, sampling.record_topk)
    eos = torch.tensor(sampling.eos_ids, dtype=torch.long, device=device)
    active = torch.arange(b)  # original row of each batch row
    for s in range(steps):
        d = draw(logits, sampling, generator)
        rec.put(active, s, d)
        stop = torch.isin(d.tokens, eos).cpu()  # (b_active,)
        rec.stop(active[stop], s + 1)
        if s == steps - 1 or bool(stop.all()):
            break
        if stop.any():  # finished rows leave the batch
            keep = (~stop).nonzero()[:, 0]
            active, attn, next_pos = active[keep], attn[keep.to(device)], next_pos[keep.to(device)]
            d.tokens = d.tokens[keep.to(device)]
            _keep_rows(cache, keep.to(device))
        attn[:, width + s] = 1
        logits = model(input_ids=d.tokens[:, None], attention_mask=attn[:, : width + s + 1],
                       position_ids=next_pos[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos += 1
    return rec.rows()


class _Record:
    """Per-step samples of a batch written at the rows' original indices; rows() trims each at its length."""

    def __init__(self, b: int, steps: int, k: int):
        self.tokens = torch.zeros((b, steps), dtype=torch.long)
        self.logprobs = torch.zeros((b, steps))
        self.topk_ids = torch.zeros((b, steps, k), dtype=torch.long) if k else None
        self.topk_logprobs = torch.zeros((b, steps, k)) if k else None
        self.entropy = torch.zeros((b, steps)) if k else None
        self.length = torch.full((b,), steps, dtype=torch.long)
        self.stopped = torch.zeros(b, dtype=torch.bool)
        self.steps = steps

    def stop(self, rows: torch.Tensor, length: int) -> None:
        self.length[rows], self.stopped[rows] = length, True

    def put(self, rows: torch.Tensor, s: int, d: Draw) -> None:
        self.tokens[rows, s] = d.tokens.cpu()
        self.logprobs[rows, s] = d.logprobs.float().cpu()
        if self.topk_ids is not None:
            self.topk_ids[rows, s] = d.topk_ids.cpu()
            self.topk_logprobs[rows, s] = d.topk_logprobs.float().cpu()
            self.entropy[rows, s] = d.entropy.float().cpu()

    def rows(self) -> list[tuple]:
        out = []
        for j, n in enumerate(self.length.tolist()):
            finish = "stop" if self.stopped[j] else "length"
            cut = lambda x: None if x is None else x[j, :n]  # noqa: E731
            out.append((self.tokens[j, :n], self.logprobs[j, :n], cut(self.topk_ids), cut(self.topk_logprobs),
                        cut(self.entropy), finish))
        return out


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[torch.Tensor], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_ids: list[int], pad_id: int, batch_tokens: int = 16384,
             record_topk: int = 0, autocast_bf16: bool = False, source: str = "student",
             generator: torch.Generator | None = None, fast: bool = True) -> Rollouts:
    """Sample one completion per prompt: protege.rollout.hf.generate's signature and record (plus a generator)."""
    sampling = Sampling(max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), temperature=temperature, top_p=top_p,
                        top_k=top_k, record_topk=record_topk)
    rows: list[tuple | None] = [None] * len(prompt_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for group in length_batches([len(p) + max_new_tokens for p in prompt_ids], batch_tokens):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16), \
                    fast_decode(model, fast and device.type == "cpu"):
                for i, row in zip(group, _generate_group(model, [prompt_ids[i] for i in group], sampling, pad_id,
                                                          generator)):
                    rows[i] = row
    finally:
        model.train(was_training)
    tokens, lps, tk, tlp, ent, finish = (list(x) for x in zip(*rows))
    if not record_topk:
        return Rollouts.from_samples(prompt_ids, tokens, lps, finish, source)
    return Rollouts.from_samples(prompt_ids, tokens, lps, finish, source, topk_ids=tk, topk_logprobs=tlp,
                                 entropies=ent)


class LeanEngine:
    """The RolloutEngine over an HF model in this process, with the lean decode loop above; sync is a no-op
    (it samples the live weights). seed: its own random stream (None: torch's global one)."""

    def __init__(self, model: nn.Module, *, pad_id: int, batch_tokens: int = 16384, autocast_bf16: bool = False,
                 seed: int | None = None, fast_decode: bool = True):
        self.model, self.pad_id, self.batch_tokens, self.autocast_bf16 = model, pad_id, batch_tokens, autocast_bf16
        self.fast = fast_decode
        device = next(model.parameters()).device
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def generate(self, prompt_ids: list[torch.Tensor], sampling: Sampling, *, source: str = "student") -> Rollouts:
        return generate(self.model, prompt_ids, max_new_tokens=sampling.max_new_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                        eos_ids=list(sampling.eos_ids), record_topk=sampling.record_topk, pad_id=self.pad_id,
                        batch_tokens=self.batch_tokens, autocast_bf16=self.autocast_bf16, source=source,
                        generator=self.generator, fast=self.fast)

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to do: generation reads the model's current weights."""
