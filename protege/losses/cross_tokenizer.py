"""Cross-tokenizer distillation losses over aligned byte spans (protege.teacher.align).

Notation: a completion y is cut into spans c_1..c_S that cover the same bytes for the student (q) and
the teacher (p). For a span c with student tokens y_a..y_b and teacher tokens u_1..u_m,
    log q(c) = sum_{t=a..b} log q(y_t | y_<t),      log p(c) = sum_j log p(u_j | u_<j)
both conditioned on the same text before c (each in its own tokenization). A 1:1 span (one token on
each side) is a position where the two models predict the same bytes as one token each.

span_pg_loss (loss.cross_tokenizer=span): the span-level sampled estimator. A_c = log p(c) - log q_old(c)
    is given to every student token of c: loss_t = -rho_t * A_c(t) (rho_t = q/q_old, A constant).
    Both logprobs are of each model's *canonical* path of c's text (its tokenizer's own encoding): the
    teacher re-tokenizes, and on a row the student reached by another path, log q_old(c) is its canonical
    path's (span_student_logprobs, one no-grad forward). This is the score-function gradient of the reverse
    KL between the two models' *text* distributions, sum_s q(s) log q(s)/p(s), with each text's probability
    taken as its canonical path's: grad KL = E_{y~q}[grad log q(y) (log q(s(y)) - log p(s(y)))] exactly
    (q(s) = sum over the paths y of s), and log q(s) ~ log q(canonical(s)) where one path dominates. With
    the sampled path's own log q_old(y) instead, the objective E_q[log q(y) - log p(s(y))] equals the
    text KL minus the entropy of the path given the text, so it rewards spreading mass over tokenizations,
    and an identical teacher gets A != 0 on every non-canonical row.
    Exact for: on 1:1 spans it *is* protege's sampled_pg (A_t = log p(y_t) - log q_old(y_t)); the sum
    over a sequence of A_c is log p(y) - log q(y), so its expectation is the sequence-level reverse KL's
    single-sample estimate; for a token inside a multi-token span, the part of A_c from earlier tokens
    of c has zero mean under the score function, so the estimator stays unbiased for the gradient of
    sum_c E_q[ log q(c) - log p(c) ] with each token's reward running to its span's end. Needs only
    token logprobs from the teacher: works through any server that returns them.
uld_loss (uld): GOLD's Universal Logit Distillation on a span, with GOLD's "observed" merge: the
    distribution at the span's first position times the probability of the span's later actual tokens,
    P_s = q(.|first) * q(rest), P_t = p(.|first) * p(rest), loss = sum_i |sort(P_s)_i - sort(P_t)_i|.
    Over the top-K (the teacher sends K) plus one tail entry |tail_s - tail_t|: a lower bound of the
    full sorted L1 (triangle inequality) that equals GOLD's full-vocabulary value when K covers both
    vocabularies.
hybrid_loss (hybrid): GOLD's hybrid on a 1:1 span: w * D(q, p) over the teacher's top-K ids that have a
    student token with the same bytes (plus a tail bucket) + (1 - w) * sorted L1 over the rest of the
    top-K; w = share of the teacher's vocabulary matched (GOLD's adaptive weight). Other spans: uld_loss.
The shared top-K loss (shared_topk) is topk_divergence over the mapped ids, with unmatched ids left
out (their mass goes to the tail bucket): exactly the same-tokenizer teacher top-K loss when both
tokenizers are the same. Across different vocabularies it compares different events where one side has
longer tokens with the matched bytes as a prefix (docs/cross_tokenizer.md, Limits).
next_byte_loss (next_byte): at a span start both models have read the same text and stand at a token
    boundary, so "the next byte of text is b" is the same event for both. Its probability is the sum of
    the probabilities of the tokens whose text begins with b:
        P_q(b) = sum_{v : byte0(v) = b} q(v | text),   b in 0..255, plus EOS (the tokens that end the
        turn) and OTHER (any other special or empty token): C = 258 categories,
    and P_p(b) the same over the teacher's top-K (its tail mass, 1 - sum of the top-K, is one bucket). The
    loss is the divergence `name` between the two C-way distributions over the bytes the teacher's top-K
    reaches + a tail bucket (topk_divergence's "bucket" tail). Exact for any pair of tokenizers when the
    teacher's top-K holds all of its mass (K >= its vocabulary); with a smaller K, the teacher's mass
    outside its top-K is one tail bucket, compared with the student's mass on the bytes the top-K does not
    reach (approximate where those tokens start with a byte the top-K reaches). The temperature applies to
    token logits before the sum over tokens.
"""

from __future__ import annotations

import torch

from .sampled import sampled_token_pg_loss
from .topk import topk_divergence


def span_sums(values: torch.Tensor, span_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): the sum of `values` over each token's span (within its row), on every token.
    Differentiable in `values`; span_index (B, T) int64 < T."""
    b, t = values.shape
    flat = (torch.arange(b, device=values.device)[:, None] * t + span_index).reshape(-1)  # (B*T,)
    v = torch.where(mask, values, torch.zeros_like(values)).reshape(-1)
    sums = torch.zeros(b * t, dtype=values.dtype, device=values.device).index_add(0, flat, v)
    return sums[flat].reshape(b, t)


def span_pg_loss(student_token_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, span_index: torch.Tensor,
                 span_teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                 span_student_logprobs: torch.Tensor | None = None, **pg) -> torch.Tensor:
    """(B, T) span-level sampled loss -rho_t * A_c (module docstring); pg: sampled_token_pg_loss options.

    A_c = span_teacher_logprobs - log q_old(c) is handed to sampled_token_pg_loss as a teacher logprob
    log q_old(y_t) + A_c, so its ratio, clip, scale and discount options apply unchanged.
    span_student_logprobs (B, T): log q_old(c) of the canonical path of each token's span; None: the
    sampled tokens' own (the same on canonical rows)."""
    mask = mask.bool()
    old = sampling_logprobs.detach().float()
    base = span_sums(old, span_index, mask) if span_student_logprobs is None else span_student_logprobs.float()
    advantage = span_teacher_logprobs.float() - base  # (B, T) A_c
    return sampled_token_pg_loss(student_token_logprobs, old, old + advantage, mask, **pg)


def _sorted_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i |sort(a)_i - sort(b)_i| over the last dim, descending, the shorter padded with zeros."""
    k = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a.sort(-1, descending=True).values, (0, k - a.shape[-1]))
    b = torch.nn.functional.pad(b.sort(-1, descending=True).values, (0, k - b.shape[-1]))
    return (a - b).abs().sum(-1)


def uld_loss(student_logprobs: torch.Tensor, student_rest: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
             teacher_rest: torch.Tensor) -> torch.Tensor:
    """(n, V_s), (n,), (n, K), (n,) -> (n,) ULD with GOLD's observed merge, top-K + tail (module docstring).

    student_logprobs: log q(.|first) over the student's vocabulary; student_rest: log q of the span's later
    tokens (both may carry gradients); teacher_topk_logprobs: log p of its top-K at the first position
    (-inf padding allowed); teacher_rest: log p of its later tokens."""
    k = min(teacher_topk_logprobs.shape[-1], student_logprobs.shape[-1])
    s_top = (student_logprobs.topk(k, -1).values + student_rest[:, None]).exp()  # (n, k)
    t_top = (teacher_topk_logprobs.float() + teacher_rest[:, None].float()).exp()  # (n, K)
    s_tail = (student_rest.exp() - s_top.sum(-1)).clamp(min=0)  # (n,)
    t_tail = (teacher_rest.float().exp() - t_top.sum(-1)).clamp(min=0)
    return _sorted_l1(s_top, t_top) + (s_tail - t_tail).abs()


def hybrid_loss(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor, mapped_ids: torch.Tensor,
                student_matched: torch.Tensor, matched_weight: float, *, name: str, beta: float = 0.5,
                alpha: float = 0.1, temperature: float = 1.0) -> torch.Tensor:
    """(n, V_s) logits, (n, K), (n, K) student ids or -1, (V_s,) bool, w -> (n,): GOLD's hybrid on 1:1 spans.

    w * D over the matched top-K ids (tail bucket) + (1 - w) * sorted L1 between the teacher's unmatched
    top-K probabilities and the student's top-K probabilities over unmatched student ids."""
    matched = mapped_ids >= 0  # (n, K)
    d = topk_divergence(student_logits[None], mapped_ids.clamp(min=0)[None], teacher_topk_logprobs[None],
                        name=name, tail="bucket", support_mask=matched[None], beta=beta, alpha=alpha,
                        temperature=temperature)[0]  # (n,)
    log_q = torch.log_softmax(student_logits.float() / temperature, -1)
    k = teacher_topk_logprobs.shape[-1]
    s_un = log_q.masked_fill(student_matched[None], float("-inf")).topk(min(k, log_q.shape[-1]), -1).values.exp()
    t_un = torch.where(matched, torch.zeros_like(teacher_topk_logprobs), teacher_topk_logprobs.float().exp())
    return matched_weight * d + (1 - matched_weight) * _sorted_l1(s_un, t_un)


BYTE_CATEGORIES = 258  # 256 byte values, EOS (256), OTHER (257)
EOS_BYTE, OTHER_BYTE = 256, 257


def next_byte_loss(student_logits: torch.Tensor, student_bytes: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                   teacher_topk_bytes: torch.Tensor, *, name: str, beta: float = 0.5, alpha: float = 0.1,
                   temperature: float = 1.0, scale_by_temperature_squared: bool = False) -> torch.Tensor:
    """(n, V_s) logits, (V_s,) category of each student id, (n, K) teacher top-K logprobs (at `temperature`,
    -inf padding), (n, K) category of each of those teacher ids -> (n,) divergence of the next-byte
    distributions (module docstring)."""
    n = student_logits.shape[0]
    q = torch.softmax(student_logits.float() / temperature, -1)  # (n, V_s)
    q_bytes = torch.zeros(n, BYTE_CATEGORIES, dtype=q.dtype, device=q.device).index_add(1, student_bytes, q)  # (n, C)
    p_top = teacher_topk_logprobs.float().exp()  # (n, K), 0 at -inf padding
    cats = teacher_topk_bytes.clamp(min=0)
    present = torch.zeros(n, BYTE_CATEGORIES, dtype=torch.bool, device=q.device)
    present.scatter_(1, cats, (p_top > 0) & (teacher_topk_bytes >= 0))
    p_bytes = torch.zeros(n, BYTE_CATEGORIES, dtype=q.dtype, device=q.device).scatter_add(1, cats, p_top)  # (n, C)
    ids = torch.arange(BYTE_CATEGORIES, device=q.device).expand(n, -1)
    tiny = torch.finfo(q.dtype).tiny
    out = topk_divergence(q_bytes.clamp(min=tiny).log()[None], ids[None], p_bytes.clamp(min=tiny).log()[None],
                          name=name, tail="bucket", support_mask=present[None], beta=beta, alpha=alpha)[0]  # (n,)
    return out * temperature ** 2 if scale_by_temperature_squared else out


__all__ = ["span_sums", "span_pg_loss", "uld_loss", "hybrid_loss", "next_byte_loss", "BYTE_CATEGORIES"]
