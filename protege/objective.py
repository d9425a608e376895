"""From a micro-batch, the student's hidden states and the teacher's signal to per-token losses.

This is the glue between the trainer and the pure functions of protege.losses. It decides what
the teacher must send for a loss configuration (`teacher_request`) and evaluates the loss over the
flattened completion positions of a micro-batch (`per_token_loss`), chunk by chunk, so neither
model's (positions, vocab) logits exist at once.

  support=full     exact divergence over the vocabulary; teacher logits rebuilt per chunk from its
                   cached hidden states (in-process teacher only)
  support=teacher  teacher top-k ids; student=student top-k; union=both; sampled=the sampled token;
                   each over k categories + a tail bucket (or renormalised, loss.tail)
  sampled_pg       -rho_t * A_t with A_t = log p(y_t) - log q_old(y_t) (OPD as RL)
  sft              -log q(y_t): cross-entropy on the rows' tokens (e.g. teacher samples)
"""

from __future__ import annotations

import torch

from protege import losses as L
from protege.config import LossConfig
from protege.teacher.base import ScoreRequest
from protege.records import Rollouts, TeacherSignal


def teacher_request(cfg: LossConfig, *, local: bool, rollouts: Rollouts | None = None) -> ScoreRequest:
    """What to ask the teacher for: exactly what the configured loss reads, nothing more."""
    if cfg.name in ("sampled_pg", "sft") or cfg.support == "sampled":
        return ScoreRequest(temperature=cfg.temperature)
    if local:  # exact: everything is rebuilt from hidden states inside the loss chunks
        return ScoreRequest(hidden=True, temperature=cfg.temperature)
    topk = cfg.top_k if cfg.support in ("teacher", "union") else 0
    query = None
    if cfg.support in ("student", "union"):
        if rollouts is None or rollouts.student_topk_ids is None:
            raise ValueError("loss.support=student|union with a remote teacher needs the student's top-k ids")
        query = rollouts.student_topk_ids[..., : cfg.top_k]
    return ScoreRequest(topk=topk, query_ids=query, temperature=cfg.temperature)


def per_token_loss(cfg: LossConfig, student_hidden: torch.Tensor, student_weight: torch.Tensor, mb: Rollouts,
                   signal: TeacherSignal, sampling_temperature: float) -> torch.Tensor:
    """(B, T) per-token loss of one micro-batch; 0 where the completion mask is False.

    student_hidden (B, T, H) with grad; student_weight (V, H); signal already cut to (B, T, ...)."""
    mask = mb.completion_mask.to(student_hidden.device)  # (B, T)
    h = student_hidden[mask]  # (n, H), n = tokens in this micro-batch
    tokens = mb.completion_ids.to(h.device)[mask]  # (n,)
    flat = lambda x: None if x is None else x.to(h.device)[mask]  # noqa: E731  (B, T, ...) -> (n, ...)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)  # (B, T)
    tau, chunk, fused = cfg.temperature, cfg.chunk_size, cfg.fused  # fused: values summed with one weight

    if cfg.name == "sft":
        values = -L.chunked_loss_from_hidden(h, student_weight, _token_logprob(1.0), tokens, chunk_size=chunk,
                                             fused=fused)
    elif cfg.name == "sampled_pg":
        if mb.sampling_logprobs is None:
            raise ValueError("loss.name=sampled_pg needs sampling logprobs: only student rollouts have them")
        student_lp = L.chunked_loss_from_hidden(h, student_weight, _token_logprob(sampling_temperature), tokens,
                                                chunk_size=chunk)  # (n,)
        full = torch.zeros(mask.shape, dtype=student_lp.dtype, device=h.device).masked_scatter(mask, student_lp)
        return L.sampled_token_pg_loss(full, mb.sampling_logprobs.to(h.device), signal.token_logprobs.to(h.device),
                                       mask, reward_scale=cfg.reward_scale, ratio_clip=cfg.ratio_clip,
                                       discount=cfg.discount)
    elif cfg.support == "sampled":
        fn = _topk_fn(cfg)
        values = L.chunked_loss_from_hidden(h, student_weight, fn, tokens[:, None], flat(signal.token_logprobs)[:, None],
                                            None, chunk_size=chunk, fused=fused)
    elif signal.hidden_states is not None:  # in-process teacher: exact logits per chunk
        t_hidden, t_weight = flat(signal.hidden_states), signal.lm_head.to(h.device)
        if cfg.support == "full":
            values = L.chunked_dense_divergence(h, student_weight, teacher_hidden=t_hidden.to(t_weight.dtype),
                                                teacher_weight=t_weight, name=cfg.name, beta=cfg.beta,
                                                alpha=cfg.alpha, temperature=tau,
                                                scale_by_temperature_squared=cfg.scale_temperature_squared,
                                                chunk_size=chunk, fused=fused)
        else:
            values = L.chunked_loss_from_hidden(h, student_weight, _local_topk_fn(cfg, t_weight), t_hidden, tokens,
                                                chunk_size=chunk, fused=fused)
    else:  # remote teacher: support ids and teacher logprobs at them were sent
        ids, lps, smask = _remote_support(cfg, signal, mb)
        values = L.chunked_loss_from_hidden(h, student_weight, _topk_fn(cfg), flat(ids),
                                            flat(lps), flat(smask), chunk_size=chunk, fused=fused)
    return out.masked_scatter(mask, values.float())


def _token_logprob(temperature: float):
    def fn(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return L.token_logprobs_from_logits(logits.float(), tokens, temperature=temperature)
    return fn


def _topk_fn(cfg: LossConfig):
    def fn(logits: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor, smask: torch.Tensor | None):
        return L.topk_divergence(logits.float()[None], ids[None], teacher_lp.float()[None], name=cfg.name,
                                 tail=cfg.tail, support_mask=None if smask is None else smask[None], beta=cfg.beta,
                                 alpha=cfg.alpha, temperature=cfg.temperature,
                                 scale_by_temperature_squared=cfg.scale_temperature_squared)[0]
    return fn


def _local_topk_fn(cfg: LossConfig, teacher_weight: torch.Tensor):
    """Top-k supports with an in-process teacher: the teacher's full logprobs exist per chunk."""
    topk = _topk_fn(cfg)

    def fn(logits: torch.Tensor, t_hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_lp = torch.log_softmax(L.dense_teacher_chunk(t_hidden, teacher_weight).float() / cfg.temperature, -1)
            k = cfg.top_k
            if cfg.support == "teacher":
                ids, smask = t_lp.topk(k, -1).indices, None
            elif cfg.support == "student":
                ids, smask = logits.detach().topk(k, -1).indices, None
            else:  # union
                ids, smask = L.union_support(t_lp.topk(k, -1).indices, logits.detach().topk(k, -1).indices)
        return topk(logits, ids, t_lp.gather(-1, ids), smask)
    return fn


def _remote_support(cfg: LossConfig, signal: TeacherSignal, mb: Rollouts):
    """(ids, teacher logprobs, mask) over the support, each (B, T, K), from what a server sent."""
    k = cfg.top_k  # the signal may hold more (diagnostics); top-k lists are sorted, so cut
    if cfg.support == "teacher":
        return signal.topk_ids[..., :k], signal.topk_logprobs[..., :k], None
    if cfg.support == "student":
        return mb.student_topk_ids[..., :k], signal.query_logprobs, None
    if cfg.support == "union":
        ids, smask = L.union_support(signal.topk_ids[..., :k], mb.student_topk_ids[..., :k])
        return ids, torch.cat([signal.topk_logprobs[..., :k], signal.query_logprobs], -1), smask
    raise ValueError(f"loss.support={cfg.support} needs an in-process teacher (teacher.path)")
