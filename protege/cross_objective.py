"""The per-token loss of a cross-tokenizer run (loss.cross_tokenizer), called by protege.objective.

The teacher's answer arrives per aligned span on the student's positions (TeacherSignal.cross, see
protege.teacher.cross_tokenizer); the math of each loss is in protege.losses.cross_tokenizer.

  span         every token: span-level sampled estimator (student rollouts)
  shared_topk  1:1 spans: the divergence loss.name over the teacher's top-K mapped into the student's
               vocabulary + tail bucket (= the same-tokenizer teacher top-K loss when the tokenizers are
               the same); other spans of student rollouts: the span estimator
  uld          each span, at its first student token: GOLD's ULD (observed merge), top-K + tail
  hybrid       1:1 spans: GOLD's hybrid (matched divergence + sorted L1 on the rest); other spans: ULD
Tokens of no span (a trailing remainder the teacher could not match) get no loss.
"""

from __future__ import annotations

import torch

from protege import losses as L
from protege.losses.cross_tokenizer import hybrid_loss, span_pg_loss, span_sums, uld_loss
from protege.records import Rollouts, TeacherSignal

MODES = ("span", "shared_topk", "uld", "hybrid")


def teacher_topk(mode: str, top_k: int) -> int:
    """k of the teacher top-K a mode reads (0: token logprobs only)."""
    return 0 if mode == "span" else top_k


def cross_per_token_loss(loss, mode: str, student_hidden: torch.Tensor, student_weight: torch.Tensor, mb: Rollouts,
                         signal: TeacherSignal, sampling_temperature: float) -> torch.Tensor:
    """(B, T) per-token loss of one micro-batch; `loss` is the run's LossConfig."""
    cross = signal.cross
    if cross is None:
        raise ValueError("loss.cross_tokenizer needs a cross-tokenizer teacher's signal (TeacherSignal.cross)")
    dev = student_hidden.device
    mask = mb.completion_mask.to(dev) & cross.valid.to(dev)  # (B, T)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=dev)  # (B, T)
    if mode == "span":
        return _span(loss, student_hidden, student_weight, mb, cross, mask, sampling_temperature, require=True)
    one = cross.one_to_one.to(dev) & mask  # (B, T)
    if mode == "shared_topk":
        out = out.masked_scatter(one, _shared_topk(loss, student_hidden[one], student_weight, cross, one))
        if mb.sampling_logprobs is not None:
            rest = _span(loss, student_hidden, student_weight, mb, cross, mask & ~one, sampling_temperature)
            out = out + rest
        return out
    firsts = cross.first.to(dev) & mask
    if mode == "hybrid":
        out = out.masked_scatter(one, _hybrid(loss, student_hidden[one], student_weight, cross, one))
        firsts = firsts & ~one
    return out + _uld(loss, student_hidden, student_weight, mb, cross, mask, firsts)


def _token_logprobs(hidden, weight, tokens, temperature: float, chunk: int, fused: bool) -> torch.Tensor:
    fn = lambda logits, ids: L.token_logprobs_from_logits(logits.float(), ids, temperature=temperature)  # noqa: E731
    return L.chunked_loss_from_hidden(hidden, weight, fn, tokens, chunk_size=chunk, fused=fused)


def _span(loss, hidden, weight, mb, cross, mask, temperature, require: bool = False) -> torch.Tensor:
    if mb.sampling_logprobs is None:
        if require:
            raise ValueError("loss.cross_tokenizer=span needs sampling logprobs: only student rollouts have them "
                             "(mix.lmbda=1)")
        return torch.zeros(mask.shape, device=hidden.device)
    dev = hidden.device
    tokens = mb.completion_ids.to(dev)[mask]
    lp = _token_logprobs(hidden[mask], weight, tokens, temperature, loss.chunk_size, False)  # (n,)
    full = torch.zeros(mask.shape, dtype=lp.dtype, device=dev).masked_scatter(mask, lp)  # (B, T)
    return span_pg_loss(full, mb.sampling_logprobs.to(dev), cross.span_index.to(dev), cross.span_logprobs.to(dev),
                        mask, reward_scale=loss.reward_scale, ratio_clip=loss.ratio_clip, discount=loss.discount)


def _shared_topk(loss, h, weight, cross, one) -> torch.Tensor:
    ids = cross.topk_ids.to(h.device)[one][:, : loss.top_k]  # (n, K)
    lps = cross.topk_logprobs.to(h.device)[one][:, : loss.top_k]  # (n, K)

    def fn(logits, ids_c, lps_c):
        keep = ids_c >= 0
        return L.topk_divergence(logits.float()[None], ids_c.clamp(min=0)[None], lps_c.float()[None], name=loss.name,
                                 tail=loss.tail, support_mask=keep[None], beta=loss.beta, alpha=loss.alpha,
                                 temperature=loss.temperature,
                                 scale_by_temperature_squared=loss.scale_temperature_squared)[0]
    return L.chunked_loss_from_hidden(h, weight, fn, ids, torch.where(ids >= 0, lps, 0.0), chunk_size=loss.chunk_size,
                                      fused=loss.fused)


def _hybrid(loss, h, weight, cross, one) -> torch.Tensor:
    ids = cross.topk_ids.to(h.device)[one][:, : loss.top_k]  # (n, K)
    lps = cross.topk_logprobs.to(h.device)[one][:, : loss.top_k]  # (n, K)
    matched = cross.student_matched.to(h.device)  # (V_s,)

    def fn(logits, ids_c, lps_c):
        return hybrid_loss(logits, lps_c, ids_c, matched, cross.matched_share, name=loss.name, beta=loss.beta,
                           alpha=loss.alpha, temperature=loss.temperature)
    return L.chunked_loss_from_hidden(h, weight, fn, ids, lps, chunk_size=loss.chunk_size, fused=False)


def _uld(loss, hidden, weight, mb, cross, mask, firsts) -> torch.Tensor:
    """ULD at each span's first student token (observed merge: the span's later student tokens' logprobs,
    with gradients, scale the first position's distribution)."""
    dev = hidden.device
    out = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
    if not bool(firsts.any()):
        return out
    later = mask & ~cross.first.to(dev)  # (B, T) 2nd.. tokens of multi-token spans
    rest = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
    if bool(later.any()):
        lp = _token_logprobs(hidden[later], weight, mb.completion_ids.to(dev)[later], loss.temperature,
                             loss.chunk_size, False)  # (m,)
        per = torch.zeros(mask.shape, dtype=lp.dtype, device=dev).masked_scatter(later, lp)
        rest = span_sums(per, cross.span_index.to(dev), later)  # (B, T) on every token
    t_top = cross.topk_logprobs.to(dev)[firsts][:, : loss.top_k]  # (n, K)
    t_rest = cross.rest_logprobs.to(dev)[firsts]  # (n,)

    def fn(logits, s_rest, t_top_c, t_rest_c):
        return uld_loss(torch.log_softmax(logits.float() / loss.temperature, -1), s_rest, t_top_c, t_rest_c)
    values = L.chunked_loss_from_hidden(hidden[firsts], weight, fn, rest[firsts], t_top, t_rest,
                                        chunk_size=loss.chunk_size, fused=False)
    return out.masked_scatter(firsts, values.float())
