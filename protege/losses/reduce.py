"""The loss denominator: per-token losses to one scalar, averaged over the whole optimizer step."""

from __future__ import annotations

import torch

from ._checks import check_same_shape


def reduce_tokens(
    per_token_loss: torch.Tensor, mask: torch.Tensor, num_tokens: int | float | torch.Tensor
) -> torch.Tensor:
    """sum_t mask_t * loss_t / num_tokens -> scalar.

    num_tokens is the completion-token count of the WHOLE optimizer step (all micro-batches, all
    ranks), so summing the gradients of the micro-batches gives exactly the gradient of the mean
    over the step (TRL issue #4719 was this bug). Masked-out positions are dropped with
    torch.where, so NaN/inf there never leaks into the value or the gradient. num_tokens == 0
    gives 0 (still connected to the graph), never NaN. mask: bool, or numbers read as mask != 0.
    """
    check_same_shape(per_token_loss, mask, "per_token_loss", "mask")
    total = torch.where(mask.bool(), per_token_loss, 0.0).sum()  # ()
    if isinstance(num_tokens, torch.Tensor):
        num_tokens = num_tokens.to(device=total.device, dtype=total.dtype)
        return torch.where(num_tokens > 0, total / torch.where(num_tokens > 0, num_tokens, 1.0), total * 0.0)
    if not num_tokens >= 0:
        raise ValueError(f"num_tokens={num_tokens} is invalid; expected the step's completion-token count >= 0")
    return total / num_tokens if num_tokens > 0 else total * 0.0


__all__ = ["reduce_tokens"]
