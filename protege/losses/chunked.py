"""Full-vocabulary losses from final hidden states without ever holding (N, V) logits.

For N flattened positions with student hidden states h (N, H) and lm_head weight W (V, H), the
logits z = h W^T (N, V) are built one chunk of rows at a time inside torch.utils.checkpoint:
the forward keeps only the chunk's inputs, and the backward recomputes the chunk's logits, runs
its backward and frees them before the next chunk. Peak extra memory is one chunk's logits and
loss intermediates instead of the whole batch's. The cost: the chunk's matmuls (student, and the
teacher's when it comes as hidden states) run twice, once in forward and once in backward.
With fused=True the chunk's gradients are computed right away in the forward pass instead (no
recompute; valid when the rows' values are summed with one weight, as the trainer does).

A teacher given as (hidden (N, Ht), weight (V, Ht)) is turned into logits inside the same chunk
under torch.no_grad (dense_teacher_chunk), so its (N, V) logits never exist either.
Left out: logit soft-capping and lm_head biases (none of the supported model families use them
on the output head); pass a custom loss_fn to chunked_loss_from_hidden if yours does.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
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


_direct = threading.local()  # .weight: the parameter whose fused gradient goes straight into .grad (grad_into)


@contextmanager
def grad_into(weight: torch.Tensor | None):
    """Inside, a fused chunked loss on exactly this leaf `weight` adds its gradient straight into weight.grad
    in backward (weight.grad = g when None, else weight.grad += g) and hands autograd None for it.

    For a tied lm_head whose embedding gives its gradient as a sparse addend (protege.forward.
    tied_input_embedding): autograd would sum the two addends into a new (V, H) tensor (it never adds a sparse
    addend in place); the weight's AccumulateGrad adds a sparse gradient into an existing dense .grad in place.
    Only valid when the weight still gets an autograd gradient from elsewhere (the embedding) after this loss's
    backward: distributed hooks (DDP) fire on that one, with .grad complete. protege.forward.HiddenStates takes
    the tied embedding's gradient as sparse only inside this block. Per thread; None: off."""
    before = getattr(_direct, "weight", None)
    _direct.weight = weight
    try:
        yield
    finally:
        _direct.weight = before


def grad_into_weight() -> torch.Tensor | None:
    """The weight of the innermost grad_into block of this thread, else None."""
    return getattr(_direct, "weight", None)


class _FusedChunks(torch.autograd.Function):
    """Values of loss_fn per row, with the gradients of their SUM computed in the forward pass.

    Per chunk c (rows r): z = h_r W^T, v = loss_fn(z), g = d(sum v)/dz (N_c, V) by a local autograd
    call, then grad_h[r] = g W and grad_W += g^T h_r; z and g are freed before the next chunk.
    backward(grad_out) returns s * grad_h and s * grad_W, where grad_out must be the same s for
    every row (the trainer sums per-token losses with one weight, 1 / step tokens); a non-uniform
    grad_out is an error, never a silently wrong gradient. Costs 3 vocabulary matmuls per row (z, g W,
    g^T h) instead of 4 with checkpointing (z twice), and the loss's softmaxes run once, not twice.
    Extra memory: grad_W (V, H) and grad_h (N, H), scaled in place in backward and handed to autograd (which
    takes grad_W as the weight's .grad without a copy); backward may therefore run once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, loss_fn, chunk_size, *extras):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen lm_head (LoRA): no grad_W
        grad_h = torch.empty_like(hidden) if want_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # accumulate grad_W in >= fp32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        w = weight.detach()
        outs = []
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start: start + chunk_size].detach()
            args = [None if e is None else e[start: start + chunk_size] for e in extras]
            with torch.enable_grad():
                z = (h @ w.T).detach().requires_grad_()  # (N_c, V)
                v = loss_fn(z, *args)  # (N_c,)
                if v.shape != h.shape[:1]:
                    raise ValueError(f"loss_fn returned shape {tuple(v.shape)}; expected one value per row "
                                     f"({h.shape[0]},)")
                g = torch.autograd.grad(v.sum(), z, allow_unused=True)[0] if v.requires_grad else None  # (N_c, V)
            g = torch.zeros_like(z) if g is None else g.to(w.dtype)  # a loss that ignores the logits
            if want_h:
                grad_h[start: start + chunk_size] = g @ w  # (N_c, H)
            if want_w:
                grad_w.addmm_(g.T.to(acc), h.to(acc))  # (V, H)
            outs.append(v.detach())
            del z, v, g
        # Kept as attributes, not saved tensors: backward hands them over and drops its own reference, so autograd
        # takes grad_W as the weight's .grad without a (V, H) copy.
        ctx.grads = [grad_h, None if grad_w is None else grad_w.to(weight.dtype)]
        ctx.n_extras = len(extras)
        ctx.into = weight if want_w and weight is getattr(_direct, "weight", None) and weight.is_leaf else None
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("fused chunked loss: backward ran twice through the same graph (retain_graph=True), "
                               "but its gradients were handed over on the first. Set loss.fused=false for such uses.")
        s = grad_out[0]
        if (grad_out - s).abs().max() > 1e-6 * max(float(s.abs()), 1e-30):
            raise RuntimeError(
                "fused chunked loss: the per-row values were weighted unequally in the final loss, but their "
                "gradients were computed for an equal-weight sum. Set loss.fused=false (fused=False) for such uses.")
        grads, ctx.grads = ctx.grads, None  # scaled in place and handed over: no second (V, H) copy of grad_W
        scaled = [None if g is None else g.mul_(s.to(g.dtype)) for g in grads]
        del grads
        if ctx.into is not None:  # grad_into: straight into .grad, no (V, H) sum with the embedding's addend
            weight, ctx.into = ctx.into, None
            if weight.grad is None:
                weight.grad = scaled[1]
            else:
                weight.grad.add_(scaled[1])
            scaled[1] = None
        return *scaled, None, None, *([None] * ctx.n_extras)


def chunked_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    *extras: torch.Tensor | None,
    chunk_size: int = 1024,
    fused: bool = False,
) -> torch.Tensor:
    """loss_fn(hidden @ weight.T, *extras) row chunk by row chunk: (N, H), (V, H) -> (N,).

    loss_fn(logits (N_c, V), *extra_chunks) must return (N_c,) and treat rows independently.
    extras: tensors with leading dim N, split like hidden, or None (passed through as None).
    Values and gradients (w.r.t. hidden, weight and any extra with grad) equal the unchunked
    loss_fn(hidden @ weight.T, *extras) up to float rounding.

    fused=True (when gradients are needed and no extra needs one): the gradients are computed in the
    forward pass (_FusedChunks), which is cheaper but only valid when the returned values enter the
    final loss with one common weight (e.g. sum / token count); other weightings raise in backward.
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
    if needs_grad and fused and not any(e is not None and e.requires_grad for e in extras):
        return _FusedChunks.apply(hidden, weight, loss_fn, chunk_size, *extras)
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
    fused: bool = False,
) -> torch.Tensor:
    """dense_divergence from hidden states, chunked: (N, H), (V, H) -> (N,). fused: see chunked_loss_from_hidden.

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

    return chunked_loss_from_hidden(student_hidden, student_weight, loss_fn, teacher, chunk_size=chunk_size,
                                    fused=fused)


__all__ = ["chunked_loss_from_hidden", "dense_teacher_chunk", "chunked_dense_divergence", "grad_into"]
