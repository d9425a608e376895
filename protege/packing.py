"""Packed training micro-batches: the rows of a micro-batch in ONE sequence, no padding.

Padded micro-batch (forward.forward_completion_hidden): B rows right-padded to the longest,
B x S_max tokens through every layer. Packed (train.pack=true): the rows' prompt+completion tokens
concatenated into one (1, sum_i S_i) sequence with position ids restarting at 0 for every row,

    input_ids    = [p_0 c_0 | p_1 c_1 | ... ]          (1, L),  L = sum_i (P_i + n_i)
    position_ids = [0 .. S_0-1 | 0 .. S_1-1 | ... ]     (1, L)

and no attention mask: transformers (masking_utils.find_packed_sequence_indices) then reads the
restarts of position_ids as sequence boundaries and builds a block-diagonal causal mask, so a token
attends only to the earlier tokens of its own row. Every hidden state equals the padded path's (same
causal context, same RoPE positions) up to fp32 rounding, and no FLOPs of the linear layers go to
padding. The (B, T, H) hidden states that predict each completion token are gathered back at offsets
o_i + P_i - 1 + t (o_i = start of row i), aligned with Rollouts.completion_ids like the padded path's.

Micro-batches are then formed by a token budget (`token_batches`): rows, in the trainer's order, are
added while the sum of their lengths stays within train.micro_batch_tokens.
"""

from __future__ import annotations

import torch
from torch import nn


def token_batches(order: list[int], lengths: list[int], token_budget: int) -> list[list[int]]:
    """Consecutive runs of `order` whose summed lengths stay within token_budget (a longer row: alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > token_budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def packed_inputs(prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor, completion_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (1, L), position_ids (1, L), index (B, T)): index[i, t] is the packed position whose hidden
    state predicts completion token t of row i (0 where t is past the row's completion)."""
    lengths = completion_mask.sum(1).tolist()
    rows = [torch.cat([p, completion_ids[i, :n]]) for i, (p, n) in enumerate(zip(prompt_ids, lengths))]
    input_ids = torch.cat(rows)[None]  # (1, L)
    position_ids = torch.cat([torch.arange(len(r)) for r in rows])[None]  # (1, L)
    index = torch.zeros(completion_mask.shape, dtype=torch.long)  # (B, T)
    start = 0
    for i, (p, n) in enumerate(zip(prompt_ids, lengths)):
        index[i, :n] = torch.arange(start + len(p) - 1, start + len(p) - 1 + n)
        start += len(rows[i])
    return input_ids, position_ids, index


def forward_packed_hidden(model: nn.Module, prompt_ids: list[torch.Tensor], completion_ids: torch.Tensor,
                          completion_mask: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
    """(B, T, H) final hidden states predicting each completion token, from one packed forward.

    Same contract as forward.forward_completion_hidden (pad_id is unused: nothing is padded); `model` is
    a HiddenStates wrapper (possibly wrapped by accelerate), called with position_ids and no mask."""
    device = completion_ids.device
    input_ids, position_ids, index = packed_inputs(prompt_ids, completion_ids.cpu(), completion_mask.cpu())
    hidden = model(input_ids.to(device), None, position_ids.to(device))[0]  # (L, H)
    b, t = index.shape
    return hidden[index.to(device).reshape(-1)].reshape(b, t, hidden.shape[-1])  # (B, T, H)
