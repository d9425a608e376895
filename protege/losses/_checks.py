"""Cheap argument checks shared by the loss functions; every failure is a ValueError for people."""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
TAIL_MODES = ("bucket", "renormalize")


def check_divergence_args(name: str, beta: float, alpha: float) -> None:
    if name not in DIVERGENCES:
        raise ValueError(f"name={name!r} is not a known divergence; expected one of {', '.join(DIVERGENCES)}")
    if not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta={beta} is out of range; expected 0 <= beta <= 1 (0: forward KL, 1: reverse KL)")
    # alpha = 1 makes the skewed mixture equal to the first argument: KL(p || p) = 0 for every
    # student, a loss with no signal, so it is refused rather than silently training nothing.
    if not (0.0 <= float(alpha) < 1.0):
        raise ValueError(f"alpha={alpha} is out of range; expected 0 <= alpha < 1 (alpha=1 gives a constant 0 loss)")


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature} is invalid; expected a finite number > 0")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; expected equal shapes"
        )


def check_no_nan(teacher: torch.Tensor, what: str = "teacher logprobs") -> None:
    """One reduction on the happy path; the count is computed only to word the error."""
    if teacher.is_floating_point() and bool(torch.isnan(teacher).any()):
        bad = torch.isnan(teacher).reshape(-1, teacher.shape[-1]).any(-1).sum() if teacher.dim() else 1
        raise ValueError(f"{what} contain NaN at {int(bad)} positions; expected finite values or -inf")


def check_chunk_size(chunk_size: int) -> None:
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size} is invalid; expected an int > 0")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Loss arithmetic runs in at least float32 (bf16 logprobs are off by ~0.06 at logit 20)."""
    return torch.promote_types(x.dtype, torch.float32)
