"""Distillation losses: pure tensor functions from student/teacher (log)probs to per-token losses.

Conventions. p is the teacher, q the student, both at temperature tau: q = softmax(z_S / tau),
p = softmax(z_T / tau). Only what the caller lets require grad gets gradients (normally the student).

    forward_kl       KL(p||q) = sum_v p(v) [log p(v) - log q(v)]     teacher-weighted, mode-covering
    reverse_kl       KL(q||p) = sum_v q(v) [log q(v) - log p(v)]     student-weighted, mode-seeking
    jsd              beta*KL(p||M) + (1-beta)*KL(q||M), M = beta*p + (1-beta)*q  (GKD, 0 < beta < 1);
                     beta=0 is forward KL and beta=1 reverse KL, exactly as TRL's GKDTrainer
                     (so the value jumps at both ends: the interior formula tends to 0 there)
    tvd              0.5 * sum_v |p(v) - q(v)|
    skew_forward_kl  KL(p || alpha*p + (1-alpha)*q)      skew_reverse_kl  KL(q || alpha*q + (1-alpha)*p)

Every divergence is >= 0 and 0 iff p == q (on the categories considered); 0 * log 0 = 0 exactly.

Three ways to evaluate them, by what the teacher sends:
- dense (divergences.py, chunked.py): full vocabulary; chunked_* never materialises (N, V) logits.
- top-k (topk.py): a support S of k ids per position, plus a tail bucket or renormalised over S.
- sampled token (sampled.py): OPD as RL, -rho_t * A_t with A_t = log p(y_t) - log q_old(y_t);
  its on-policy gradient is the single-sample score-function estimate of grad KL(q||p).

Per-token losses are (B, T); reduce_tokens(loss, mask, num_tokens) divides their masked sum by the
completion-token count of the whole optimizer step, which makes gradient accumulation exact.
"""

from ._checks import DIVERGENCES, TAIL_MODES
from .chunked import chunked_dense_divergence, chunked_loss_from_hidden, dense_teacher_chunk, grad_into
from .divergences import dense_divergence, divergence
from .reduce import reduce_tokens
from .sampled import discounted_reward_to_go, sampled_token_pg_loss, token_logprobs_from_logits
from .topk import (
    sampled_token_support,
    topk_divergence,
    union_support,
)

__all__ = [
    "DIVERGENCES",
    "TAIL_MODES",
    "divergence",
    "dense_divergence",
    "union_support",
    "sampled_token_support",
    "topk_divergence",
    "sampled_token_pg_loss",
    "discounted_reward_to_go",
    "token_logprobs_from_logits",
    "chunked_loss_from_hidden",
    "dense_teacher_chunk",
    "chunked_dense_divergence",
    "grad_into",
    "reduce_tokens",
]
