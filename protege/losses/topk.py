"""Top-k divergences: the same divergences over a small support S of token ids per position.

Support choices (REFERENCE.md section 4): teacher top-k for forward KL, student top-k for reverse
KL, their union for JSD, the sampled token alone for the estimators of sampled.py.

Given log q_S and log p_S, each model's logprobs at the ids of S (normalised over the full
vocabulary), two ways to turn them into distributions:

    tail="bucket"       categories S + {"everything else"}; the extra category has mass
                        1 - sum_{v in S} exp(lp_v), computed as log(-expm1(logsumexp(lp_S))) and
                        floored at the dtype's eps (see _log_tail). With S = the vocabulary this is
                        the dense divergence; with k = 1 it is a binary divergence (token vs rest).
    tail="renormalize"  log_softmax over S only: the divergence of the two conditionals on S.
                        Ignores how much mass each model puts outside S; with k = 1 it is always 0.
"""

from __future__ import annotations

import torch

from ._checks import (
    TAIL_MODES,
    check_divergence_args,
    check_no_nan,
    check_same_shape,
    check_temperature,
)
from .divergences import NEG_INF, apply_divergence
from .sampled import gather_logprobs


def union_support(ids_a: torch.Tensor, ids_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of two supports: (B, T, Ka), (B, T, Kb) -> ids (B, T, Ka+Kb), mask (B, T, Ka+Kb).

    The ids are simply concatenated; an entry whose id already occurred earlier in the same
    position (including repeats inside ids_a or ids_b) gets mask False, so each id counts once.
    """
    if ids_a.shape[:-1] != ids_b.shape[:-1]:
        raise ValueError(
            f"ids_a has shape {tuple(ids_a.shape)} but ids_b has shape {tuple(ids_b.shape)}; "
            "expected equal leading (B, T) dimensions"
        )
    ids = torch.cat([ids_a, ids_b], dim=-1).long()  # (B, T, K)
    k = ids.shape[-1]
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # (B, T, K, K): same[..., i, j] = ids_i == ids_j
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)  # j < i
    duplicate = (same & earlier).any(-1)  # (B, T, K)
    return ids, ~duplicate


def sampled_token_support(completion_ids: torch.Tensor) -> torch.Tensor:
    """The sampled token as a one-id support: (B, T) -> (B, T, 1)."""
    return completion_ids.long().unsqueeze(-1)


def _log_tail(log_s: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_{v in S} exp(log_s_v)): (..., K) -> (..., 1), finite, with finite gradients.

    The tail mass is floored at eps = torch.finfo(dtype).eps. Why: 1 - sum has an absolute
    rounding error of about eps, so below it the value is noise; and a mass of exactly 1 on S
    (K = V, or a one-hot model) would give log 0 = -inf on one side only, hence an infinite KL
    and NaN gradients, from pure rounding. With the floor two such tails are both eps and cancel.
    Below the floor the tail gets no gradient. Rows with no support entry give a tail of log 1 = 0.
    """
    empty = ~(log_s > NEG_INF).any(-1, keepdim=True)  # (..., 1) logsumexp(-inf...) has a NaN gradient
    lse = torch.logsumexp(torch.where(empty, 0.0, log_s), dim=-1, keepdim=True)  # (..., 1)
    lse = torch.where(empty, NEG_INF, lse)
    eps = torch.finfo(log_s.dtype).eps
    return (-torch.expm1(lse)).clamp(min=eps).log()  # (..., 1)


def _log_renormalize(log_s: torch.Tensor) -> torch.Tensor:
    """log_softmax over the support, NaN-free for rows whose support is empty: (..., K) -> (..., K)."""
    empty = ~(log_s > NEG_INF).any(-1, keepdim=True)  # (..., 1)
    lse = torch.logsumexp(torch.where(empty, 0.0, log_s), dim=-1, keepdim=True)  # (..., 1)
    return log_s - torch.where(empty, 0.0, lse)  # (..., K), -inf stays -inf


def topk_divergence(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_support_logprobs: torch.Tensor,
    *,
    name: str,
    tail: str = "bucket",
    support_mask: torch.Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
) -> torch.Tensor:
    """Divergence `name` over a per-position support S: (B, T, V), (B, T, K), (B, T, K) -> (B, T).

    student_logits: raw logits; log q = log_softmax(z_S / tau) over the full vocabulary, gathered
    at support_ids. teacher_support_logprobs: log p at the same ids, already at temperature tau and
    normalised over the full vocabulary (what a teacher server returns). support_mask (B, T, K)
    bool: False entries (padding, duplicates of a union) are left out of S and of the tail sums,
    and their ids are not range-checked. tail: "bucket" or "renormalize" (module docstring).
    scale_by_temperature_squared multiplies by tau^2, as in dense_divergence.
    """
    check_divergence_args(name, beta, alpha)
    check_temperature(temperature)
    if tail not in TAIL_MODES:
        raise ValueError(f"tail={tail!r} is not a known tail mode; expected one of {', '.join(TAIL_MODES)}")
    check_same_shape(support_ids, teacher_support_logprobs, "support_ids", "teacher_support_logprobs")
    if support_ids.dim() != student_logits.dim() or support_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but support_ids has shape "
            f"{tuple(support_ids.shape)}; expected support_ids of shape (*student_logits.shape[:-1], K)"
        )
    if support_mask is None:
        support_mask = torch.ones_like(support_ids, dtype=torch.bool)
    check_same_shape(support_mask, support_ids, "support_mask", "support_ids")
    support_mask = support_mask.bool()
    check_no_nan(torch.where(support_mask, teacher_support_logprobs, 0.0))
    vocab = student_logits.shape[-1]
    if support_ids.numel() and bool((((support_ids < 0) | (support_ids >= vocab)) & support_mask).any()):
        raise ValueError(f"support_ids out of range; expected 0 <= id < vocab size {vocab} wherever support_mask")

    ids = torch.where(support_mask, support_ids.long(), 0)  # (B, T, K), masked ids made gatherable
    log_q = gather_logprobs(student_logits, ids, temperature)  # (B, T, K)
    log_p = teacher_support_logprobs.to(log_q.dtype)  # (B, T, K)
    log_q = torch.where(support_mask, log_q, NEG_INF)
    log_p = torch.where(support_mask, log_p, NEG_INF)
    if tail == "bucket":
        log_q = torch.cat([log_q, _log_tail(log_q)], dim=-1)  # (B, T, K+1)
        log_p = torch.cat([log_p, _log_tail(log_p)], dim=-1)  # (B, T, K+1)
    else:
        log_q, log_p = _log_renormalize(log_q), _log_renormalize(log_p)  # (B, T, K)
    loss = apply_divergence(log_q, log_p, name, beta, alpha)  # (B, T)
    return loss * temperature**2 if scale_by_temperature_squared else loss


__all__ = [
    "union_support",
    "sampled_token_support",
    "topk_divergence",
]
