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


def _plogratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, plus: float = 0.0) -> torch.Tensor:
    """a * (log a - log b + plus) elementwise, exactly 0 where a == 0 (0 * log 0 = 0, no NaN)."""
    out = log_a - log_b  # (..., C); nan where both are -inf, masked below
    if plus:
        out.add_(plus)
    return out.mul_(a).masked_fill_(a == 0, 0.0)


def _log_mix(w: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(w * a + (1 - w) * b) for 0 < w < 1; -inf where a = b = 0."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


class _Divergence(torch.autograd.Function):
    """Per-position divergence with closed-form gradients w.r.t. both log-probability inputs.

    Autograd through the plain formulas would need NaN guards (torch.where on both sides of
    every product) and keep ~10 (..., C) intermediates; here the forward keeps only the two
    inputs (the same tensors log_softmax already saved) and the backward recomputes
    p = exp(lp), q = exp(lq), log M. With l* the log-probs treated as free coordinates:

        forward_kl  d/dlq = -p                          d/dlp = p (lp - lq + 1)
        reverse_kl  d/dlq = q (lq - lp + 1)             d/dlp = -q
        jsd         d/dlq = (1-beta) q (lq - lm)        d/dlp = beta p (lp - lm)    m = beta p + (1-beta) q
        tvd         d/dlq = -sign(p - q) q / 2          d/dlp = sign(p - q) p / 2
        skew_fkl    d/dlq = -(1-a) p q / m              d/dlp = p (lp - lm + 1 - a p / m)   m = a p + (1-a) q
        skew_rkl    d/dlq = q (lq - lm + 1 - a q / m)   d/dlp = -(1-a) q p / m              m = a q + (1-a) p

    Every term carries a factor of the probability it is weighted by and is set to exactly 0
    where that probability is 0. Callers map jsd at beta 0/1 and skew at alpha 0 to the KLs.
    """

    @staticmethod
    def forward(ctx, log_q: torch.Tensor, log_p: torch.Tensor, name: str, beta: float, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(log_q, log_p)
        ctx.name, ctx.beta, ctx.alpha = name, beta, alpha
        if name == "forward_kl":
            return _plogratio(log_p.exp(), log_p, log_q).sum(-1)
        if name == "reverse_kl":
            return _plogratio(log_q.exp(), log_q, log_p).sum(-1)
        if name == "tvd":
            return (log_p.exp() - log_q.exp()).abs_().sum(-1).mul_(0.5)
        if name == "jsd":
            log_m = _log_mix(beta, log_p, log_q)  # (..., C)
            kl_p = _plogratio(log_p.exp(), log_p, log_m).sum(-1)
            return kl_p.mul_(beta).add_(_plogratio(log_q.exp(), log_q, log_m).sum(-1), alpha=1 - beta)
        if name == "skew_forward_kl":
            return _plogratio(log_p.exp(), log_p, _log_mix(alpha, log_p, log_q)).sum(-1)
        return _plogratio(log_q.exp(), log_q, _log_mix(alpha, log_q, log_p)).sum(-1)  # skew_reverse_kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        log_q, log_p = ctx.saved_tensors
        name, beta, a = ctx.name, ctx.beta, ctx.alpha
        want_q, want_p = ctx.needs_input_grad[:2]  # the teacher usually needs none: skip its (..., C) work
        d_q = d_p = None
        if name == "forward_kl":
            p = log_p.exp()  # (..., C)
            d_q = -p if want_q else None
            d_p = _plogratio(p, log_p, log_q, plus=1.0) if want_p else None
        elif name == "reverse_kl":
            q = log_q.exp()
            d_q = _plogratio(q, log_q, log_p, plus=1.0) if want_q else None
            d_p = -q if want_p else None
        elif name == "tvd":
            q, p = log_q.exp(), log_p.exp()
            sign = torch.sign(p - q).mul_(0.5)
            d_q = -sign * q if want_q else None
            d_p = sign.mul_(p) if want_p else None
        elif name == "jsd":
            log_m = _log_mix(beta, log_p, log_q)
            d_q = _plogratio(log_q.exp(), log_q, log_m).mul_(1 - beta) if want_q else None
            d_p = _plogratio(log_p.exp(), log_p, log_m).mul_(beta) if want_p else None
        elif name == "skew_forward_kl":
            p, log_m = log_p.exp(), _log_mix(a, log_p, log_q)
            p_over_m = torch.exp(log_p - log_m).masked_fill_(p == 0, 0.0)  # m >= a p > 0 where p > 0
            d_q = (p_over_m * log_q.exp()).mul_(a - 1) if want_q else None
            d_p = _plogratio(p, log_p, log_m, plus=1.0).sub_(p_over_m.mul_(p).mul_(a)) if want_p else None
        else:  # skew_reverse_kl
            q, log_m = log_q.exp(), _log_mix(a, log_q, log_p)
            q_over_m = torch.exp(log_q - log_m).masked_fill_(q == 0, 0.0)
            d_p = (q_over_m * log_p.exp()).mul_(a - 1) if want_p else None
            d_q = _plogratio(q, log_q, log_m, plus=1.0).sub_(q_over_m.mul_(q).mul_(a)) if want_q else None
        g = grad.unsqueeze(-1)  # (..., 1)
        return (None if d_q is None else d_q.mul_(g)), (None if d_p is None else d_p.mul_(g)), None, None, None


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

    return apply_divergence(log_q, log_p, name, beta, alpha)  # (...)


def apply_divergence(log_q: torch.Tensor, log_p: torch.Tensor, name: str, beta: float, alpha: float) -> torch.Tensor:
    """divergence() without its argument checks, for callers that already made them: (..., C) -> (...)."""
    if name == "jsd" and beta in (0, 1):  # TRL's endpoints, see divergence()
        name = "forward_kl" if beta == 0 else "reverse_kl"
    if name in ("skew_forward_kl", "skew_reverse_kl") and alpha == 0:  # the mixture is the other model
        name = name.replace("skew_", "")
    return _Divergence.apply(log_q, log_p, name, float(beta), float(alpha))  # (...)


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
    return dense_divergence_unchecked(
        student_logits, teacher_logits, name, beta, alpha, temperature, scale_by_temperature_squared
    )


def dense_divergence_unchecked(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    name: str,
    beta: float,
    alpha: float,
    temperature: float,
    scale_by_temperature_squared: bool,
) -> torch.Tensor:
    """dense_divergence after its checks (log_softmax makes logits and logprobs alike): (..., V) -> (...)."""
    dtype = compute_dtype(student_logits)
    log_q = F.log_softmax(_soften(student_logits.to(dtype), temperature), dim=-1)  # (B, T, V)
    log_p = F.log_softmax(_soften(teacher_logits.to(dtype), temperature), dim=-1)  # (B, T, V)
    loss = apply_divergence(log_q, log_p, name, beta, alpha)  # (B, T)
    return loss * temperature**2 if scale_by_temperature_squared else loss


__all__ = ["DIVERGENCES", "divergence", "dense_divergence"]
