"""Generation for the OpenAI-compatible routes: an HF `model.generate` that records raw logprobs, and a
queue that merges concurrent requests into few engine calls in the batcher's engine thread.

Logprobs are those of the model's own next-token distribution, log_softmax(logits) at temperature 1,
whatever the sampling temperature, top_p or top_k (vLLM's default `raw_logprobs` mode; OpenAI's API
reports the model's distribution too). Greedy (temperature 0) takes the argmax of the same logits.
For each generated token the engine keeps its logprob and, when asked, the top-k (ids, logprobs) of
that position, sorted descending. A row stops after one of `eos_ids` (kept: finish "stop") or after
its own max_tokens (finish "length").

The engine is not re-entrant and is shared with scoring: every call runs in the batcher's single
engine thread (`Batcher.run_exclusive`), between score batches. Concurrent requests that sample
alike (temperature, top_p, top_k) are merged into one call: each row is cut at its own max_tokens,
so its tokens are distributed exactly as if it had been generated alone. Each sampled row draws
its tokens from its own torch.Generator (seeded by the request's seed, row j of a request with
seed s by `row_seed(s, j)`; a random seed without one): the last logits processor samples every
row itself and leaves generate a one-hot choice, so a seed gives the same tokens whatever else
shares the call.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from protege.server.batcher import Overloaded


@dataclass(frozen=True)
class SamplingKey:
    """What must be equal for two requests to share one generate call."""

    temperature: float  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # the request's; rows of a merged call each get their own (row_seed)


@dataclass
class GeneratedRow:
    """One completion: token ids (EOS included when it stopped there), the logprob of each, and the
    top-k (ids, logprobs) of each position when asked."""

    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None
    finish_reason: str  # "stop" | "length"


class _RawRecorder:
    """A logits processor that keeps log_softmax(logits) of every step (before any warper) for the token
    chosen there (transformers is imported on first generation only: the server starts without it)."""

    def __init__(self, topk: int):
        self.topk = topk
        self.prev: torch.Tensor | None = None  # (B, V)
        self.token_logprobs: list[torch.Tensor] = []  # per step (B,)
        self.top_ids: list[torch.Tensor] = []  # per step (B, k)
        self.top_logprobs: list[torch.Tensor] = []  # per step (B, k)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.flush(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        if self.topk:
            top = self.prev.topk(self.topk, dim=-1)
            self.top_ids.append(top.indices.cpu())
            self.top_logprobs.append(top.values.cpu())
        return scores

    def flush(self, chosen: torch.Tensor) -> None:
        if self.prev is not None:
            self.token_logprobs.append(self.prev.gather(-1, chosen[:, None].to(self.prev.device))[:, 0].cpu())
            self.prev = None


class _RowSampler:
    """The last logits processor: draws each row's token from softmax(warped scores) with the row's own
    generator and returns scores that allow only that token (generate's greedy choice then takes it)."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1).cpu()  # (B, V)
        chosen = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, chosen.to(scores.device), 0.0)


def row_seed(seed: int, j: int) -> int:
    """The seed of row j of a request with `seed` (row 0: the seed itself)."""
    return seed if j == 0 else (seed * 1_000_003 + j) % (1 << 63)


@torch.no_grad()
def generate_rows(model: nn.Module, prompts: list[list[int]], max_tokens: list[int], key: SamplingKey, *,
                  topk: int, eos_ids: list[int], pad_id: int, seeds: list[int | None] | None = None
                  ) -> list[GeneratedRow]:
    """One left-padded `model.generate` over `prompts` (each row up to its own max_tokens)."""
    from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    device = next(model.parameters()).device
    width, steps = max(len(p) for p in prompts), max(max_tokens)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, P)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[i, width - len(p):] = 1
    sample = key.temperature > 0
    # generate itself is greedy: with sampling, _RowSampler (last) leaves one allowed token per row
    config = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=list(eos_ids) or None,
                              pad_token_id=pad_id, use_cache=True)
    recorder = _RawRecorder(topk)
    processors = [recorder]
    if sample and key.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(key.temperature))
    if sample and key.top_k:
        processors.append(TopKLogitsWarper(key.top_k))
    if sample and key.top_p < 1.0:
        processors.append(TopPLogitsWarper(key.top_p))
    if sample:  # each row from its own generator: the same seed, the same tokens, whatever shares the call
        seeds = seeds or [None] * len(prompts)
        processors.append(_RowSampler([int(torch.randint(1 << 62, ())) if s is None else s for s in seeds]))
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         generation_config=config, logits_processor=LogitsProcessorList(processors))
    new = out[:, width:].cpu()  # (B, S)
    if new.shape[1]:
        recorder.flush(new[:, -1])
    lps = torch.stack(recorder.token_logprobs, 1) if new.shape[1] else torch.zeros((len(prompts), 0))  # (B, S)
    tids = torch.stack(recorder.top_ids, 1) if topk and new.shape[1] else None  # (B, S, k)
    tlps = torch.stack(recorder.top_logprobs, 1) if topk and new.shape[1] else None  # (B, S, k)
    rows = []
    for i, limit in enumerate(max_tokens):
        ids = new[i, :limit].tolist()
        stop = next((j for j, t in enumerate(ids) if t in eos_ids), None)
        length = stop + 1 if stop is not None else len(ids)
        rows.append(GeneratedRow(
            token_ids=ids[:length], logprobs=lps[i, :length].tolist(),
            top_ids=tids[i, :length].tolist() if tids is not None else None,
            top_logprobs=tlps[i, :length].tolist() if tlps is not None else None,
            finish_reason="stop" if stop is not None else "length"))
    return rows


@dataclass
class _Job:
    prompts: list[list[int]]
    max_tokens: list[int]
    key: SamplingKey  # without the seed: what the rows of one call share
    seeds: list[int | None]
    topk: int
    future: asyncio.Future
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = len(self.prompts)


class GenerationQueue:
    """Merges concurrent generation requests; each merged group is one engine call in the engine thread.

    `submit` waits `batch_wait_s` for company (0 with batching off: every request alone), then runs
    the jobs grouped by SamplingKey, at most `max_batch_seqs` rows and `max_batch_tokens` tokens
    (rows x (longest prompt + max_tokens)) per call. Requests in the server (generation and scoring
    together) are capped at the batcher's max_queue: one more raises Overloaded (503 + Retry-After).
    """

    def __init__(self, batcher, model: nn.Module, *, eos_ids: list[int], pad_id: int, batch_wait_s: float,
                 max_batch_seqs: int, max_batch_tokens: int, batching: bool = True):
        self.batcher, self.model = batcher, model
        self.eos_ids, self.pad_id = list(eos_ids), pad_id
        self.batch_wait_s = batch_wait_s if batching else 0.0
        self.max_batch_seqs, self.max_batch_tokens, self.batching = max_batch_seqs, max_batch_tokens, batching
        self.in_flight = 0
        self.engine_calls = 0
        self._pending: list[_Job] = []
        self._drain: asyncio.Task | None = None

    async def submit(self, prompts: list[list[int]], max_tokens: list[int], key: SamplingKey,
                     topk: int) -> list[GeneratedRow]:
        if self.in_flight + self.batcher.in_flight >= self.batcher.max_queue:
            raise Overloaded(retry_after=1.0)
        self.in_flight += 1
        try:
            seeds = [None if key.seed is None else row_seed(key.seed, j) for j in range(len(prompts))]
            job = _Job(prompts, max_tokens, replace(key, seed=None), seeds, topk,
                       asyncio.get_running_loop().create_future())
            self._pending.append(job)
            if self._drain is None or self._drain.done():
                self._drain = asyncio.create_task(self._run(), name="protege-generate")
            return await job.future
        finally:
            self.in_flight -= 1

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self.batch_wait_s)
            jobs, self._pending = self._pending, []
            for group in self._groups(jobs):
                live = [j for j in group if not j.future.done()]
                if live:
                    await self._call(live)

    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Jobs in arrival order, grouped by sampling key within the per-call caps."""
        groups: list[list[_Job]] = []
        open_: dict[SamplingKey, list[_Job]] = {}
        for job in jobs:
            group = open_.get(job.key)
            if group is not None and self.batching and self._fits(group + [job]):
                group.append(job)
                continue
            groups.append([job])
            open_[job.key] = groups[-1]
        return groups

    def _fits(self, group: list[_Job]) -> bool:
        rows = sum(j.rows for j in group)
        longest = max(len(p) for j in group for p in j.prompts) + max(m for j in group for m in j.max_tokens)
        return rows <= self.max_batch_seqs and rows * longest <= self.max_batch_tokens

    async def _call(self, group: list[_Job]) -> None:
        prompts = [p for j in group for p in j.prompts]
        limits = [m for j in group for m in j.max_tokens]
        seeds = [s for j in group for s in j.seeds]
        topk = max(j.topk for j in group)
        try:
            rows = await self.batcher.run_exclusive(
                lambda: generate_rows(self.model, prompts, limits, group[0].key, topk=topk, eos_ids=self.eos_ids,
                                      pad_id=self.pad_id, seeds=seeds))
            self.engine_calls += 1
        except Exception as exc:  # noqa: BLE001 - every caller of this call hears it
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in group:
            mine = rows[start:start + job.rows]
            start += job.rows
            if job.topk < topk:
                for row in mine:
                    row.top_ids = [t[:job.topk] for t in row.top_ids] if job.topk else None
                    row.top_logprobs = [t[:job.topk] for t in row.top_logprobs] if job.topk else None
            if not job.future.done():
                job.future.set_result(mine)


def clean_logprob(value: float) -> float:
    """JSON has no -inf: clamp at vLLM's floor of -9999.0."""
    return max(value, -9999.0) if math.isfinite(value) or value < 0 else -9999.0
