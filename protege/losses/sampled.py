"""Sampled-token OPD (OPD as RL) and the memory-lean logprob gather it needs.

With y_t sampled from the sampling policy q_old, teacher p and student q_theta:

    a_t   = reward_scale * (log p(y_t) - log q_old(y_t))          stop-gradient per-token reward
    A_t   = a_t, or with discount gamma: sum_{t' >= t} gamma^(t'-t) a_t'   (MiniLLM reward-to-go)
    rho_t = q_theta(y_t) / q_old(y_t) = exp(log q_theta(y_t) - log q_old(y_t))
    loss_t = -rho_t * A_t

Why it distils: on-policy (q_theta == q_old, so rho_t = 1 with gradient grad log q(y_t)),

    grad loss_t = -A_t grad log q(y_t) = (log q(y_t) - log p(y_t)) grad log q(y_t)     (reward_scale 1)

the score-function form, and E_{y~q}[(log q(y) - log p(y)) grad log q(y)] = grad KL(q||p) because
E_q[grad log q] = 0. So it is an unbiased single-sample estimate of the reverse-KL gradient that
needs only the teacher's logprob of the sampled token (Tinker, slime, verl PG-OPD).
Left out on purpose: PPO's ratio clipping with a min over the advantage sign; one optimizer step per
rollout keeps rho near 1, and ratio_clip below caps the weight when the sampler drifts (vLLM/HF
numerics), like truncated importance sampling.
"""

from __future__ import annotations

import torch

from ._checks import check_no_nan, check_same_shape, check_temperature, compute_dtype


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / tau) at ids: (B, T, V), (B, T, K) -> (B, T, K), as gather - logsumexp.

    Never builds a (B, T, V) log-softmax output; backward saves only the logits (and their
    tau-scaled copy when tau != 1). Arithmetic runs in at least float32.
    """
    z = logits.to(compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature  # (B, T, V)
    return z.gather(-1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)  # (B, T, K)


def token_logprobs_from_logits(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / tau)[token_ids]: (B, T, V), (B, T) -> (B, T)."""
    check_temperature(temperature)
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"logits has shape {tuple(logits.shape)} but token_ids has shape {tuple(token_ids.shape)}; "
            "expected token_ids.shape == logits.shape[:-1]"
        )
    vocab = logits.shape[-1]
    if token_ids.numel() and bool(((token_ids < 0) | (token_ids >= vocab)).any()):
        raise ValueError(f"token_ids out of range; expected 0 <= id < vocab size {vocab}")
    return gather_logprobs(logits, token_ids.long().unsqueeze(-1), temperature).squeeze(-1)  # (B, T)


def discounted_reward_to_go(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{t' >= t} gamma^(t'-t) r_t' along the last dim, (B, T) -> (B, T).

    Parallel (Hillis-Steele) scan of R_t = r_t + gamma R_{t+1}: after the step with shift s,
    R_t sums 2s terms; log2(T) tensor ops instead of a T-step Python loop, and every coefficient
    gamma^s <= 1, so nothing overflows. The exponent counts positions, masked ones included.
    """
    out = rewards
    shift, coef = 1, float(gamma)
    while shift < out.shape[-1]:
        tail = torch.nn.functional.pad(out[..., shift:], (0, shift))  # (B, T): R_{t+shift}, 0 past the end
        out = out + coef * tail
        shift, coef = 2 * shift, coef * coef
    return out


def sampled_token_pg_loss(
    student_token_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    reward_scale: float = 1.0,
    ratio_clip: float | None = None,
    discount: float | None = None,
) -> torch.Tensor:
    """Per-token policy-gradient OPD loss -rho_t * A_t, all inputs (B, T) -> (B, T), 0 where ~mask.

    student_token_logprobs carries the gradient; sampling_logprobs (log q_old) and
    teacher_token_logprobs (log p) are treated as constants. reward_scale > 1 extrapolates past
    the teacher (G-OPD/ExOPD). ratio_clip c: the weight's *value* becomes min(rho, c) while its
    gradient stays (min(rho, c) / rho) * grad rho = min(rho, c) * grad log q, i.e. truncated
    importance sampling: clipped tokens still learn, with weight c. discount gamma in [0, 1]
    replaces a_t by the reward-to-go sum_{t' >= t} gamma^(t'-t) a_t' within the row's mask.
    """
    check_same_shape(student_token_logprobs, sampling_logprobs, "student_token_logprobs", "sampling_logprobs")
    check_same_shape(student_token_logprobs, teacher_token_logprobs, "student_token_logprobs", "teacher_token_logprobs")
    check_same_shape(student_token_logprobs, mask, "student_token_logprobs", "mask")
    check_no_nan(torch.where(mask.bool(), teacher_token_logprobs, 0.0).unsqueeze(-1), "teacher logprobs")
    if ratio_clip is not None and not ratio_clip > 0:
        raise ValueError(f"ratio_clip={ratio_clip} is invalid; expected None or a number > 0")
    if discount is not None and not (0.0 <= discount <= 1.0):
        raise ValueError(f"discount={discount} is out of range; expected None or 0 <= discount <= 1")
    mask = mask.bool()
    dtype = compute_dtype(student_token_logprobs)
    log_q = torch.where(mask, student_token_logprobs.to(dtype), 0.0)  # (B, T), padding may hold junk
    log_q_old = torch.where(mask, sampling_logprobs.detach().to(dtype), 0.0)
    log_p = torch.where(mask, teacher_token_logprobs.detach().to(dtype), 0.0)

    advantage = reward_scale * (log_p - log_q_old)  # (B, T) a_t, constant
    if discount is not None:
        advantage = discounted_reward_to_go(advantage, discount)
    rho = torch.exp(log_q - log_q_old)  # (B, T)
    if ratio_clip is not None:
        weight = rho.clamp(max=ratio_clip) / rho.clamp(min=torch.finfo(dtype).tiny)
        rho = rho * weight.detach()  # value min(rho, c), grad min(rho, c) grad log q
    return torch.where(mask, -rho * advantage, 0.0)  # (B, T)


__all__ = ["token_logprobs_from_logits", "sampled_token_pg_loss", "discounted_reward_to_go", "gather_logprobs"]
