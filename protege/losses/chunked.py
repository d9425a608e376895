"""Full-vocabulary losses from final hidden states without ever holding (N, V) logits.

For N flattened positions with student hidden states h (N, H) and lm_head weight W (V, H), the
logits z = h W^T (N, V) are built one chunk of rows at a time inside torch.utils.checkpoint:
the forward keeps only the chunk's inputs, and the backward recomputes the chunk's logits, runs
its backward and frees them before the next chunk. Peak extra memory is one chunk's logits and
loss intermediates instead of the whole batch's. The cost: the chunk's matmuls (student, and the
teacher's when it comes as hidden states) run twice, once in forward and once in backward.

A teacher given as (hidden (N, Ht), weight (V, Ht)) is turned into logits inside the same chunk
under torch.no_grad (dense_teacher_chunk), so its (N, V) logits never exist either.
Left out: logit soft-capping and lm_head biases (none of the supported model families use them
on the output head); pass a custom loss_fn to chunked_loss_from_hidden if yours does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ._checks import check_chunk_size, check_divergence_args, check_no_nan, check_temperature
from .divergences import dense_divergence_unchecked


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, loss_fn: Callable, *extras) -> torch.Tensor:
    logits = hidden @ weight.T  # (N_c, V)
    out = loss_fn(logits, *extras)  # (N_c,)
    if out.shape != hidden.shape[:1]:
        raise ValueError(f"loss_fn returned shape {tuple(out.shape)}; expected one value per row ({hidden.shape[0]},)")
    return out


def chunked_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    *extras: torch.Tensor | None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """loss_fn(hidden @ weight.T, *extras) row chunk by row chunk: (N, H), (V, H) -> (N,).

    loss_fn(logits (N_c, V), *extra_chunks) must return (N_c,) and treat rows independently.
    extras: tensors with leading dim N, split like hidden, or None (passed through as None).
    Values and gradients (w.r.t. hidden, weight and any extra with grad) equal the unchunked
    loss_fn(hidden @ weight.T, *extras) up to float rounding.
    """
    check_chunk_size(chunk_size)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} but weight has shape {tuple(weight.shape)}; "
            "expected hidden (N, H) and weight (V, H)"
        )
    n = hidden.shape[0]
    for i, extra in enumerate(extras):
        if extra is not None and (extra.dim() == 0 or extra.shape[0] != n):
            raise ValueError(
                f"extras[{i}] has shape {tuple(extra.shape)} but hidden has shape {tuple(hidden.shape)}; "
                "expected the same leading dimension N"
            )
    if n == 0:
        return hidden.sum(-1)  # (0,), still connected to the graph
    # split (not slicing) so the backward assembles grad_hidden once instead of once per chunk
    hidden_chunks = hidden.split(chunk_size)
    extra_chunks = [[None] * len(hidden_chunks) if e is None else e.split(chunk_size) for e in extras]
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or any(e is not None and e.requires_grad for e in extras)
    )
    outs = []
    for i, h in enumerate(hidden_chunks):
        args = [chunks[i] for chunks in extra_chunks]
        if needs_grad:
            outs.append(checkpoint(_chunk_loss, h, weight, loss_fn, *args, use_reentrant=False))
        else:
            outs.append(_chunk_loss(h, weight, loss_fn, *args))
    return torch.cat(outs)  # (N,)


def dense_teacher_chunk(teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor) -> torch.Tensor:
    """Teacher logits of one chunk, without autograd: (N_c, Ht), (V, Ht) -> (N_c, V)."""
    with torch.no_grad():
        return teacher_hidden @ teacher_weight.T  # (N_c, V)


def chunked_dense_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    name: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """dense_divergence from hidden states, chunked: (N, H), (V, H) -> (N,).

    The teacher is either (teacher_hidden (N, Ht), teacher_weight (V, Ht)), exact logits built per
    chunk, or teacher_logprobs (N, V) (log p at tau = 1, re-normalised at tau as in
    dense_divergence(teacher_is_logprobs=True)). Same math as dense_divergence on the full logits.
    """
    check_divergence_args(name, beta, alpha)
    check_temperature(temperature)
    by_hidden = teacher_hidden is not None or teacher_weight is not None
    if by_hidden == (teacher_logprobs is not None) or (by_hidden and (teacher_hidden is None or teacher_weight is None)):
        raise ValueError(
            "teacher: expected either teacher_hidden and teacher_weight together, or teacher_logprobs alone"
        )
    vocab = student_weight.shape[0]
    if by_hidden:
        if teacher_weight.dim() != 2 or teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"student_weight has shape {tuple(student_weight.shape)} but teacher_weight has shape "
                f"{tuple(teacher_weight.shape)}; expected the same vocabulary size (dim 0)"
            )
        if teacher_hidden.dim() != 2 or teacher_hidden.shape != (student_hidden.shape[0], teacher_weight.shape[1]):
            raise ValueError(
                f"teacher_hidden has shape {tuple(teacher_hidden.shape)} but student_hidden has shape "
                f"{tuple(student_hidden.shape)} and teacher_weight {tuple(teacher_weight.shape)}; "
                "expected (N, teacher hidden size)"
            )
        check_no_nan(teacher_hidden, "teacher hidden states")
        check_no_nan(teacher_weight, "teacher lm_head weight rows")
        teacher = teacher_hidden
    else:
        if teacher_logprobs.shape != (student_hidden.shape[0], vocab):
            raise ValueError(
                f"teacher_logprobs has shape {tuple(teacher_logprobs.shape)} but student_hidden has shape "
                f"{tuple(student_hidden.shape)} and student_weight {tuple(student_weight.shape)}; expected (N, V)"
            )
        check_no_nan(teacher_logprobs)
        teacher = teacher_logprobs

    def loss_fn(student_logits: torch.Tensor, teacher_chunk: torch.Tensor) -> torch.Tensor:
        if by_hidden:
            teacher_chunk = dense_teacher_chunk(teacher_chunk, teacher_weight)  # (N_c, V)
        # checked once above (teacher_logprobs, or teacher_hidden: finite hidden -> finite logits)
        return dense_divergence_unchecked(
            student_logits, teacher_chunk, name, beta, alpha, temperature, scale_by_temperature_squared
        )  # (N_c,)

    return chunked_loss_from_hidden(student_hidden, student_weight, loss_fn, teacher, chunk_size=chunk_size)


__all__ = ["chunked_loss_from_hidden", "dense_teacher_chunk", "chunked_dense_divergence"]
