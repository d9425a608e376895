"""Per-position divergences between a teacher p and a student q over one set of categories.

All functions take *log*-probabilities and sum over the last dimension:

    forward_kl        KL(p||q)  = sum_c p_c (log p_c - log q_c)
    reverse_kl        KL(q||p)  = sum_c q_c (log q_c - log p_c)
    jsd               beta * KL(p||M) + (1-beta) * KL(q||M),  M = beta*p + (1-beta)*q   (0 < beta < 1)
                      beta == 0 -> KL(p||q), beta == 1 -> KL(q||p)  (TRL's GKD convention, see below)
    tvd               0.5 * sum_c |p_c - q_c|
    skew_forward_kl   KL(p || alpha*p + (1-alpha)*q)   (DistiLLM SKL)
    skew_reverse_kl   KL(q || alpha*q + (1-alpha)*p)   (DistiLLM SRKL)

Zero mass is exact: a category with probability 0 (log-prob -inf, or an exp that underflows)
contributes 0 * log 0 = 0, with zero gradient and no NaN anywhere in forward or backward.
A category where the first KL argument has mass and the second has none gives +inf, the true value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import (
    DIVERGENCES,
    check_divergence_args,
    check_no_nan,
    check_same_shape,
    check_temperature,
    compute_dtype,
)

NEG_INF = float("-inf")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a||b) = sum_c a_c (log a_c - log b_c) over the last dim, with 0 * log(0 / x) = 0.

    Inputs are sanitised *before* the product so that the branch torch.where discards is
    finite: otherwise its NaN would reach the gradient (0 * nan = nan in the backward pass).
    """
    a = log_a.exp()  # (..., C)
    has_mass = a > 0  # exp underflow (log a < ~-745 in fp64) counts as zero mass
    log_a = torch.where(has_mass, log_a, 0.0)
    log_b = torch.where(has_mass, log_b, 0.0)
    return torch.where(has_mass, a * (log_a - log_b), 0.0).sum(-1)  # (...)


def _log_mix(w: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(w * a + (1 - w) * b) elementwise, exact at w in {0, 1} and NaN-free where a = b = 0."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    both_zero = (log_a == NEG_INF) & (log_b == NEG_INF)  # logaddexp(-inf, -inf) has a NaN gradient
    log_a = torch.where(both_zero, 0.0, log_a)
    log_b = torch.where(both_zero, 0.0, log_b)
    mixed = torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))
    return torch.where(both_zero, NEG_INF, mixed)


def _soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / tau, without a (B, T, V) copy when tau == 1."""
    return logits if temperature == 1.0 else logits / temperature


def divergence(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    name: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    category_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence `name` between teacher p and student q at every position: (..., C) x2 -> (...).

    student_logprobs, teacher_logprobs: (..., C) normalised log-distributions over the same C
    categories; -inf allowed. category_mask (..., C) bool: False categories are ignored, i.e. given
    probability 0 in both (no renormalisation). Arithmetic runs in at least float32.

    jsd endpoints: the interior formula tends to 0 as beta -> 0 or 1 (M collapses onto p or q),
    but, like TRL's GKDTrainer.generalized_jsd_loss, beta == 0 returns forward KL(p||q) and
    beta == 1 reverse KL(q||p). The value therefore *jumps* at the two ends; choose
    name="forward_kl"/"reverse_kl" when you mean them.
    """
    check_divergence_args(name, beta, alpha)
    check_same_shape(student_logprobs, teacher_logprobs, "student_logprobs", "teacher_logprobs")
    check_no_nan(teacher_logprobs)
    dtype = compute_dtype(student_logprobs)
    log_q = student_logprobs.to(dtype)  # (..., C)
    log_p = teacher_logprobs.to(dtype)  # (..., C)
    if category_mask is not None:
        check_same_shape(category_mask, log_q, "category_mask", "student_logprobs")
        category_mask = category_mask.bool()
        log_q = torch.where(category_mask, log_q, NEG_INF)
        log_p = torch.where(category_mask, log_p, NEG_INF)

    if name == "forward_kl" or (name == "jsd" and beta == 0):
        return _kl(log_p, log_q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return _kl(log_q, log_p)
    if name == "jsd":
        log_m = _log_mix(float(beta), log_p, log_q)  # M = beta*p + (1-beta)*q
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if name == "skew_forward_kl":
        return _kl(log_p, _log_mix(float(alpha), log_p, log_q))  # KL(p || a*p + (1-a)*q)
    assert name == "skew_reverse_kl", name
    return _kl(log_q, _log_mix(float(alpha), log_q, log_p))  # KL(q || a*q + (1-a)*p)


def dense_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    name: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    teacher_is_logprobs: bool = False,
) -> torch.Tensor:
    """Full-vocabulary divergence at every position: (B, T, V) x2 -> (B, T).

    q = softmax(z_S / tau), p = softmax(z_T / tau). With teacher_is_logprobs the teacher input is
    log p_T at tau = 1 and p = log_softmax(log p_T / tau) (identical to softmax(z_T / tau)).
    scale_by_temperature_squared multiplies by tau^2 (Hinton et al. 2015: keeps the gradient
    magnitude of a softened KL independent of tau). TRL's GKD does not apply tau^2.
    """
    check_divergence_args(name, beta, alpha)
    check_temperature(temperature)
    check_same_shape(
        student_logits, teacher_logits, "student_logits", "teacher_logprobs" if teacher_is_logprobs else "teacher_logits"
    )
    check_no_nan(teacher_logits, "teacher logprobs" if teacher_is_logprobs else "teacher logits")
    dtype = compute_dtype(student_logits)
    log_q = F.log_softmax(_soften(student_logits.to(dtype), temperature), dim=-1)  # (B, T, V)
    log_p = F.log_softmax(_soften(teacher_logits.to(dtype), temperature), dim=-1)  # (B, T, V)
    loss = divergence(log_q, log_p, name=name, beta=beta, alpha=alpha)  # (B, T)
    return loss * temperature**2 if scale_by_temperature_squared else loss


__all__ = ["DIVERGENCES", "divergence", "dense_divergence"]
